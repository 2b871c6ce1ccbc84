"""sae-cache-ext: sae-lens's activation cache, with real shuffles and crash-safe writes.

The public names are imported on first use, so that `sae-cache-ext` can check a
config (and answer `--help`) without importing torch and sae-lens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_cache_ext.config import CacheActivationsRunnerConfig
    from sae_cache_ext.runner import CacheActivationsRunner

__version__ = "0.1.0"

__all__ = ["CacheActivationsRunner", "CacheActivationsRunnerConfig", "__version__"]

_LAZY = {
    "CacheActivationsRunner": "sae_cache_ext.runner",
    "CacheActivationsRunnerConfig": "sae_cache_ext.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae_cache_ext' has no attribute {name!r}")

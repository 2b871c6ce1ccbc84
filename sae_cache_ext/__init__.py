"""sae-cache-ext: sae-lens's activation cache, with real shuffles and crash-safe writes."""

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.runner import CacheActivationsRunner

__version__ = "0.1.0"

__all__ = ["CacheActivationsRunner", "CacheActivationsRunnerConfig", "__version__"]

"""Small helpers shared by the runner tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sae_lens
import sae_lens.cache_activations_runner as upstream_module
import yaml
from datasets import Dataset, load_from_disk

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig

HOOK = "blocks.0.hook_resid_post"


def before_nth_call(real: Callable, n: int, action: Callable[[], None]) -> Callable:
    """`real`, wrapped so that `action()` runs right before its n-th call (to raise
    an injected failure, or to SIGKILL the process)."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            action()
        return real(*args, **kwargs)

    return wrapper


def run_ours(cfg: CacheActivationsRunnerConfig, model, corpus: Dataset) -> Dataset:
    return CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    ).run()


def run_upstream(
    kwargs: dict[str, Any], model, corpus: Dataset, monkeypatch
) -> Dataset:
    """sae-lens's own runner. Its constructor always calls `load_model`, which would
    download; we hand it the local model instead, and change nothing else."""
    monkeypatch.setattr(upstream_module, "load_model", lambda **_: model)
    cfg = sae_lens.CacheActivationsRunnerConfig(**kwargs)
    return sae_lens.CacheActivationsRunner(cfg, override_dataset=corpus).run()


def columns(
    dataset: Dataset | str | Path, hook: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`(acts_RTD, toks_RT)` as numpy arrays, in the dataset's row order. The hook
    column is the one that is not `token_ids` unless `hook` names it."""
    if not isinstance(dataset, Dataset):
        dataset = load_from_disk(str(dataset))
    if hook is None:
        (hook,) = [c for c in dataset.column_names if c != "token_ids"]
    numpy_ds = dataset.with_format("numpy")
    return np.asarray(numpy_ds[hook]), np.asarray(numpy_ds["token_ids"])


def cli_config(folder: Path, llama_dir: Path, text_file: Path, **extra: Any) -> Path:
    """A `sae-cache-ext run` YAML config in `folder`: the tiny Llama folder on the
    text file, 16-token rows, 2 batches of 4 rows a buffer, 384 tokens, shuffled."""
    values = {
        "model_name": str(llama_dir),
        "dataset_path": str(text_file),
        "hook_name": "blocks.1.hook_resid_post",
        "d_in": 32,
        "context_size": 16,
        "model_batch_size": 4,
        "training_tokens": 384,
        "buffer_size_gb": (2 * 4 * 16 * 32 * 4 + 0.5) / 1e9,
        "new_cached_activations_path": str(folder / "cache"),
        "shuffle": True,
        "device": "cpu",
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return path

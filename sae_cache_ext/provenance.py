"""Where cached tokens came from (`store_token_positions`): the model inputs rebuilt.

A cache made with `store_token_positions=True` stores, for every token, the index of
the sae-lens sequence it was read in and its position there. `source_sequences`
replays the store (the same code path the run read it through, so the same
sequences) to get those sequences back; `verify.rerun.rerun_tokens` runs them again.
Shape suffixes: S sequences, T tokens per sequence (the config's context size).
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.source import ActivationSource


def source_sequences(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    dataset: Dataset | None,
    n_sequences: int,
) -> torch.Tensor:
    """The first `n_sequences` sequences the run's store yields, `(S, T)` on the
    CPU, read through the same store as a run (passes repeat as in a run with
    `on_dataset_exhausted='repeat'`)."""
    source = ActivationSource(
        cfg, model, dataset, ((cfg.hook_name, cfg.d_in),), cfg.context_size, None
    )
    store, rows = source.store, []
    while len(rows) < n_sequences:
        try:
            rows.append(next(store.iterable_sequences).cpu())
        except StopIteration:
            if not rows:
                raise ValueError("the dataset yields no sequence") from None
            store.iterable_sequences = store._iterate_tokenized_sequences()
    if not rows:
        return torch.empty((0, cfg.context_size), dtype=torch.long)
    return torch.stack(rows)

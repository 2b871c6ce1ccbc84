"""Training an SAE straight from a cache with sae-lens's own trainer, and measuring
it on cache rows it never saw.

The trainer reads the cache in file order, from row 0, so holding out the last rows
(`eval_rows`) and training on fewer tokens than the rows before them hold keeps the
evaluation rows unseen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TopKTrainingSAEConfig,
)
from transformer_lens.hook_points import HookedRootModule

logger = logging.getLogger(__name__)


@dataclass
class SAEEvaluation:
    """Reconstruction quality on held-out cache rows."""

    rows: int
    tokens: int
    mse: float
    variance: float
    explained_variance: float
    l0: float


def cache_shape(cache_path: str | Path) -> tuple[str, int, int, int]:
    """`(hook_name, rows, context_size, d_in)` read from the cache's schema."""
    dataset = Dataset.load_from_disk(str(cache_path))
    (hook_name,) = [
        c for c in dataset.column_names if c not in ("token_ids", "token_positions")
    ]
    context_size, d_in = dataset.features[hook_name].shape
    return hook_name, len(dataset), context_size, d_in


def train_sae_from_cache(
    cache_path: str | Path,
    model: HookedRootModule,
    *,
    d_sae: int,
    k: int,
    training_tokens: int,
    eval_rows: int,
    train_batch_size_tokens: int = 1024,
    lr: float = 3e-4,
    output_path: str | Path | None = None,
    seed: int = 42,
    **runner_overrides: Any,
):
    """Train a TopK SAE on the cache with `LanguageModelSAETrainingRunner`.

    Raises `ValueError` if the training tokens could reach the `eval_rows` held out
    at the end of the cache.
    """
    hook_name, n_rows, context_size, d_in = cache_shape(cache_path)
    store_batch_size_prompts = runner_overrides.pop("store_batch_size_prompts", 8)
    # sae-lens mixes through a buffer of n_batches_in_buffer * context_size tokens,
    # which must hold at least one training batch.
    n_batches_in_buffer = runner_overrides.pop(
        "n_batches_in_buffer", max(2, -(-2 * train_batch_size_tokens // context_size))
    )
    # rows the store may read: the training tokens, plus the mixing buffer's rows and
    # one batch of prompts beyond, twice over for safety
    readable = -(-training_tokens // context_size) + 2 * (
        n_batches_in_buffer + store_batch_size_prompts
    )
    if readable > n_rows - eval_rows:
        raise ValueError(
            f"training_tokens={training_tokens} may read {readable} rows, reaching the "
            f"{eval_rows} eval rows held out of {n_rows}: lower training_tokens or "
            "eval_rows, or cache more tokens."
        )
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device="cpu"),
        model_name="local-model",
        hook_name=hook_name,
        dataset_path="local/cache",
        is_dataset_tokenized=True,
        context_size=context_size,
        use_cached_activations=True,
        cached_activations_path=str(cache_path),
        training_tokens=training_tokens,
        train_batch_size_tokens=train_batch_size_tokens,
        store_batch_size_prompts=store_batch_size_prompts,
        n_batches_in_buffer=n_batches_in_buffer,
        lr=lr,
        device="cpu",
        seed=seed,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None if output_path is None else str(output_path),
        checkpoint_path=None,
        n_checkpoints=0,
        verbose=False,
        **runner_overrides,
    )
    # The store insists on a text or token dataset even when it reads a cache; this
    # placeholder is never iterated for activations (they come from the cache).
    placeholder = Dataset.from_dict({"tokens": [[0] * context_size]})
    return LanguageModelSAETrainingRunner(
        cfg, override_dataset=placeholder, override_model=model
    ).run()


@torch.no_grad()
def evaluate_sae(sae, cache_path: str | Path, eval_rows: int) -> SAEEvaluation:
    """Explained variance, MSE and L0 of `sae` on the last `eval_rows` cache rows."""
    hook_name, n_rows, _, d_in = cache_shape(cache_path)
    dataset = Dataset.load_from_disk(str(cache_path)).with_format("torch")
    acts_RTD: torch.Tensor = dataset[n_rows - eval_rows :][hook_name]
    acts_ND = acts_RTD.reshape(-1, d_in).float()
    feats_NS = sae.encode(acts_ND)
    recon_ND = sae.decode(feats_NS)
    mse = (recon_ND - acts_ND).pow(2).sum(-1).mean().item()
    variance = (acts_ND - acts_ND.mean(0)).pow(2).sum(-1).mean().item()
    return SAEEvaluation(
        rows=eval_rows,
        tokens=acts_ND.shape[0],
        mse=mse,
        variance=variance,
        explained_variance=1.0 - mse / variance,
        l0=(feats_NS != 0).float().sum(-1).mean().item(),
    )

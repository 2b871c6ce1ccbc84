"""What the activation statistics, the non-finite check and the envelope cost.

Caches a wide random model (the tests' tiny tokenizer, 2 layers of d_model 1024 by
default: the widest activations per unit of model work, so the worst case for
per-value statistics) or SmolLM2-135M (`--model smollm2`), and reads the cost from
the manifest: `timings.statistics_seconds` (the statistics on the writer thread)
and `timings.envelope_seconds`, against
`timings.caching_seconds`.

    python benchmarks/statistics_cost.py [--d-model 1024] [--tokens 65536] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide", choices=["wide", "smollm2"])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--buffer-mb", type=float, default=64.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
    from sae_cache_ext.toy import build_corpus, build_model, build_tokenizer

    folder = Path(tempfile.mkdtemp())
    if args.model == "wide":
        model = build_model(build_tokenizer(folder / "tok"), d_model=args.d_model)
        hook, d_in, corpus = "blocks.1.hook_resid_post", args.d_model, build_corpus()
    else:
        from sae_cache_ext.data import pydoc_corpus
        from sae_cache_ext.models import load_smollm2_hooked

        model = load_smollm2_hooked()
        hook, d_in, corpus = "blocks.15.hook_resid_post", 576, pydoc_corpus()
    model = model.to(args.device)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local",
        model_name=args.model,
        hook_name=hook,
        d_in=d_in,
        context_size=args.context_size,
        model_batch_size=args.batch,
        training_tokens=args.tokens,
        buffer_size_gb=args.buffer_mb / 1e3,
        new_cached_activations_path=str(folder / "cache"),
        dtype=args.dtype,
        device=args.device,
        shuffle=False,
    )
    CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    ).run()
    manifest = json.loads(
        (folder / "cache" / "sae_cache_ext_manifest.json").read_text()
    )
    timings, envelope = manifest["timings"], manifest["envelope"]
    caching = timings["caching_seconds"]
    result = {
        "model": args.model,
        "d_in": d_in,
        "tokens": manifest["tokens"],
        "threads": args.threads,
        "caching_seconds": round(caching, 3),
        "statistics_seconds": round(timings["statistics_seconds"], 3),
        "statistics_share": round(timings["statistics_seconds"] / caching, 4),
        "envelope_seconds": round(timings["envelope_seconds"] or 0.0, 3),
        "envelope_share": round((timings["envelope_seconds"] or 0.0) / caching, 4),
        "envelope": envelope,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

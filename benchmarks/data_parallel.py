"""Wall time of a data-parallel run (torchrun, N processes) against one process,
caching the same number of tokens from SmolLM2-135M on CPU.

    python benchmarks/data_parallel.py [--tokens 16384] [--procs 2] [--repeats 1]

Each process gets one torch thread (OMP_NUM_THREADS=1), so N processes use N cores.
Two times are printed per run: the whole `torchrun` command (start-up, model load,
caching, merge and swap) and the caching itself as `sae-cache-ext run` reports it
(from `run()` to the cache in place, on rank 0). The shuffle and
shuffle_across_sequences are on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sae_cache_ext.data import pydoc_corpus


def run(procs: int, folder: Path, tokens: int) -> dict[str, float]:
    text = folder / "corpus.txt"
    if not text.exists():
        text.write_text("\n\n".join(pydoc_corpus()["text"]))
    config = folder / f"cfg-{procs}.yaml"
    out = folder / f"cache-{procs}-{time.time_ns()}"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name": "smollm2",
                "dataset_path": str(text),
                "hook_name": "blocks.15.hook_resid_post",
                "d_in": 576,
                "context_size": 128,
                "model_batch_size": 8,
                "training_tokens": tokens,
                "buffer_size_gb": (4 * 8 * 128 * 576 * 4 + 0.5) / 1e9,
                "new_cached_activations_path": str(out),
                "shuffle": True,
                "shuffle_across_sequences": True,
                "device": "cpu",
            }
        )
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "sae_cache_ext",
        "run",
        str(config),
        "--quiet",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"torchrun with {procs} process(es) failed:\n{result.stderr}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "total_seconds": total,
        "caching_seconds": summary["run_seconds"],
        "tokens": summary["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sae-cache-ext-dp-") as tmp:
        folder = Path(tmp)
        results: dict[int, list[dict[str, float]]] = {1: [], args.procs: []}
        for _ in range(args.repeats):
            for procs in results:  # alternate: 1, N, 1, N, ...
                results[procs].append(run(procs, folder, args.tokens))
    print(
        f"SmolLM2-135M, {args.tokens:,} tokens, one torch thread per process, "
        f"{args.repeats} repeat(s) (medians)"
    )
    print(f"{'processes':>9}  {'tokens':>7}  {'torchrun s':>10}  {'caching s':>9}")
    medians = {}
    for procs, runs in results.items():
        total = statistics.median(r["total_seconds"] for r in runs)
        caching = statistics.median(r["caching_seconds"] for r in runs)
        medians[procs] = (total, caching)
        print(f"{procs:>9}  {runs[0]['tokens']:>7,}  {total:>10.1f}  {caching:>9.1f}")
    (one_total, one_caching), (n_total, n_caching) = medians[1], medians[args.procs]
    print(
        f"{args.procs} processes / 1 process, wall time: {n_total / one_total:.2f} "
        f"(whole command), {n_caching / one_caching:.2f} (caching)"
    )


if __name__ == "__main__":
    main()

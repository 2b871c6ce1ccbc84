"""Peak memory of a caching run as the number of buffers grows.

Runs the tiny test model (d_model 32) in a fresh process per setting and prints the
peak RSS above the RSS right before `run()`, in units of `buffer_size_gb`.

    python benchmarks/memory.py [--buffer-mb 32] [--buffers 1 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child(buffer_mb: float, n_buffers: int, out: str) -> None:
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
    from tests.fixtures import D_MODEL, build_corpus, build_model, build_tokenizer

    model = build_model(build_tokenizer(Path(tempfile.mkdtemp())))
    corpus = build_corpus()
    context, batch = 64, 32
    batch_bytes = context * batch * D_MODEL * 4
    n_batches = max(1, int(buffer_mb * 1e6) // batch_bytes)
    buffer_bytes = n_batches * batch_bytes
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local",
        model_name="tiny",
        hook_name="blocks.1.hook_resid_post",
        d_in=D_MODEL,
        context_size=context,
        model_batch_size=batch,
        training_tokens=n_buffers * n_batches * batch * context,
        buffer_size_gb=(buffer_bytes + 0.5) / 1e9,
        new_cached_activations_path=out,
        shuffle=True,
        shuffle_across_sequences=True,
        device="cpu",
    )
    runner = CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    )
    base = _rss_bytes()
    runner.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "n_buffers": cfg.n_buffers,
                "buffer_bytes": buffer_bytes,
                "base_rss": base,
                "peak_rss": peak,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--buffer-mb", type=float, default=32.0)
    parser.add_argument("--buffers", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(float(args.child[0]), int(args.child[1]), args.child[2])
        return
    print(
        f"{'buffers':>8} {'buffer MB':>10} {'peak above base MB':>19} {'x buffer':>9}"
    )
    for n in args.buffers:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(args.buffer_mb),
                    str(n),
                    str(Path(tmp) / "cache"),
                ],
                cwd=ROOT,
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                check=True,
            )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        above = r["peak_rss"] - r["base_rss"]
        print(
            f"{r['n_buffers']:>8} {r['buffer_bytes'] / 1e6:>10.1f} "
            f"{above / 1e6:>19.1f} {above / r['buffer_bytes']:>9.2f}"
        )


if __name__ == "__main__":
    main()

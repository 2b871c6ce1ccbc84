"""Time the shuffle's gather pass alone on a ~1 GB cache of a 1024-wide model.

    python benchmarks/gather_speed.py [--gb 1.0] [--buffers 4] [--folder DIR]

Scatters synthetic float32 buffers (context 128, width 1024) into bucket files in a
first process, then gathers them in a fresh process and prints the gather's GB/s
(bytes of the final shards over its wall time, fsync included) and that process's
peak RSS. Not a test: numbers depend on the disk and the page cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T, D = 128, 1024


def _sink(folder: Path, n_buckets: int):
    from sae_cache_ext.shuffle import BucketShuffleSink
    from sae_cache_ext.writer import CacheSchema

    schema = CacheSchema(hooks=(("hook", D),), context_size=T, dtype="float32")
    return BucketShuffleSink(folder, schema, seed=1, n_buckets=n_buckets)


def scatter(folder: Path, gb: float, buffers: int) -> None:
    import torch

    rows = int(gb * 1e9 / (T * D * 4)) // buffers
    sink = _sink(folder, buffers)
    generator = torch.Generator().manual_seed(0)
    for i in range(buffers):
        acts = torch.randn(rows, T, D, generator=generator)
        toks = torch.randint(0, 50000, (rows, T), generator=generator)
        sink.write_buffer(i, acts, toks)
        del acts, toks
    sink.close()
    (folder / "state.json").write_text(json.dumps(sink.state().to_json()))


def gather(folder: Path, buffers: int) -> None:
    from sae_cache_ext.shuffle import BucketState

    sink = _sink(folder, buffers)
    sink.restore(BucketState.from_json(json.loads((folder / "state.json").read_text())))
    start = time.perf_counter()
    shards = sink.finish(quiet=True)
    seconds = time.perf_counter() - start
    nbytes = sum(s.nbytes for s in shards[""])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "gb": nbytes / 1e9, "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--buffers", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--phase", choices=["scatter", "gather"], default=None)
    args = parser.parse_args()
    if args.phase == "scatter":
        return scatter(args.folder, args.gb, args.buffers)
    if args.phase == "gather":
        return gather(args.folder, args.buffers)
    folder = Path(tempfile.mkdtemp(dir=args.folder))
    try:
        base = [sys.executable, __file__, "--gb", str(args.gb)]
        base += ["--buffers", str(args.buffers), "--folder", str(folder)]
        subprocess.run([*base, "--phase", "scatter"], check=True)
        out = subprocess.run(
            [*base, "--phase", "gather"], check=True, capture_output=True, text=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"gather: {result['gb']:.2f} GB in {result['seconds']:.2f} s = "
            f"{result['gb'] / result['seconds']:.2f} GB/s; peak RSS of the gather "
            f"process {result['peak_rss'] / 1e9:.2f} GB ({args.buffers} buffers of "
            f"{result['gb'] / args.buffers:.2f} GB)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One rank of a data-parallel run under torchrun: `sae-cache-ext run CONFIG`, with
this rank killed (SIGKILL) before its n-th buffer write when asked, or failing
there with an exception (`--fail`).

    torchrun ... tests/dp_child.py CONFIG [--kill-rank R --kill-at N --kill-in F]
                                         [--fail]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from sae_cache_ext import shuffle
from sae_cache_ext.cli import main
from sae_cache_ext.shard_files import ShardFiles


def _kill_on_call(owner: object, name: str, n: int, fail: bool) -> None:
    real = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            if fail:
                raise RuntimeError(f"injected failure at {name} call {n}")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-at", type=int, default=2)
    parser.add_argument(
        "--kill-in", choices=["write_buffer", "shard"], default="write_buffer"
    )
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    if args.kill_rank is not None and int(os.environ["RANK"]) == args.kill_rank:
        if args.kill_in == "write_buffer":  # a buffer of this rank's caching
            for sink in (shuffle.BucketShuffleSink, shuffle.OrderedSink):
                _kill_on_call(sink, "write_buffer", args.kill_at, args.fail)
        else:  # a shard of this rank's share of the shuffle's gather
            _kill_on_call(ShardFiles, "__init__", args.kill_at, args.fail)
    sys.exit(main(["run", args.config, "--quiet"]))

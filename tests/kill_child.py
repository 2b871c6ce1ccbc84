"""A caching run that SIGKILLs itself at a chosen point; used by test_crash.py.

Usage: python -m tests.kill_child SPEC_JSON
SPEC_JSON holds the tokenizer folder, the model's saved weights, the config kwargs,
and `kill`: `[target, n]`: the process kills itself with SIGKILL right before the
n-th call of `target` ("os.rename", "Path.rmdir", "shard", "write_buffer",
"write_json_atomic"), or never when `kill` is null.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _kill_before_call(owner, name: str, n: int) -> None:
    from tests.helpers import before_nth_call

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, before_nth_call(getattr(owner, name), n, kill))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    from sae_cache_ext import (
        CacheActivationsRunner,
        CacheActivationsRunnerConfig,
        manifest,
        shuffle,
    )
    from sae_cache_ext.shard_files import ShardFiles
    from tests.fixtures import build_corpus, build_model

    model = build_model(Path(spec["tokenizer_dir"]))
    model.load_state_dict(torch.load(spec["weights"]))
    if spec["kill"] is not None:
        target, n = spec["kill"]
        owners = {
            "os.rename": (os, "rename"),
            "Path.rmdir": (Path, "rmdir"),
            "shard": (ShardFiles, "__init__"),  # a shard is started
            "write_buffer": (shuffle.BucketShuffleSink, "write_buffer"),
            "write_json_atomic": (manifest, "write_json_atomic"),
        }
        _kill_before_call(*owners[target], n)
    cfg = CacheActivationsRunnerConfig(**spec["cfg"])
    CacheActivationsRunner(
        cfg, override_dataset=build_corpus(), override_model=model, quiet=True
    ).run()


if __name__ == "__main__":
    main()

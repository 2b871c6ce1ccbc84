"""SIGKILL a caching subprocess at chosen points (mid-caching, mid-shuffle, each
step of the swap): the output path never holds a dataset that loads but differs from
the finished one, and a plain rerun cleans up, warns, and completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from sae_cache_ext.staging import Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import columns, run_ours

ROOT = Path(__file__).resolve().parent.parent

# (target, n): kill right before the n-th call of target. With 3 buffers and
# shuffle=True: write_buffer 2 is mid-caching; shard 2 is mid-gather (the 2nd shard started);
# the swap renames the empty output folder aside (os.rename 1 is the bucket
# shard's... counted below), then moves staging in, then removes the backup.
KILL_POINTS = [
    ("write_buffer", 2),
    ("shard", 2),
    ("write_json_atomic", 3),
    ("os.rename", -1),  # the swap's first rename (resolved at run time)
    ("os.rename", -2),  # the swap's second rename
    ("Path.rmdir", -1),  # the swap's backup removal
]
FAST = {("shard", 2), ("os.rename", -2)}


def _cfg_kwargs(tmp_path: Path) -> dict:
    return default_cfg_kwargs(
        tmp_path, shuffle=True, shuffle_across_sequences=True, seed=3
    )


def _count_calls(tmp_path, tiny_model, corpus, monkeypatch) -> dict[str, int]:
    """Run once in-process, counting calls, to place the swap's kill points."""
    counts = {"os.rename": 0, "Path.rmdir": 0}
    real_rename, real_rmdir = os.rename, Path.rmdir

    def rename(*a, **k):
        counts["os.rename"] += 1
        return real_rename(*a, **k)

    def rmdir(*a, **k):
        counts["Path.rmdir"] += 1
        return real_rmdir(*a, **k)

    from sae_cache_ext import CacheActivationsRunnerConfig

    cfg = CacheActivationsRunnerConfig(**_cfg_kwargs(tmp_path / "count"))
    Path(cfg.new_cached_activations_path).mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        m.setattr(Path, "rmdir", rmdir)
        run_ours(cfg, tiny_model, corpus)
    return counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, corpus):
    from sae_cache_ext import CacheActivationsRunnerConfig

    tmp = tmp_path_factory.mktemp("reference")
    cfg = CacheActivationsRunnerConfig(**_cfg_kwargs(tmp))
    return columns(run_ours(cfg, tiny_model, corpus))


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(
            k, marks=() if k in FAST else pytest.mark.slow, id=f"{k[0]}-{k[1]}"
        )
        for k in KILL_POINTS
    ],
)
def test_sigkill_never_exposes_a_wrong_dataset_and_a_rerun_completes(
    tmp_path, tiny_model, tokenizer_dir, corpus, reference, monkeypatch, caplog, kill
):
    target, n = kill
    if n < 0:
        calls = _count_calls(tmp_path, tiny_model, corpus, monkeypatch)
        n = calls[target] + 1 + n  # -1: the last call, -2: the one before
    weights = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), weights)
    cfg_kwargs = _cfg_kwargs(tmp_path / "run")
    out = Path(cfg_kwargs["new_cached_activations_path"])
    out.mkdir(parents=True)  # an empty output folder, so the swap has a step 1
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "tokenizer_dir": str(tokenizer_dir),
                "weights": str(weights),
                "cfg": cfg_kwargs,
                "kill": [target, n],
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kill_child", str(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    # The invariant: the output path holds nothing that loads, or the finished data.
    try:
        leftover = load_from_disk(str(out))
    except Exception:
        leftover = None
    if leftover is not None:
        acts, toks = columns(leftover)
        assert acts.tobytes() == reference[0].tobytes()
        assert np.array_equal(toks, reference[1])

    # A plain rerun of the same config cleans up, warns and completes.
    from sae_cache_ext import CacheActivationsRunnerConfig

    with caplog.at_level("WARNING"):
        dataset = run_ours(
            CacheActivationsRunnerConfig(**cfg_kwargs), tiny_model, corpus
        )
    assert caplog.records, "the rerun should warn about the interrupted run"
    acts, toks = columns(dataset)
    assert acts.tobytes() == reference[0].tobytes()
    assert np.array_equal(toks, reference[1])
    layout = Layout.for_output(out)
    assert not layout.staging.exists() and not layout.backup.exists()
    assert sorted(p.name for p in tmp_path.joinpath("run").iterdir()) == ["cache"]

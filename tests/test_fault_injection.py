"""Fault injection: SIGKILL a caching run at many points and resume it; fail a write.

- With `resume=True`, a run killed anywhere (while caching, in the shuffle's scatter
  or gather, while writing the manifest, during the swap, or right after it) and then
  rerun with the same config ends with the uninterrupted run's dataset, byte for byte
  (rows, order, activations, the manifest's shard list with its sha256s), leaves no
  staging or backup folder, and redoes no finished buffer or shard (one of slack).
- A write that fails (a file-size limit: EFBIG) fails the run with an error naming
  the failed write, leaves nothing that loads at the output path, and a rerun without
  the limit succeeds.

The runs happen in `tests/fault_child.py`, which imports and builds the model once
and then forks for every attempt, so a kill costs about a second, not a Python start.
Kill points are drawn with `random.Random(SEED)` from the trace of an uninterrupted
run (the calls of each target per phase); set `SAE_CACHE_EXT_FAULT_SEED` to draw
others. Each kill is "right before the n-th call of" one of `fault_child.KILL_TARGETS`
(patched wherever it is looked up), or a timer thread's SIGKILL after a random delay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import default_cfg_kwargs

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("SAE_CACHE_EXT_FAULT_SEED", "20240611"))
N_BUFFERS = 6  # 6 buffers of 8 rows of 16 tokens: 6 buckets, 6 shards

CONFIGS = {
    "shuffled": {"shuffle": True, "shuffle_across_sequences": True, "seed": 3},
    "ordered": {"shuffle": False},
    # carry-over: the tokens left after packing a buffer start the next one
    "excluded": {"shuffle": True, "exclude_special_tokens": True, "seed": 5},
}
# Kill points per phase (at most; "swap" has three calls: rename the empty output
# folder aside, rename staging into place, remove the backup).
FAST_QUOTAS = {"caching": 1, "gather": 1, "manifest": 1, "swap": 1}
SLOW_QUOTAS = {
    "setup": 1,
    "caching": 4,
    "gather": 3,
    "manifest": 2,
    "swap": 3,
    "done": 1,
}
PHASES_TO_COVER = {"caching", "gather", "manifest", "swap"}


def _cfg_kwargs(**overrides: Any) -> dict[str, Any]:
    # the child sets new_cached_activations_path per run
    return default_cfg_kwargs(
        Path("unused"), training_tokens=N_BUFFERS * 2 * 4 * 16, **overrides
    )


def _run_child(
    tmp_path: Path, tokenizer_dir: Path, tiny_model, spec: dict[str, Any]
) -> dict[str, Any]:
    weights = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), weights)
    spec = {
        **spec,
        "tokenizer_dir": str(tokenizer_dir),
        "weights": str(weights),
        "workdir": str(tmp_path / "work"),
    }
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fault_child", str(spec_path), str(result_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(proc.stdout)
    assert proc.returncode == 0 and result_path.exists(), proc.stderr[-4000:]
    return json.loads(result_path.read_text())


def _describe(s: dict[str, Any]) -> str:
    killed = s.get("killed", {})
    where = f"died in {killed.get('phase')} at {killed.get('last')}"
    if "killed_again" in s:
        where += f", resumed run died in {s['killed_again'].get('phase')}"
    if "skipped" in s:
        return f"{s['config']:8} {s['id']:45} skipped: {s['skipped']}"
    problems = "; ".join(f"[{c}] {m}" for c, m in s["failures"]) or "ok"
    return f"{s['config']:8} {s['id']:45} {where}: {problems}"


def _check_kill_results(results: dict[str, Any], min_points: int) -> None:
    assert results["error"] is None, results["error"]
    for name, info in results["configs"].items():
        assert "error" not in info, f"{name}: {info['error']}"
    scenarios = results["scenarios"]
    report = "\n".join(_describe(s) for s in scenarios)
    print(report)
    killed = [s for s in scenarios if "skipped" not in s]
    assert len(killed) >= min_points, report
    for name in results["configs"]:
        phases = {s["killed"]["phase"] for s in killed if s["config"] == name}
        assert phases >= PHASES_TO_COVER, f"{name} killed only in {phases}"
    failed = [s for s in scenarios if s["failures"]]
    assert not failed, (
        f"{len(failed)} of {len(scenarios)} kill scenarios failed:\n"
        + "\n".join(_describe(s) for s in failed)
    )


def test_a_run_killed_in_each_phase_resumes_to_the_uninterrupted_dataset(
    tmp_path, tokenizer_dir, tiny_model
):
    # 4 points: one each while caching (scatter), gathering, writing the manifest
    # and swapping, with shuffle=True and shuffle_across_sequences=True.
    results = _run_child(
        tmp_path,
        tokenizer_dir,
        tiny_model,
        {
            "mode": "kill",
            "seed": SEED,
            "resume": True,
            "configs": {"shuffled": _cfg_kwargs(**CONFIGS["shuffled"])},
            "quotas": FAST_QUOTAS,
        },
    )
    _check_kill_results(results, min_points=4)


@pytest.mark.slow
def test_runs_killed_at_many_random_points_resume_to_the_uninterrupted_dataset(
    tmp_path, tokenizer_dir, tiny_model
):
    # Per config: up to 14 call kills spread over the phases, 2 timer kills, and one
    # run killed again while resuming: 3 configs, about 50 points.
    results = _run_child(
        tmp_path,
        tokenizer_dir,
        tiny_model,
        {
            "mode": "kill",
            "seed": SEED,
            "resume": True,
            "configs": {name: _cfg_kwargs(**o) for name, o in CONFIGS.items()},
            "quotas": SLOW_QUOTAS,
            "timers": 2,
            "chains": 1,
        },
    )
    _check_kill_results(results, min_points=30)


# -- a write that fails -----------------------------------------------------------------

# Phase -> file-size limit in bytes, set when the phase starts (the gather's: at the
# first shard write, after the buckets are closed). The buckets outgrow 8 KiB after
# a few buffers; every shard is over 4 KiB; state.json and dataset_info.json fit in
# 1 KiB and the finished manifest does not.
WRITE_LIMITS = {"caching": 8192, "gather": 4096, "manifest": 1024}


@pytest.fixture(scope="module")
def write_errors(tmp_path_factory, tokenizer_dir, tiny_model) -> dict[str, Any]:
    cases = [
        {
            "name": f"{phase}{'-resume' if resume else ''}",
            "config_name": "shuffled",
            "config": _cfg_kwargs(**CONFIGS["shuffled"]),
            "phase": phase,
            "limit": limit,
            "resume": resume,
        }
        for resume in (False, True)
        for phase, limit in WRITE_LIMITS.items()
    ]
    results = _run_child(
        tmp_path_factory.mktemp("write_errors"),
        tokenizer_dir,
        tiny_model,
        {"mode": "write_error", "cases": cases},
    )
    assert results["error"] is None, results["error"]
    return {s["name"]: s for s in results["scenarios"]}


def _check_write_error(case: dict[str, Any]) -> None:
    config_errors = [m for c, m in case["failures"] if c == "config"]
    assert not config_errors, config_errors
    limited = case["limited"]
    stderr = limited["stderr"]
    assert limited["status"].startswith("exit ") and limited["status"] != "exit 0", (
        f"the run under the size limit ended with {limited['status']}: {stderr}"
    )
    # The error the user sees is the write's (EFBIG), not a later one masking it.
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "File too large" in lines[-1], stderr
    assert not limited["loads"], "a dataset loads at the output path after the error"
    assert case["rerun"]["status"] == "exit 0", case["rerun"]["stderr"]
    assert not case["failures"], case["failures"]


@pytest.mark.parametrize("phase", list(WRITE_LIMITS))
def test_a_failed_write_fails_the_run_leaves_no_dataset_and_a_rerun_succeeds(
    write_errors, phase
):
    _check_write_error(write_errors[phase])


@pytest.mark.parametrize("phase", list(WRITE_LIMITS))
def test_a_resumed_rerun_after_a_failed_write_gives_the_uninterrupted_dataset(
    write_errors, phase
):
    _check_write_error(write_errors[f"{phase}-resume"])

"""The output path's lease: real processes on one set of files.

A second run, from another UTS namespace (another host name) or this one, refuses
while a live run holds the path, whatever its `resume`; of two runs started at the
same moment exactly one proceeds; a stale lease is taken over, once; a run killed on
this machine is taken over at once; `wait_for_lease` waits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_cache_ext import CacheActivationsRunnerConfig, lease
from sae_cache_ext.lease import Lease, LeaseHeldError
from sae_cache_ext.staging import Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import columns, run_ours

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _spec(tmp_path: Path, name: str, tokenizer_dir, tiny_model, **extra) -> Path:
    weights = tmp_path / "weights.pt"
    if not weights.exists():
        torch.save(tiny_model.state_dict(), weights)
    spec = tmp_path / f"{name}.json"
    spec.write_text(
        json.dumps(
            {
                "tokenizer_dir": str(tokenizer_dir),
                "weights": str(weights),
                "result": str(tmp_path / f"{name}.result.json"),
                **extra,
            }
        )
    )
    return spec


def _child(spec: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "tests.lease_child", str(spec)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _result(spec: Path, proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return json.loads(Path(str(spec).replace(".json", ".result.json")).read_text())


def _listing(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _unshare_uts() -> tuple[str, ...]:
    probe = subprocess.run(
        ["unshare", "--uts", "sh", "-c", "hostname other-node && hostname"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "other-node":
        pytest.skip(f"unshare --uts is not permitted here: {probe.stderr.strip()}")
    return ("unshare", "--uts", "sh", "-c", 'hostname other-node && exec "$0" "$@"')


@pytest.mark.slow  # three processes load the model (about 10 s each on 2 cores)
def test_a_run_from_another_host_name_refuses_a_live_runs_path_whatever_its_resume(
    tmp_path, tokenizer_dir, tiny_model, corpus
):
    prefix = _unshare_uts()
    kwargs = default_cfg_kwargs(tmp_path / "run", shuffle=True)
    ready, go = tmp_path / "ready", tmp_path / "go"
    live_spec = _spec(
        tmp_path,
        "live",
        tokenizer_dir,
        tiny_model,
        cfg=kwargs,
        pause=[2, str(ready), str(go)],  # after one buffer and its checkpoint
    )
    live = _child(live_spec)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert live.poll() is None, live.communicate()[0][-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        layout = Layout.for_output(kwargs["new_cached_activations_path"])
        before = _listing(layout.staging)
        for resume in (False, True):
            spec = _spec(
                tmp_path,
                f"other-{resume}",
                tokenizer_dir,
                tiny_model,
                cfg={**kwargs, "resume": resume},
            )
            result = _result(spec, _child(spec, prefix))
            assert result["error"] == "LeaseHeldError", result
            # who holds it (the live run's host name, not the other namespace's)
            assert f"host {socket.gethostname()}" in result["message"]
            assert (
                "since" in result["message"] and "wait_for_lease" in result["message"]
            )
            assert _listing(layout.staging) == before  # nothing touched
    finally:
        go.touch()
    assert _result(live_spec, live)["ok"]
    reference = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path / "ref", shuffle=True)
    )
    acts, toks = columns(kwargs["new_cached_activations_path"])
    ref_acts, ref_toks = columns(run_ours(reference, tiny_model, corpus))
    assert acts.tobytes() == ref_acts.tobytes() and np.array_equal(toks, ref_toks)
    assert not layout.lease.exists()


@pytest.mark.slow  # two processes load the model
def test_of_two_runs_started_at_the_same_moment_exactly_one_proceeds(
    tmp_path, tokenizer_dir, tiny_model
):
    kwargs = default_cfg_kwargs(tmp_path / "run", shuffle=True, training_tokens=4096)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    specs = [
        _spec(
            tmp_path,
            f"run{i}",
            tokenizer_dir,
            tiny_model,
            cfg=kwargs,
            barrier=[str(barrier), 2],  # both loaded, then both run
        )
        for i in range(2)
    ]
    procs = [_child(spec) for spec in specs]
    results = [_result(spec, proc) for spec, proc in zip(specs, procs, strict=True)]
    assert sorted(r["ok"] for r in results) == [False, True], results
    (failed,) = [r for r in results if not r["ok"]]
    # the loser met the winner's lease (or, had the winner already finished, its
    # finished cache): never a shared staging folder
    assert failed["error"] in ("LeaseHeldError", "FileExistsError"), failed
    layout = Layout.for_output(kwargs["new_cached_activations_path"])
    assert len(columns(layout.final)[1]) == 4096 // 16
    assert not layout.staging.exists() and not layout.lease.exists()


def _stale_lease(path: Path, age: float) -> None:
    """A lease left by a run on another machine (another namespace), not renewed
    for `age` seconds."""
    path.write_text(
        json.dumps(
            {
                "run_id": "gone",
                "host": "node-7",
                "pid": 1234,
                "namespace": "another-boot/pid:[1]",
                "since": "2024-01-01T00:00:00+0000",
            }
        )
    )
    then = time.time() - age
    os.utime(path, (then, then))


def test_a_fresh_lease_of_another_machine_is_respected_and_a_stale_one_taken_over(
    tmp_path,
):
    path = tmp_path / "lease"
    _stale_lease(path, age=5)
    with pytest.raises(LeaseHeldError, match=r"run gone \(host node-7, pid 1234\)"):
        Lease.acquire(path, stale_seconds=60)
    _stale_lease(path, age=61)
    with Lease.acquire(path, stale_seconds=60) as held:
        assert json.loads(path.read_text())["run_id"] == held.run_id
    assert not path.exists()


def _contend(path: str, start_at: float, results) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    try:
        Lease.acquire(Path(path), stale_seconds=60)  # never released: the test reads it
        results.put("won")
        time.sleep(3)  # alive while the others decide (a dead holder is taken over)
    except LeaseHeldError:
        results.put("refused")


def test_a_stale_lease_is_taken_over_by_exactly_one_of_many_contenders(tmp_path):
    path = tmp_path / "lease"
    _stale_lease(path, age=600)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [
        ctx.Process(target=_contend, args=(str(path), start_at, results))
        for _ in range(6)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused"] * 5 + ["won"]


def _acquire_and_die(path: str) -> None:
    Lease.acquire(Path(path))
    os._exit(0)  # dies holding the lease, as a SIGKILLed run does


def test_the_lease_of_a_run_killed_on_this_machine_is_taken_over_at_once(tmp_path):
    path = tmp_path / "lease"
    proc = multiprocessing.get_context("fork").Process(
        target=_acquire_and_die, args=(str(path),)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0 and path.exists()
    with Lease.acquire(path, stale_seconds=3600):  # its pid is gone: no wait
        pass


def test_wait_for_lease_waits_for_the_holder_to_finish(tmp_path):
    path = tmp_path / "lease"
    holder = Lease.acquire(path, stale_seconds=60)
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        waiting = pool.apply_async(_acquire_waiting, (str(path),))
        time.sleep(1.0)
        assert not waiting.ready()
        holder.release()
        assert waiting.get(timeout=30) is True
    assert time.monotonic() - started >= 1.0


def _acquire_waiting(path: str) -> bool:
    with Lease.acquire(Path(path), stale_seconds=1.2, wait=True):
        return True


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    path = tmp_path / "lease"
    held = Lease.acquire(path, stale_seconds=0.6)  # renewed every 0.05 s
    time.sleep(0.3)
    assert lease.read_holder(path).age_seconds < 0.3  # type: ignore[union-attr]
    path.unlink()  # as a takeover would
    path.write_text(json.dumps({"run_id": "other"}))
    time.sleep(0.3)
    assert held.lost
    with pytest.raises(lease.LeaseLostError, match="lost its lease"):
        held.check()
    held.release()
    assert json.loads(path.read_text())["run_id"] == "other"  # not ours to remove


def test_a_just_created_unmarked_staging_folder_of_a_live_run_is_not_deleted(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg()
    layout = Layout.for_output(cfg.new_cached_activations_path)
    # another live run has taken the lease and created its folder, not yet marked
    with Lease.acquire(layout.lease):
        layout.staging.mkdir()
        with pytest.raises(LeaseHeldError, match="in use by another sae-cache-ext run"):
            run_ours(cfg, tiny_model, corpus)
        assert layout.staging.is_dir()


def test_a_lease_its_run_died_creating_is_taken_over_after_a_short_grace(tmp_path):
    # A run killed between creating the lease file and writing its name leaves an
    # empty lease: the next run waits out the grace (the creator would have named
    # it within microseconds), then takes it over, instead of refusing for good.
    path = tmp_path / "lease"
    path.touch()
    assert lease.read_holder(path).run_id is None  # type: ignore[union-attr]
    started = time.monotonic()
    held = Lease.acquire(path, stale_seconds=120)
    waited = time.monotonic() - started
    try:
        assert lease.read_holder(path).run_id == held.run_id  # type: ignore[union-attr]
        assert waited >= lease.UNNAMED_GRACE_SECONDS * 0.5
    finally:
        held.release()


def _die_holding_the_takeover_file(path: str) -> None:
    # a run killed while taking a stale lease over: it removed the lease, and
    # dies before removing its takeover file
    assert lease._create(lease._takeover_path(Path(path)), "killed-run")
    os._exit(0)


def test_a_takeover_file_left_by_a_killed_run_never_outlives_the_next_run(tmp_path):
    path = tmp_path / "lease"
    proc = multiprocessing.get_context("fork").Process(
        target=_die_holding_the_takeover_file, args=(str(path),)
    )
    proc.start()
    proc.join(30)
    mutex = lease._takeover_path(path)
    assert proc.exitcode == 0 and mutex.exists() and not path.exists()
    with Lease.acquire(path, stale_seconds=3600):  # no lease: taken at once
        assert mutex.exists()
    assert not mutex.exists()  # its holder is gone: removed with the lease
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a live contender's takeover file stays
    assert lease._create(mutex, "live")
    with Lease.acquire(path, stale_seconds=3600):
        pass
    assert mutex.exists()


def test_a_stale_lease_behind_a_dead_contenders_takeover_file_is_taken_at_once(
    tmp_path,
):
    path = tmp_path / "lease"
    _stale_lease(path, age=7200)
    proc = multiprocessing.get_context("fork").Process(
        target=_die_holding_the_takeover_file, args=(str(path),)
    )
    proc.start()
    proc.join(30)
    started = time.monotonic()
    with Lease.acquire(path, stale_seconds=3600) as held:
        assert lease.read_holder(path).run_id == held.run_id  # type: ignore[union-attr]
    assert time.monotonic() - started < 30  # not the 3600 s staleness
    assert not lease._takeover_path(path).exists()

"""Caching runs that die at chosen points, each followed by a resumed run; used by
test_fault_injection.py.

Usage: python -m tests.fault_child SPEC_JSON RESULT_JSON

Starting Python and importing torch, sae-lens and datasets costs seconds, a tiny
caching run a fraction of one. So this process imports everything and builds the model
once, then forks for every attempt: a forked child runs one attempt and SIGKILLs
itself (or hits a file-size limit), this process reaps it, forks again for the rerun,
and compares what is left at the output path with an uninterrupted reference run.

Every forked attempt is traced: each call of a probed function (the kill targets and
a few phase markers) appends one line to a trace file with `os.write`, which survives
a SIGKILL. The trace of an uninterrupted run says how many calls of each target a run
makes and in which phase; the trace of a killed run says where it died and how much
work it had finished; the trace of a resumed run says how much work it redid.

Modes (`spec["mode"]`):
- "kill": per config, a reference run, an instrumented uninterrupted run, then kill
  points drawn with `random.Random(spec["seed"])` per phase (`spec["quotas"]`), plus
  `spec["timers"]` kills after a random delay and `spec["chains"]` runs killed twice
  (a call kill, then a timer kill in the resumed run).
- "write_error": per case, a run under `RLIMIT_FSIZE` from a chosen phase on, then a
  rerun without the limit.

RESULT_JSON is rewritten after every scenario, so a crash here still leaves the
scenarios done so far.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import resource
import select
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The targets a kill may hit, "before the n-th call of" each.
KILL_TARGETS = (
    "ActivationsStore.get_raw_llm_batch",  # the model loop: one batch of forwards
    "BucketShuffleSink.write_buffer",  # the shuffle's scatter (writer thread)
    "OrderedSink.write_buffer",  # one buffer -> one shard (writer thread)
    "ShardFiles.__init__",  # a shard is started (the gather, or a buffer's shard)
    "ShardFiles.sync",  # a shard is written, about to be fsynced
    "write_json_atomic",  # marker, state.json, dataset_info.json, manifest, ...
    "os.rename",  # the swap's renames (and recovery's)
    "os.replace",  # write_json_atomic's replace, OrderedSink's shard renames
    "Path.rmdir",  # the swap's backup removal, the bucket folder
    "Path.unlink",  # the gather's bucket deletion
    "Dataset.load_from_disk",  # after the swap: the run is about to return
)
# Probed only to tell the phases apart.
MARKERS = {
    "CacheActivationsRunner.run": "setup",
    "sink.finish": "gather",
    "write_dataset_metadata": "manifest",
    "swap_into_place": "swap",
}
WRITE_BUFFER = ("BucketShuffleSink.write_buffer", "OrderedSink.write_buffer")
SHARD_WRITERS = ("ShardFiles.sync",)  # a shard is on disk when this returns
CACHING_TARGETS = ("ActivationsStore.get_raw_llm_batch", *WRITE_BUFFER)
PHASES = ("init", "setup", "caching", "gather", "manifest", "swap", "done")
# Manifest entries that legitimately differ between two runs of one config, or
# between the same config at two output paths.
VOLATILE_MANIFEST_KEYS = (
    "created",
    "timings",
    "writer",
    "final_path",
    "fingerprint",
    "resumed",  # whether this run continued an interrupted one
)
VOLATILE_CONFIG_KEYS = ("new_cached_activations_path", "resume")
RUN_TIMEOUT = 180.0


# -- tracing and acting inside a forked attempt ------------------------------------


class Probe:
    """Counts calls of every probed function, appends them to a trace file, and runs
    `action` right before the `at`-th call of `target` (`at = (target, n)`)."""

    def __init__(
        self,
        trace: Path,
        at: tuple[str, int] | None = None,
        action: Callable[[], None] | None = None,
    ) -> None:
        self.fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.at = at
        self.action = action
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.log("start", "probe", 0)

    def log(self, event: str, name: str, n: int) -> None:
        # best effort under a file-size limit (EFBIG): the run's own write fails
        with contextlib.suppress(OSError):
            os.write(
                self.fd, f"{event}\t{name}\t{n}\t{time.monotonic():.6f}\n".encode()
            )

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def probed(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.counts[name] += 1
                n = self.counts[name]
            self.log("call", name, n)
            if self.at == (name, n) and self.action is not None:
                self.action()
            result = real(*args, **kwargs)
            self.log("ret", name, n)
            return result

        probed.__wrapped__ = real  # type: ignore[attr-defined]
        return probed

    def install(self) -> list[str]:
        """Patch every probed name where it is looked up; returns what is missing."""
        from datasets import Dataset
        from sae_lens.training.activations_store import ActivationsStore

        from sae_cache_ext import (
            manifest,
            runner,
            shard_files,
            shuffle,
            staging,
            writer,
        )

        attributes: list[tuple[str, Any, str]] = [
            ("os.rename", os, "rename"),
            ("os.replace", os, "replace"),
            ("Path.rmdir", Path, "rmdir"),
            ("Path.unlink", Path, "unlink"),
            (
                "ActivationsStore.get_raw_llm_batch",
                ActivationsStore,
                "get_raw_llm_batch",
            ),
            ("CacheActivationsRunner.run", runner.CacheActivationsRunner, "run"),
            ("Dataset.load_from_disk", Dataset, "load_from_disk"),
        ]
        for sink in ("BucketShuffleSink", "OrderedSink"):
            cls = getattr(shuffle, sink, None)
            attributes += [
                (f"{sink}.write_buffer", cls, "write_buffer"),
                ("sink.finish", cls, "finish"),
            ]
        attributes += [
            ("ShardFiles.__init__", shard_files.ShardFiles, "__init__"),
            ("ShardFiles.sync", shard_files.ShardFiles, "sync"),
        ]
        functions = [
            ("write_json_atomic", getattr(writer, "write_json_atomic", None)),
            (
                "write_dataset_metadata",
                getattr(manifest, "write_dataset_metadata", None),
            ),
            ("swap_into_place", getattr(staging, "swap_into_place", None)),
        ]
        missing = []
        for name, owner, attribute in attributes:
            real = getattr(owner, attribute, None) if owner is not None else None
            if real is None:
                missing.append(name)
                continue
            probed = self.wrap(name, real)
            if isinstance(inspect.getattr_static(owner, attribute), staticmethod):
                probed = staticmethod(probed)
            setattr(owner, attribute, probed)
        for name, real in functions:
            if real is None:
                missing.append(name)
                continue
            probed = self.wrap(name, real)
            for module_name, module in list(sys.modules.items()):
                if module_name.split(".")[0] != "sae_cache_ext" or module is None:
                    continue
                for attribute, value in list(vars(module).items()):
                    if value is real:
                        setattr(module, attribute, probed)
        return missing


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def limit_file_size(limit: int) -> Callable[[], None]:
    # EFBIG instead of death, set here (a signal handler can only be set on the main
    # thread) and inherited by the forked attempt, whose shard may sync on another
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    return apply


# -- reading a trace ----------------------------------------------------------------


@dataclass
class Event:
    kind: str  # "start" (the probe is installed), "call" or "ret"
    name: str
    n: int
    time: float
    phase: str


def read_trace(path: Path) -> list[Event]:
    """The trace's events, each with the phase the run was in at that event."""
    events = []
    phase = "init"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 4:
            continue  # a line cut by the kill
        kind, name, n, at = parts[0], parts[1], int(parts[2]), float(parts[3])
        if kind == "call" and name in MARKERS:
            phase = MARKERS[name]
        elif kind == "call" and name in CACHING_TARGETS and phase == "setup":
            phase = "caching"
        events.append(Event(kind, name, n, at, phase))
        if kind == "ret" and name == "swap_into_place":
            phase = "done"
    return events


def work_done(events: list[Event]) -> dict[str, Any]:
    """Where a traced attempt stopped, and what it had finished by then."""
    names = {e.name for e in events}
    shard_writer = next((w for w in SHARD_WRITERS if w in names), SHARD_WRITERS[0])
    return {
        "phase": events[-1].phase if events else "init",
        "last": f"{events[-1].kind} {events[-1].name}#{events[-1].n}"
        if events
        else None,
        "buffers_written": sum(
            e.kind == "ret" and e.name in WRITE_BUFFER for e in events
        ),
        "shards_gathered": sum(
            e.kind == "ret" and e.name == shard_writer and e.phase == "gather"
            for e in events
        ),
        "forward_batches": sum(
            e.kind == "call" and e.name == "ActivationsStore.get_raw_llm_batch"
            for e in events
        ),
        "buffers_started": sum(
            e.kind == "call" and e.name in WRITE_BUFFER for e in events
        ),
        "gather_writes": sum(
            e.kind == "call" and e.name == shard_writer and e.phase == "gather"
            for e in events
        ),
    }


# -- forking --------------------------------------------------------------------------


def run_in_fork(
    body: Callable[[], None], log: Path, timeout: float = RUN_TIMEOUT
) -> str:
    """Run `body` in a forked child; its stdout/stderr come back through a pipe
    (a file would be under the child's file-size limit) and are saved to `log`.

    Returns 'exit 0', 'exit 1', 'SIGKILL', ... or 'timeout' (the child is then
    killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    output = bytearray()
    deadline = time.monotonic() + timeout
    timed_out = False
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], 0.05)
            if ready:
                chunk = pipe.read(65536)
                if not chunk:
                    break  # the child is gone
                output += chunk
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
    _, status = os.waitpid(pid, 0)
    log.write_bytes(bytes(output))
    if timed_out:
        return "timeout"
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def tail(path: Path, n: int = 2500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def last_line(path: Path) -> str:
    """The last line of a log that is not a warning: the exception, usually."""
    lines = [
        line
        for line in tail(path).splitlines()
        if line.strip() and "warn" not in line.lower()
    ]
    return lines[-1] if lines else "(empty log)"


# -- what a finished cache holds ----------------------------------------------------


def snapshot(folder: Path) -> dict[str, Any] | None:
    """A comparable summary of the dataset at `folder`, or None when none loads."""
    import hashlib

    import numpy as np
    from datasets import load_from_disk

    from sae_cache_ext.staging import MARKER
    from sae_cache_ext.writer import file_sha256

    try:
        dataset = load_from_disk(str(folder))
    except Exception:
        return None
    (hook,) = [c for c in dataset.column_names if c != "token_ids"]
    data = dataset.with_format("numpy")
    acts = np.ascontiguousarray(np.asarray(data[hook]))
    toks = np.ascontiguousarray(np.asarray(data["token_ids"]))
    del data, dataset
    try:
        manifest = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        manifest = {}
    shards = manifest.get("shards") or []
    on_disk = {}
    for shard in shards:
        path = folder / str(shard.get("filename"))
        on_disk[shard.get("filename")] = file_sha256(path) if path.exists() else None
    return {
        "rows": int(acts.shape[0]),
        "acts_sha256": hashlib.sha256(acts.tobytes()).hexdigest(),
        "toks_sha256": hashlib.sha256(toks.tobytes()).hexdigest(),
        "manifest": manifest,
        "shards": shards,
        "shards_on_disk": on_disk,
        "files": sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
        ),
    }


def compare(got: dict[str, Any] | None, ref: dict[str, Any]) -> list[tuple[str, str]]:
    """(category, message) for every way `got` differs from the reference."""
    if got is None:
        return [("data", "no dataset loads at the output path")]
    problems = []
    if got["rows"] != ref["rows"]:
        problems.append(("data", f"{got['rows']} rows, reference {ref['rows']}"))
    if got["acts_sha256"] != ref["acts_sha256"]:
        problems.append(("data", "activations differ from the reference"))
    if got["toks_sha256"] != ref["toks_sha256"]:
        problems.append(("data", "token ids differ from the reference"))
    if got["shards"] != ref["shards"]:
        problems.append(
            (
                "shards",
                "manifest shards differ: "
                f"{[(s.get('filename'), s.get('rows'), str(s.get('sha256'))[:12]) for s in got['shards']]}"
                f" vs reference "
                f"{[(s['filename'], s['rows'], s['sha256'][:12]) for s in ref['shards']]}",
            )
        )
    bad = [
        s.get("filename")
        for s in got["shards"]
        if got["shards_on_disk"].get(s.get("filename")) != s.get("sha256")
    ]
    if bad:
        problems.append(("shards", f"files whose sha256 is not the manifest's: {bad}"))
    extra = sorted(set(got["files"]) - set(ref["files"]))
    missing = sorted(set(ref["files"]) - set(got["files"]))
    if extra or missing:
        problems.append(
            (
                "leftovers",
                f"the dataset folder holds {extra} too and lacks {missing}",
            )
        )
    diff = manifest_diff(got["manifest"], ref["manifest"])
    if diff:
        problems.append(("manifest", f"manifest entries differ: {diff}"))
    return problems


def manifest_diff(got: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Keys (dotted, one level into dicts) whose values differ, volatile ones aside
    (`config.resume` too: the reference runs without it)."""
    diffs = []
    for key in sorted(set(got) | set(ref)):
        if key in VOLATILE_MANIFEST_KEYS or key == "shards":
            continue
        a, b = got.get(key), ref.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if key == "config" and sub in VOLATILE_CONFIG_KEYS:
                    continue
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!r} vs {b.get(sub)!r}")
        elif a != b:
            diffs.append(f"{key}: {a!r} vs {b!r}")
    return diffs


def leftovers(run_dir: Path) -> list[str]:
    """Anything beside the output folder `cache` in its parent folder."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != "cache")


# -- the driver -------------------------------------------------------------------------


class Driver:
    def __init__(self, spec: dict[str, Any], result_path: Path) -> None:
        import torch

        from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
        from tests.fixtures import build_corpus, build_model

        self.spec = spec
        self.result_path = result_path
        self.work = Path(spec["workdir"])
        self.runner_cls = CacheActivationsRunner
        self.cfg_cls = CacheActivationsRunnerConfig
        self.model = build_model(Path(spec["tokenizer_dir"]))
        self.model.load_state_dict(torch.load(spec["weights"]))
        self.corpus = build_corpus()
        self.results: dict[str, Any] = {
            "mode": spec["mode"],
            "seed": spec.get("seed"),
            "configs": {},
            "scenarios": [],
            "error": None,
        }
        self.references: dict[str, dict[str, Any]] = {}

    def save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.result_path)

    def cfg(self, kwargs: dict[str, Any], out: Path, resume: bool) -> Any:
        values = {**kwargs, "new_cached_activations_path": str(out)}
        if resume:
            values["resume"] = True
        return self.cfg_cls(**values)

    def run(self, cfg: Any) -> None:
        self.runner_cls(
            cfg, override_dataset=self.corpus, override_model=self.model, quiet=True
        ).run()

    def attempt(
        self,
        cfg: Any,
        folder: Path,
        name: str,
        at: tuple[str, int] | None = None,
        action: Callable[[], None] | None = None,
        timer: float | None = None,
    ) -> tuple[str, list[Event], float, Path]:
        """One traced run in a fork: (status, trace events, seconds, log path)."""
        trace, log = folder / f"{name}.trace", folder / f"{name}.log"

        def body() -> None:
            probe = Probe(trace, at, action)
            missing = probe.install()
            if missing:
                print(f"not probed (missing): {missing}", file=sys.stderr)
            if timer is not None:
                killer = threading.Timer(timer, sigkill_self)
                killer.daemon = True
                killer.start()
            self.run(cfg)

        start = time.perf_counter()
        status = run_in_fork(body, log)
        return status, read_trace(trace), time.perf_counter() - start, log

    def reference(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """An uninterrupted run in this process, with every new option at its
        default (no `resume`)."""
        if name not in self.references:
            out = self.work / name / "reference" / "cache"
            out.mkdir(parents=True)
            start = time.perf_counter()
            self.run(self.cfg(kwargs, out, resume=False))
            ref = snapshot(out)
            assert ref is not None, f"the reference run for {name} did not load"
            ref["seconds"] = time.perf_counter() - start
            self.references[name] = ref
        return self.references[name]

    # -- mode "kill" ------------------------------------------------------------

    def kill_mode(self) -> None:
        rng = random.Random(self.spec["seed"])
        resume = bool(self.spec.get("resume", True))
        plan = []
        for name, kwargs in self.spec["configs"].items():
            ref = self.reference(name, kwargs)
            folder = self.work / name / "probe"
            (folder / "run" / "cache").mkdir(parents=True)
            try:
                cfg = self.cfg(kwargs, folder / "run" / "cache", resume)
            except Exception as error:
                self.results["error"] = f"{type(error).__name__}: {error}"
                self.save()
                return
            status, events, seconds, log = self.attempt(cfg, folder, "run")
            info: dict[str, Any] = {
                "reference_seconds": ref["seconds"],
                "uninterrupted_seconds": seconds,
                "uninterrupted_status": status,
                "calls": dict(Counter(e.name for e in events if e.kind == "call")),
                "calls_per_phase": {
                    phase: dict(
                        Counter(
                            e.name
                            for e in events
                            if e.kind == "call"
                            and e.phase == phase
                            and e.name in KILL_TARGETS
                        )
                    )
                    for phase in PHASES
                },
                "work": work_done(events),
            }
            self.results["configs"][name] = info
            problems = compare(snapshot(folder / "run" / "cache"), ref)
            if status != "exit 0" or problems:
                info["error"] = (
                    f"the uninterrupted resume={resume} run ended with {status}: "
                    f"{problems} {tail(log)}"
                )
                self.save()
                continue
            for point in draw_points(events, self.spec, rng):
                plan.append((name, kwargs, point))
        self.save()
        for index, (name, kwargs, point) in enumerate(plan):
            record = self.kill_scenario(index, name, kwargs, point, resume)
            self.results["scenarios"].append(record)
            self.save()
            verdict = (
                "FAIL " + "; ".join(f"{c}: {m}" for c, m in record["failures"])
                if record["failures"]
                else f"skipped: {record['skipped']}"
                if "skipped" in record
                else "ok"
            )
            print(
                f"[{index + 1}/{len(plan)}] {record['id']} died in "
                f"{record['killed']['phase']} -> {verdict[:300]} "
                f"({record['seconds']:.1f}s)",
                flush=True,
            )

    def kill_scenario(
        self,
        index: int,
        name: str,
        kwargs: dict[str, Any],
        point: dict[str, Any],
        resume: bool,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        ref = self.references[name]
        uninterrupted = self.results["configs"][name]["work"]
        folder = self.work / name / f"{index:03d}"
        out = folder / "run" / "cache"
        out.mkdir(parents=True)  # an empty output folder: the swap has 3 steps
        cfg = self.cfg(kwargs, out, resume)
        record: dict[str, Any] = {"config": name, **point, "failures": []}
        failures = record["failures"]

        kills = [point]
        if point["kind"] == "chain":
            kills = [
                {"kind": "call", "target": point["target"], "n": point["n"]},
                {"kind": "timer", "delay": point["delay"]},
            ]
        for attempt_no, kill in enumerate(kills):
            name_ = f"killed{attempt_no}"
            if kill["kind"] == "timer":
                status, events, _, log = self.attempt(
                    cfg, folder, name_, timer=kill["delay"]
                )
            else:
                at = (kill["target"], kill["n"])
                status, events, _, log = self.attempt(
                    cfg, folder, name_, at=at, action=sigkill_self
                )
            done = {"status": status, **work_done(events)}
            record["killed" if attempt_no == 0 else "killed_again"] = done
            if status == "exit 0" and kill["kind"] == "timer":
                done["phase"] = "finished"
                if attempt_no == 0:
                    record["skipped"] = "the run finished before the timer fired"
                else:  # the resumed run finished before the second kill
                    failures += self.check_finished(out, ref)
                record["seconds"] = time.perf_counter() - start
                return record
            if status != "SIGKILL":
                failures.append(
                    (
                        "killed run",
                        f"attempt {attempt_no} ended with {status}: {last_line(log)}",
                    )
                )
                record["log"] = tail(log)
                record["seconds"] = time.perf_counter() - start
                return record
            # What a kill leaves must never load as a different dataset.
            left = snapshot(out)
            if left is not None and (
                left["acts_sha256"] != ref["acts_sha256"]
                or left["toks_sha256"] != ref["toks_sha256"]
            ):
                failures.append(
                    ("exposed", "after the kill the output path loads wrong data")
                )

        status, events, seconds, log = self.attempt(cfg, folder, "resumed")
        redo = work_done(events)
        record["resumed"] = {"status": status, "seconds": seconds, **redo}
        if status != "exit 0":
            failures.append(
                ("resume", f"the resumed run ended with {status}: {last_line(log)}")
            )
            record["log"] = tail(log)
        else:
            failures += self.check_finished(out, ref)
            failures += redo_problems(record["killed"], redo, uninterrupted, point)
        record["seconds"] = time.perf_counter() - start
        return record

    @staticmethod
    def check_finished(out: Path, ref: dict[str, Any]) -> list[tuple[str, str]]:
        """The finished cache at `out` against the reference, and nothing left
        beside it."""
        problems = compare(snapshot(out), ref)
        extra = leftovers(out.parent)
        if extra:
            problems.append(("leftovers", f"beside the output path: {extra}"))
        return problems

    # -- mode "write_error" ---------------------------------------------------------

    def write_error_mode(self) -> None:
        from sae_cache_ext.staging import Layout

        shard_writer = SHARD_WRITERS[0]

        for case in self.spec["cases"]:
            start = time.perf_counter()
            ref = self.reference(case["config_name"], case["config"])
            folder = self.work / "write-error" / case["name"]
            out = folder / "run" / "cache"
            out.mkdir(parents=True)
            record: dict[str, Any] = {"name": case["name"], "failures": []}
            self.results["scenarios"].append(record)
            try:
                cfg = self.cfg(case["config"], out, case["resume"])
            except Exception as error:
                record["failures"].append(
                    ("config", f"{type(error).__name__}: {error}")
                )
                self.save()
                continue
            marker = {
                "caching": "CacheActivationsRunner.run",
                "gather": shard_writer,  # the first shard, after the buckets close
                "manifest": "write_dataset_metadata",
            }[case["phase"]]
            status, events, _, log = self.attempt(
                cfg,
                folder,
                "limited",
                at=(marker, 1),
                action=limit_file_size(case["limit"]),
            )
            layout = Layout.for_output(out)
            record["limited"] = {
                "status": status,
                "stderr": tail(log, 4000),
                **work_done(events),
                "loads": snapshot(out) is not None,
                "staging_left": layout.staging.exists(),
                "backup_left": layout.backup.exists(),
                "output_files": sorted(p.name for p in out.iterdir())
                if out.is_dir()
                else None,
            }
            status, events, seconds, log = self.attempt(cfg, folder, "rerun")
            record["rerun"] = {
                "status": status,
                "stderr": tail(log),
                "seconds": seconds,
            }
            if status == "exit 0":
                record["failures"] += compare(snapshot(out), ref)
                extra = leftovers(out.parent)
                if extra:
                    record["failures"].append(
                        ("leftovers", f"beside the output path: {extra}")
                    )
            else:
                record["failures"].append(
                    ("rerun", f"the rerun ended with {status}: {tail(log)}")
                )
            record["seconds"] = time.perf_counter() - start
            self.save()
            print(
                f"{case['name']}: limited run {record['limited']['status']}, rerun "
                f"{status} ({record['seconds']:.1f}s)",
                flush=True,
            )


def redo_problems(
    killed: dict[str, Any],
    redo: dict[str, Any],
    uninterrupted: dict[str, Any],
    point: dict[str, Any],
) -> list[tuple[str, str]]:
    """A resumed run continues from the last completed buffer (or gathered shard):
    it redoes no finished phase, and at most one buffer/shard of slack (one whose
    bookkeeping the kill may have cut off)."""
    if point["kind"] == "chain":
        return []  # the second kill's progress is what counts; not tracked here
    problems = []
    phase = killed["phase"]
    after_caching = phase in ("gather", "manifest", "swap", "done", "finished")
    total_buffers = uninterrupted["buffers_written"]
    if after_caching:
        if redo["buffers_started"] or redo["forward_batches"]:
            problems.append(
                (
                    "redo",
                    f"killed in {phase} after all {total_buffers} buffers were "
                    f"written, the resumed run recomputed {redo['forward_batches']} "
                    f"batches and rewrote {redo['buffers_started']} buffers",
                )
            )
    else:
        allowed = total_buffers - killed["buffers_written"] + 1
        # the forwards those buffers need, and one batch of carry-over
        per_buffer = uninterrupted["forward_batches"] / max(total_buffers, 1)
        allowed_forward = math.ceil(per_buffer * allowed) + 1
        if (
            redo["buffers_started"] > allowed
            or redo["forward_batches"] > allowed_forward
        ):
            problems.append(
                (
                    "redo",
                    f"killed with {killed['buffers_written']}/{total_buffers} buffers "
                    f"written, the resumed run wrote {redo['buffers_started']} buffers "
                    f"and ran {redo['forward_batches']} batches (at most {allowed} "
                    f"and {allowed_forward} expected)",
                )
            )
    total_shards = uninterrupted["shards_gathered"]
    if phase in ("manifest", "swap", "done", "finished") and redo["gather_writes"]:
        problems.append(
            (
                "redo",
                f"killed in {phase} after the gather, the resumed run rewrote "
                f"{redo['gather_writes']} shards",
            )
        )
    elif phase == "gather" and total_shards:
        allowed = total_shards - killed["shards_gathered"] + 1
        if redo["gather_writes"] > allowed:
            problems.append(
                (
                    "redo",
                    f"killed with {killed['shards_gathered']}/{total_shards} shards "
                    f"gathered, the resumed run wrote {redo['gather_writes']} "
                    f"(at most {allowed} expected)",
                )
            )
    return problems


def draw_points(
    events: list[Event], spec: dict[str, Any], rng: random.Random
) -> list[dict[str, Any]]:
    """Kill points from an uninterrupted run's trace: per phase, up to
    `quotas[phase]` calls, cycling over the phase's targets in random order so one
    busy target does not take every slot; then timer kills (a delay drawn over most
    of the traced run's span) and chained kills (a call kill, then a timer kill of the
    resumed run)."""
    # later attempts run a little faster than this first one: aim inside the run
    seconds = 0.75 * (events[-1].time - events[0].time) if events else 0.0
    by_phase: dict[str, dict[str, list[int]]] = {}
    for e in events:
        if e.kind == "call" and e.name in KILL_TARGETS:
            by_phase.setdefault(e.phase, {}).setdefault(e.name, []).append(e.n)
    points = []
    for phase, quota in spec["quotas"].items():
        targets = {t: list(ns) for t, ns in by_phase.get(phase, {}).items()}
        order = sorted(targets)
        rng.shuffle(order)
        taken = 0
        while taken < quota and any(targets.values()):
            for target in order:
                if taken >= quota or not targets[target]:
                    continue
                n = targets[target].pop(rng.randrange(len(targets[target])))
                points.append(
                    {
                        "id": f"{target}#{n}",
                        "kind": "call",
                        "target": target,
                        "n": n,
                        "drawn_in": phase,
                    }
                )
                taken += 1
    for _ in range(spec.get("timers", 0)):
        delay = round(rng.uniform(0.0, seconds), 3)
        points.append({"id": f"timer {delay:.3f}s", "kind": "timer", "delay": delay})
    calls = [p for p in points if p["kind"] == "call"]
    for _ in range(spec.get("chains", 0)):
        first = rng.choice(calls)
        delay = round(rng.uniform(0.0, seconds), 3)
        points.append(
            {
                "id": f"{first['id']} then timer {delay:.3f}s",
                "kind": "chain",
                "target": first["target"],
                "n": first["n"],
                "delay": delay,
                "drawn_in": first["drawn_in"],
            }
        )
    return points


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch

    # One intra-op thread: the machine is small, and forking a process whose
    # OpenMP pool is running is not safe.
    torch.set_num_threads(1)
    driver = Driver(spec, result_path)
    try:
        if spec["mode"] == "kill":
            driver.kill_mode()
        else:
            driver.write_error_mode()
    except BaseException:
        driver.results["error"] = traceback.format_exc()
        raise
    finally:
        driver.save()


if __name__ == "__main__":
    main()

"""Running the arms: each run in a fresh process forked from one server process
(`serve`, which has imported torch/sae-lens but run nothing, so imports are paid
once), arms alternating within each repeat, and every run's record put together
with the environment into the report.

`serve` and the functions before it run in the server and its forked children; the
rest runs in the benchmark's own process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_cache_ext.bench import arms
from sae_cache_ext.bench.report import build_report
from sae_cache_ext.bench.setups import BenchPlan, ModelSetup

# The package's logger, as before the benchmark was split into modules.
logger = logging.getLogger("sae_cache_ext.bench")

MB = 1e6

# The folder that holds `sae_cache_ext/` (the child imports it from there).
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
_PRELOAD = (
    "torch",
    "datasets",
    "transformers",
    "sae_lens",
    "sae_cache_ext.runner",
    "sae_cache_ext.toy",
    "sae_cache_ext.models",
)
_SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


# -- in a run's process -----------------------------------------------------------------


def _run_arm(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    setup = ModelSetup(**{**job["setup"], "hook_set": tuple(job["setup"]["hook_set"])})
    loading = time.perf_counter()
    model = corpus = None
    if job["arm"] not in arms.NO_MODEL_ARMS:
        model, corpus = arms.load_model_and_corpus(setup, job.get("tokenizer_dir"))
    load_seconds = time.perf_counter() - loading
    run = arms.RUNS[job["arm"]]
    record = run(setup, model, corpus, Path(job["run_dir"]), job["disk_interval"])
    record.update(
        load_seconds=load_seconds,
        pid=os.getpid(),
        activation_bytes=setup.activation_bytes,
        buffer_bytes=setup.buffer_bytes,
        device=setup.device,
    )
    return record


def _run_job(job: dict[str, Any]) -> int:
    """In a forked process: send output to the job's log, run it, write its result."""
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    import warnings

    warnings.filterwarnings("ignore")
    if job["kind"] == "prepare-tiny":
        from sae_cache_ext.toy import build_tokenizer

        build_tokenizer(Path(job["tokenizer_dir"]))
        result: dict[str, Any] = {}
    else:
        result = _run_arm(job)
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def serve() -> int:
    """The fork server: import the heavy modules once, then for each job line on
    stdin fork a fresh process to run it, and answer with its exit status."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while line := sys.stdin.readline():
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = _run_job(job)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        sys.stdout.write(
            json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}) + "\n"
        )
        sys.stdout.flush()
    return 0


# -- in the benchmark's process ---------------------------------------------------------


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ForkServer:
    """Runs jobs, one fresh forked process each, through `serve()` in a subprocess."""

    def __init__(self, workdir: Path, threads: int) -> None:
        self.workdir = workdir
        self.log = workdir / "server.log"
        env = {**os.environ, **_SERVER_ENV}
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        code = "import sys; from sae_cache_ext.bench import serve; sys.exit(serve())"
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )
        self._expect_line("ready")

    def _expect_line(self, what: str) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the benchmark's fork server stopped (waiting for {what}); the end "
                f"of {self.log}:\n{_tail(self.log)}"
            )
        return line

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        status = json.loads(self._expect_line(job["kind"]))["status"]
        result = Path(job["result"])
        if status != 0 or not result.is_file():
            raise RuntimeError(
                f"benchmark job {job.get('name', job['kind'])} failed (exit status "
                f"{status}); the end of {job['log']}:\n{_tail(Path(job['log']))}"
            )
        return json.loads(result.read_text())

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _job(workdir: Path, name: str, **fields: Any) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    return {
        "name": name,
        "log": str(logs / f"{name}.log"),
        "result": str(logs / f"{name}.json"),
        **fields,
    }


def _run_all(
    plan: BenchPlan, server: ForkServer, workdir: Path
) -> list[dict[str, Any]]:
    tokenizer_dir = workdir / "tiny-tokenizer"
    if any(s.family in ("tiny", "wide") for s in plan.setups):
        server.run(
            _job(
                workdir,
                "prepare-tiny",
                kind="prepare-tiny",
                tokenizer_dir=str(tokenizer_dir),
            )
        )
    runs = []
    for setup in plan.setups:
        for repeat in range(plan.repeats):
            for arm in plan.arms:
                name = f"{setup.name}-{arm.replace('+', '-')}-{repeat}"
                run_dir = workdir / "runs" / name
                run_dir.mkdir(parents=True)
                load_1m = os.getloadavg()[0]
                record = server.run(
                    _job(
                        workdir,
                        name,
                        kind="arm",
                        arm=arm,
                        setup=asdict(setup),
                        threads=plan.threads,
                        disk_interval=plan.disk_interval,
                        run_dir=str(run_dir),
                        tokenizer_dir=str(tokenizer_dir),
                    )
                )
                shutil.rmtree(run_dir)
                os.sync()  # no dirty pages of this run are written back during the next
                record = _finish_record(record, setup.name, arm, repeat, load_1m)
                runs.append(record)
                logger.info(
                    "%s %s %d/%d: %.2f s, %.0f tokens/s, peak RSS +%.1f MB",
                    setup.name,
                    arm,
                    repeat + 1,
                    plan.repeats,
                    record["wall_seconds"],
                    record["tokens_per_second"],
                    record["peak_rss_above_model_mb"],
                )
    return runs


def _finish_record(
    record: dict[str, Any], model: str, arm: str, repeat: int, load_1m: float
) -> dict[str, Any]:
    """Add the run's identity and the derived per-run numbers (MB, tokens/s)."""
    write_bytes = record.get("io_write_bytes")
    return {
        "model": model,
        "arm": arm,
        "repeat": repeat,
        "loadavg_1m_before": load_1m,
        **record,
        "tokens_per_second": record["tokens"] / record["wall_seconds"],
        "peak_rss_above_model_mb": record["peak_rss_above_model"] / MB,
        "output_mb": record["output_bytes"] / MB,
        "disk_write_mb": None if write_bytes is None else write_bytes / MB,
        "peak_disk_mb": record["peak_disk"] / MB,
        "gb_per_second": record["activation_bytes"] / 1e9 / record["wall_seconds"],
        "seconds_per_gb": record["wall_seconds"] / (record["activation_bytes"] / 1e9),
    }


@contextlib.contextmanager
def _workdir(parent: Path | None) -> Iterator[Path]:
    """A fresh folder for the runs: removed afterwards unless it is under a folder
    the user chose or the benchmark failed (then its logs are kept)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sae-cache-ext-bench-", dir=parent))
    try:
        yield folder
    except BaseException:
        logger.error("benchmark failed; its logs are kept in %s", folder)
        raise
    if parent is None:
        shutil.rmtree(folder, ignore_errors=True)


def run_benchmark(plan: BenchPlan) -> dict[str, Any]:
    """Run every arm of every setup `plan.repeats` times; return the report (the raw
    runs, medians, ratios and target verdicts)."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    git = _git_state()  # the code the fork server is about to import
    with _workdir(plan.workdir) as workdir, ForkServer(workdir, plan.threads) as server:
        runs = _run_all(plan, server, workdir)
    report = build_report(runs, plan.arms)
    report["plan"] = {
        "setups": {s.name: {**asdict(s), "tokens": s.tokens} for s in plan.setups},
        "arms": plan.arms,
        "repeats": plan.repeats,
        "threads": plan.threads,
        "disk_interval": plan.disk_interval,
    }
    report["environment"] = _environment(
        load_before, time.perf_counter() - started, git
    )
    return report


def _environment(
    load_before: tuple[float, float, float],
    seconds: float,
    git: dict[str, Any] | None,
) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "sae-lens", "datasets", "pyarrow", "sae-cache-ext"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "python": sys.version.split()[0],
        "versions": versions,
        "git": git,
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "total_seconds": seconds,
    }


def _git_state() -> dict[str, Any] | None:
    """The commit the package was run from, and its modified files (results from a
    dirty tree name what was changed)."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(_PACKAGE_ROOT), *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--", "sae_cache_ext").splitlines()
        return {"commit": git("rev-parse", "HEAD"), "modified": changed}
    except (OSError, subprocess.SubprocessError):
        return None

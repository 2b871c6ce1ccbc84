"""`sae-cache-ext bench`: sae-lens's runner against ours, on the same model, data and
config, one fresh process per run.

Arms (each run alone in its own process):

    upstream           sae-lens's runner, shuffle=True (its shuffle is an index
                       mapping on the returned object; nothing is persisted)
    ours               our runner, shuffle=True, shuffle_across_sequences=True
                       (the shuffle is written to disk), and
                       on_dataset_exhausted="repeat" (sae-lens's behaviour, so every
                       arm caches the same tokens even past one pass of the corpus)
    upstream+persist   sae-lens's runner, then `dataset.save_to_disk` of its shuffled
                       dataset (timed too): what persisting its shuffle costs
    forward-only       the same batches from the ActivationsStore, kept and joined
                       per buffer as upstream does, nothing written; pipeline
                       efficiency = forward-only time / an arm's time

With `--hooks`, two more arms compare caching four hooks (four hook points of the
last block; see the setups) in one forward pass against four single-hook runs:

    ours-4-hooks       our runner with hook_names = the four hooks, as `ours`
    ours-each-hook     four runs of `ours`, one per hook, one after another in the
                       same process (its wall time is their total)

Arms alternate within each repeat (upstream, ours, upstream+persist, forward-only,
upstream, ours, ...). Each run is a fresh process forked from one server process that
has imported torch/sae-lens but never run anything, so imports (15-20 s here) are paid
once. In each run, the RSS just before `run()` is the baseline ("above the model");
the kernel's peak-RSS counter is reset there (`/proc/self/clear_refs`), so
`ru_maxrss` afterwards is the peak of the run itself, not of loading the model. Disk
writes come from `/proc/self/io`, peak disk use from a thread that sums the run
folder's file sizes every `--disk-interval` seconds.

    sae-cache-ext bench [--model tiny|smollm2|both] [--repeats 3] [--threads 1]
                        [--hooks] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UPSTREAM = "upstream"
OURS = "ours"
PERSIST = "upstream+persist"
FORWARD = "forward-only"
ARMS = (UPSTREAM, OURS, PERSIST, FORWARD)
HOOKS_ONE_PASS = "ours-4-hooks"
HOOKS_EACH = "ours-each-hook"
HOOK_ARMS = (HOOKS_ONE_PASS, HOOKS_EACH)
ALL_ARMS = (*ARMS, *HOOK_ARMS)
MODELS = ("tiny", "smollm2")
TINY_WIDTH = 32
MB = 1e6

# Medians reported per arm: (key in a run record, table header).
METRICS = (
    ("tokens_per_second", "tokens/s"),
    ("wall_seconds", "wall s"),
    ("cpu_seconds", "CPU s"),
    ("peak_rss_above_model_mb", "peak RSS above model MB"),
    ("output_mb", "output MB"),
    ("disk_write_mb", "disk writes MB"),
    ("peak_disk_mb", "peak disk MB"),
)
RATIO_BASES = (UPSTREAM, PERSIST)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
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


# -- what is run ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSetup:
    """One benchmark configuration: a model, a hook and a cache size."""

    name: str
    hook_name: str
    d_in: int
    context_size: int
    batch_size: int
    n_buffers: int
    batches_per_buffer: int
    hook_set: tuple[str, ...] = ()
    """Four hooks of the same width as `hook_name`, for the `--hooks` arms."""

    @classmethod
    def sized(cls, name: str, tokens: int, n_buffers: int, **fields: Any) -> ModelSetup:
        """The setup caching about `tokens` tokens (rounded down to whole batches) in
        `n_buffers` buffers (fewer if there are fewer batches)."""
        batch_tokens = fields["batch_size"] * fields["context_size"]
        n_batches = tokens // batch_tokens
        if n_batches < 1:
            raise ValueError(
                f"{name}: {tokens} tokens is less than one batch ({batch_tokens} "
                "tokens); ask for more tokens (--tokens / --tiny-tokens)."
            )
        n_buffers = min(n_buffers, n_batches)
        return cls(
            name=name,
            n_buffers=n_buffers,
            batches_per_buffer=n_batches // n_buffers,
            **fields,
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context_size

    @property
    def n_batches(self) -> int:
        return self.n_buffers * self.batches_per_buffer

    @property
    def tokens(self) -> int:
        return self.n_batches * self.tokens_per_batch

    @property
    def buffer_size_gb(self) -> float:
        # float32: 4 bytes per value. The +0.5 byte survives float rounding, so
        # sae-lens's `n_tokens_in_buffer` comes out exactly.
        buffer_bytes = self.batches_per_buffer * self.tokens_per_batch * self.d_in * 4
        return (buffer_bytes + 0.5) / 1e9

    def describe(self) -> str:
        return (
            f"{self.tokens:,} tokens = {self.n_buffers} buffers x "
            f"{self.batches_per_buffer} batches x {self.batch_size} x "
            f"{self.context_size} tokens, {self.hook_name} (d_in {self.d_in})"
        )


def tiny_setup(tokens: int, width: int = TINY_WIDTH) -> ModelSetup:
    return ModelSetup.sized(
        "tiny",
        tokens,
        n_buffers=8,
        hook_name="blocks.1.hook_resid_post",
        d_in=width,
        context_size=64,
        batch_size=32,
        hook_set=_block_hooks(1),
    )


def _block_hooks(block: int) -> tuple[str, ...]:
    """Four d_model-wide hook points of one block: what one forward pass to that
    block computes anyway (a fair case; hooks spread over depth let single-hook
    runs stop earlier)."""
    return tuple(
        f"blocks.{block}.hook_{name}"
        for name in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    )


def smollm2_setup(tokens: int) -> ModelSetup:
    return ModelSetup.sized(
        "smollm2",
        tokens,
        n_buffers=4,
        hook_name="blocks.15.hook_resid_post",
        d_in=576,
        context_size=128,
        batch_size=8,
        hook_set=_block_hooks(15),
    )


@dataclass
class BenchPlan:
    setups: list[ModelSetup]
    arms: list[str]
    repeats: int
    threads: int
    disk_interval: float
    workdir: Path | None = None


# -- in a run's process: measuring ------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM, `ru_maxrss`) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _io_counters() -> dict[str, int] | None:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return {
        k: int(v)
        for k, _, v in (line.partition(": ") for line in text.split("\n") if line)
    }


def tree_bytes(folder: Path) -> int:
    """Total size of the files under `folder`; files vanishing meanwhile are skipped."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


class DiskSampler:
    """Samples a folder's size on a thread; `peak` is the largest size seen."""

    def __init__(self, folder: Path, interval: float) -> None:
        self.folder = folder
        self.interval = interval
        self.peak = tree_bytes(folder)
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, tree_bytes(self.folder))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> DiskSampler:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()


@contextlib.contextmanager
def measure(folder: Path, interval: float) -> Iterator[dict[str, Any]]:
    """Time, peak RSS above the RSS at entry, disk writes and peak disk use of the
    block; the numbers land in the yielded dict when the block ends."""
    import gc
    import resource

    from sae_cache_ext.writer import release_freed_memory

    gc.collect()
    release_freed_memory()
    record: dict[str, Any] = {"rss_before_run": _status_bytes("VmRSS")}
    record["peak_rss_reset"] = _reset_peak_rss()
    io_before = _io_counters()
    cpu_before = os.times()
    with DiskSampler(folder, interval) as disk:
        start = time.perf_counter()
        yield record
        record["wall_seconds"] = time.perf_counter() - start
    cpu_after = os.times()
    # User + system time of every thread: far less disturbed than the wall time by
    # other work on the machine.
    record["cpu_seconds"] = (cpu_after.user - cpu_before.user) + (
        cpu_after.system - cpu_before.system
    )
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record.update(
        ru_maxrss=ru_maxrss,
        vm_hwm=_status_bytes("VmHWM"),
        peak_rss_above_model=max(0, ru_maxrss - record["rss_before_run"]),
        peak_disk=disk.peak,
        disk_samples=disk.samples,
        output_bytes=tree_bytes(folder),
    )
    io_after = _io_counters()
    if io_before is not None and io_after is not None:
        for key in ("write_bytes", "cancelled_write_bytes", "wchar"):
            record[f"io_{key}"] = io_after[key] - io_before[key]


# -- in a run's process: the arms -------------------------------------------------------


def _config_kwargs(setup: ModelSetup, out: Path) -> dict[str, Any]:
    return {
        "dataset_path": f"local/pydoc-corpus-{setup.name}",
        "model_name": setup.name,
        "hook_name": setup.hook_name,
        "d_in": setup.d_in,
        "context_size": setup.context_size,
        "model_batch_size": setup.batch_size,
        "training_tokens": setup.tokens,
        "buffer_size_gb": setup.buffer_size_gb,
        "new_cached_activations_path": str(out),
        "shuffle": True,
        "device": "cpu",
    }


def _check_sizes(cfg: Any, setup: ModelSetup) -> None:
    got = (cfg.n_buffers, cfg.n_batches_in_buffer)
    if got != (setup.n_buffers, setup.batches_per_buffer):
        raise RuntimeError(
            f"config gives (n_buffers, n_batches_in_buffer) = {got}, expected "
            f"{(setup.n_buffers, setup.batches_per_buffer)}"
        )


def _upstream_runner(setup: ModelSetup, model: Any, corpus: Any, out: Path) -> Any:
    import functools

    import sae_lens
    import sae_lens.cache_activations_runner as upstream_module
    from tqdm.auto import tqdm

    # Its constructor always calls `load_model` (which would download): hand it ours.
    upstream_module.load_model = lambda **_: model  # type: ignore[assignment]
    upstream_module.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[assignment]
    cfg = sae_lens.CacheActivationsRunnerConfig(**_config_kwargs(setup, out))
    _check_sizes(cfg, setup)
    return sae_lens.CacheActivationsRunner(cfg, override_dataset=corpus)


def _arm_upstream(
    setup: ModelSetup,
    model: Any,
    corpus: Any,
    run_dir: Path,
    interval: float,
    persist: bool,
) -> dict[str, Any]:
    runner = _upstream_runner(setup, model, corpus, run_dir / "out")
    with measure(run_dir, interval) as record:
        dataset = runner.run()
        if persist:
            persisted = time.perf_counter()
            dataset.save_to_disk(str(run_dir / "persisted"))
            record["persist_seconds"] = time.perf_counter() - persisted
    record["tokens"] = len(dataset) * runner.context_size
    return record


def _ours_runner(
    setup: ModelSetup, model: Any, corpus: Any, out: Path, **fields: Any
) -> Any:
    from sae_cache_ext.config import CacheActivationsRunnerConfig
    from sae_cache_ext.runner import CacheActivationsRunner

    cfg = CacheActivationsRunnerConfig(
        **{
            **_config_kwargs(setup, out),
            "shuffle_across_sequences": True,
            "on_dataset_exhausted": "repeat",
            **fields,
        }
    )
    _check_sizes(cfg, setup)
    return CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    )


def _arm_ours(
    setup: ModelSetup, model: Any, corpus: Any, run_dir: Path, interval: float
) -> dict[str, Any]:
    from sae_cache_ext import manifest

    runner = _ours_runner(setup, model, corpus, run_dir / "out")
    with measure(run_dir, interval) as record:
        dataset = runner.run()
    record["tokens"] = len(dataset) * runner.context_size
    done = manifest.read_manifest(run_dir / "out")
    record["ours_timings"] = done.get("timings")
    record["ours_writer"] = done.get("writer")
    return record


def _arm_hooks(
    setup: ModelSetup,
    model: Any,
    corpus: Any,
    run_dir: Path,
    interval: float,
    one_pass: bool,
) -> dict[str, Any]:
    """The four hooks of `setup.hook_set`: one run with hook_names, or one run per
    hook in turn (timed together). `tokens` counts the tokens of one run."""
    hooks = list(setup.hook_set)
    if one_pass:
        runners = [
            _ours_runner(setup, model, corpus, run_dir / "out", hook_names=hooks)
        ]
    else:
        runners = [
            _ours_runner(setup, model, corpus, run_dir / f"out-{i}", hook_name=hook)
            for i, hook in enumerate(hooks)
        ]
    with measure(run_dir, interval) as record:
        for runner in runners:
            dataset = runner.run()
    record["tokens"] = len(dataset) * runners[0].context_size
    record["hooks"] = hooks
    return record


def _arm_forward_only(
    setup: ModelSetup, model: Any, corpus: Any, run_dir: Path, interval: float
) -> dict[str, Any]:
    import sae_lens
    import torch
    from sae_lens.cache_activations_runner import _mk_activations_store

    cfg = sae_lens.CacheActivationsRunnerConfig(
        **_config_kwargs(setup, run_dir / "out")
    )
    _check_sizes(cfg, setup)
    store = _mk_activations_store(model, cfg, corpus)
    with torch.no_grad(), measure(run_dir, interval) as record:
        # upstream's loop without its shard building and writing: each buffer's
        # batches are kept and joined, then dropped (dropping each batch at once
        # measured 5-10% slower than upstream's whole run on this machine)
        for _ in range(setup.n_buffers):
            batches = [
                store.get_raw_llm_batch() for _ in range(setup.batches_per_buffer)
            ]
            acts = torch.cat([acts for acts, _ in batches])
            del batches, acts
    record["tokens"] = setup.n_batches * setup.tokens_per_batch
    return record


def _load_model(setup: ModelSetup, tokenizer_dir: str | None) -> Any:
    if setup.name == "tiny":
        from sae_cache_ext.toy import build_model

        if tokenizer_dir is None:
            raise RuntimeError("the tiny model needs the prepared tokenizer folder")
        return build_model(Path(tokenizer_dir), d_model=setup.d_in)
    from sae_cache_ext.models import load_smollm2_hooked

    return load_smollm2_hooked()


def _pretokenized(model: Any, corpus: Any, context_size: int) -> Any:
    """The corpus as rows of `context_size` token ids: documents joined by BOS, as
    sae-lens's store joins them."""
    import torch
    from datasets import Dataset
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos = model.tokenizer.bos_token_id
    documents = (
        torch.tensor(ids)
        for ids in model.tokenizer(list(corpus["text"]), add_special_tokens=False)[
            "input_ids"
        ]
        if ids
    )
    rows = concat_and_batch_sequences(
        documents,
        context_size,
        begin_batch_token_id=bos,
        sequence_separator_token_id=bos,
    )
    return Dataset.from_dict({"tokens": [row.tolist() for row in rows]})


def _run_arm(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sae_cache_ext.data import pydoc_corpus

    torch.set_num_threads(job["threads"])
    setup = ModelSetup(**job["setup"])
    loading = time.perf_counter()
    model = _load_model(setup, job.get("tokenizer_dir"))
    corpus = pydoc_corpus()
    if setup.name == "tiny":
        # The tiny model stands for a fast accelerator, where the forward is cheap:
        # tokenizing on the fly would dominate, so both arms read the same
        # pretokenized rows (as sae-lens recommends for real runs).
        corpus = _pretokenized(model, corpus, setup.context_size)
    load_seconds = time.perf_counter() - loading
    run_dir, interval, arm = Path(job["run_dir"]), job["disk_interval"], job["arm"]
    args = (setup, model, corpus, run_dir, interval)
    if arm == UPSTREAM:
        record = _arm_upstream(*args, persist=False)
    elif arm == PERSIST:
        record = _arm_upstream(*args, persist=True)
    elif arm == OURS:
        record = _arm_ours(*args)
    elif arm in HOOK_ARMS:
        record = _arm_hooks(*args, one_pass=arm == HOOKS_ONE_PASS)
    else:
        record = _arm_forward_only(*args)
    record.update(load_seconds=load_seconds, pid=os.getpid())
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
    if any(s.name == "tiny" for s in plan.setups):
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


# -- the report -------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Target:
    model: str
    label: str
    compare: str
    """`"ours/<base arm>"` (a ratio of medians) or `"efficiency"` (of ours)."""
    metric: str
    threshold: float
    stretch: float | None = None
    at_most: bool = False
    """The target is a ceiling (a time ratio), not a floor."""

    def measured(self, report: dict[str, Any]) -> float | None:
        if self.compare == "efficiency":
            return report["efficiency"].get(self.model, {}).get(OURS)
        return (
            report["ratios"].get(self.model, {}).get(self.compare, {}).get(self.metric)
        )


TARGETS = (
    Target("tiny", "tiny: ours tokens/s vs upstream", f"{OURS}/{UPSTREAM}",
           "tokens_per_second", 1.05, stretch=1.15),
    Target("tiny", "tiny: ours tokens/s vs upstream+persist", f"{OURS}/{PERSIST}",
           "tokens_per_second", 1.3),
    Target("smollm2", "smollm2: our pipeline efficiency", "efficiency",
           "wall_seconds", 0.97),
    Target("tiny", "tiny: 4 hooks in one pass / 4 runs, wall time",
           f"{HOOKS_ONE_PASS}/{HOOKS_EACH}", "wall_seconds", 0.4, at_most=True),
    Target("smollm2", "smollm2: 4 hooks in one pass / 4 runs, wall time",
           f"{HOOKS_ONE_PASS}/{HOOKS_EACH}", "wall_seconds", 0.4, at_most=True),
)  # fmt: skip


def _verdict(value: float | None, threshold: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= threshold if at_most else value >= threshold
    return "MET" if met else "NOT MET"


def build_report(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Medians per model and arm, ratios of ours to each upstream arm, pipeline
    efficiencies (forward-only wall time / the arm's) and the target verdicts."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        summary[model] = {}
        for arm in arms:
            mine = [r for r in runs if r["model"] == model and r["arm"] == arm]
            if mine:
                summary[model][arm] = {
                    "runs": len(mine),
                    **{key: _median([r[key] for r in mine]) for key, _ in METRICS},
                }
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    efficiency: dict[str, dict[str, float | None]] = {}
    for model, arms_of in summary.items():
        ratios[model] = {
            f"{OURS}/{base}": {
                key: _ratio(arms_of[OURS][key], arms_of[base][key])
                for key, _ in METRICS
            }
            for base in RATIO_BASES
            if OURS in arms_of and base in arms_of
        }
        if HOOKS_ONE_PASS in arms_of and HOOKS_EACH in arms_of:
            ratios[model][f"{HOOKS_ONE_PASS}/{HOOKS_EACH}"] = {
                key: _ratio(arms_of[HOOKS_ONE_PASS][key], arms_of[HOOKS_EACH][key])
                for key, _ in METRICS
            }
        if FORWARD in arms_of:
            forward = arms_of[FORWARD]["wall_seconds"]
            efficiency[model] = {
                arm: _ratio(forward, arms_of[arm]["wall_seconds"])
                for arm in (UPSTREAM, OURS, PERSIST)
                if arm in arms_of
            }
    report: dict[str, Any] = {
        "warnings": _token_mismatches(runs),
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "efficiency": efficiency,
    }
    report["targets"] = [_evaluate(target, report) for target in TARGETS]
    return report


def _token_mismatches(runs: list[dict[str, Any]]) -> list[str]:
    """One message per model whose arms did not all cache the same tokens (then
    their times do not compare)."""
    messages = []
    for model in dict.fromkeys(r["model"] for r in runs):
        counts = {r["arm"]: r["tokens"] for r in runs if r["model"] == model}
        tokens_by_run = {r["tokens"] for r in runs if r["model"] == model}
        if len(tokens_by_run) > 1:
            messages.append(
                f"{model}: the runs cached different numbers of tokens "
                f"({counts}); their times do not compare."
            )
    return messages


def _evaluate(target: Target, report: dict[str, Any]) -> dict[str, Any]:
    value = target.measured(report)
    return {
        **asdict(target),
        "measured": value,
        "verdict": _verdict(value, target.threshold, target.at_most),
        "stretch_verdict": None
        if target.stretch is None
        else _verdict(value, target.stretch),
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def _model_section(model: str, report: dict[str, Any]) -> list[str]:
    summary, efficiency = report["summary"][model], report["efficiency"].get(model, {})
    setup = report.get("plan", {}).get("setups", {}).get(model)
    out = [
        f"== {model}"
        + (f": {ModelSetup(**_setup_fields(setup)).describe()}" if setup else "")
    ]
    header = ["arm", *(title for _, title in METRICS), "efficiency"]
    rows = [
        [
            arm,
            _cell(medians["tokens_per_second"], 0),
            _cell(medians["wall_seconds"], 2),
            _cell(medians["cpu_seconds"], 2),
            *(_cell(medians[key]) for key, _ in METRICS[3:]),
            _cell(efficiency.get(arm), 3),
        ]
        for arm, medians in summary.items()
    ]
    out += _table(header, rows)
    ratio_rows = [
        [name, *(_cell(values[key], 3) for key, _ in METRICS)]
        for name, values in report["ratios"].get(model, {}).items()
    ]
    if ratio_rows:
        out += [
            "",
            *_table(["ratio (of medians)", *(t for _, t in METRICS)], ratio_rows),
        ]
    out += _regime_lines(summary)
    out += ["", "per-run wall s / CPU s (in run order):"]
    for arm in summary:
        times = [
            f"{r['wall_seconds']:.2f}/{r['cpu_seconds']:.2f}"
            for r in report["runs"]
            if r["model"] == model and r["arm"] == arm
        ]
        out.append(f"  {arm:<18} " + "  ".join(times))
    return out


def regime(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """How much of upstream's time is not the forward pass, and so the most any
    runner that must run the same forward could gain: an arm's wall time over
    forward-only's is the ceiling of ours' tokens/s ratio against that arm."""
    if FORWARD not in summary:
        return {}
    forward = summary[FORWARD]["wall_seconds"]
    out: dict[str, float | None] = {}
    if UPSTREAM in summary:
        upstream = summary[UPSTREAM]["wall_seconds"]
        out["upstream_non_forward_share"] = (
            None if not upstream else 1 - forward / upstream
        )
    for arm in (UPSTREAM, PERSIST):
        if arm in summary:
            out[f"ceiling_vs_{arm}"] = _ratio(summary[arm]["wall_seconds"], forward)
    return out


def _regime_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    facts = regime(summary)
    if "upstream_non_forward_share" not in facts:
        return []
    share = facts["upstream_non_forward_share"]
    ceilings = ", ".join(
        f"vs {arm} {_cell(facts.get(f'ceiling_vs_{arm}'), 3)}"
        for arm in (UPSTREAM, PERSIST)
        if f"ceiling_vs_{arm}" in facts
    )
    return [
        "",
        f"regime: {_cell(None if share is None else 100 * share)}% of upstream's wall "
        "time is neither its forward pass nor its reading of rows; hiding all of it "
        "would give (arm time / forward-only time): "
        f"{ceilings}. Ours also reads rows faster (a batch at a time), so it can pass "
        "these.",
    ]


def _setup_fields(setup: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setup.items() if k != "tokens"}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one table of medians per model, the ratios, the targets."""
    lines: list[str] = []
    plan, env = report.get("plan", {}), report.get("environment", {})
    if plan:
        lines.append(
            f"sae-cache-ext bench: {plan['repeats']} repeat(s), {plan['threads']} "
            f"torch thread(s); medians over repeats. Load average before/after: "
            f"{_cell(env.get('loadavg_before', [None])[0], 2)} / "
            f"{_cell(env.get('loadavg_after', [None])[0], 2)} "
            f"on {env.get('cpu_count')} CPUs."
        )
    if git := env.get("git"):
        dirty = f", {len(git['modified'])} modified file(s)" if git["modified"] else ""
        lines.append(f"Code: commit {git['commit'][:10]}{dirty}.")
    for model in report["summary"]:
        lines += ["", *_model_section(model, report)]
    lines += [f"WARNING: {message}" for message in report.get("warnings", [])]
    lines += ["", "targets:"]
    width = max(len(t["label"]) for t in report["targets"])
    for t in report["targets"]:
        goal = f"{'<=' if t.get('at_most') else '>='} {t['threshold']:g}" + (
            f" (stretch {t['stretch']:g})" if t["stretch"] else ""
        )
        verdict = t["verdict"]
        if t["stretch_verdict"] is not None and t["measured"] is not None:
            verdict += f", stretch {t['stretch_verdict']}"
        lines.append(
            f"  {t['label']:<{width}}  {goal:<24} {_cell(t['measured'], 3):>7}  {verdict}"
        )
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------

QUICK_TINY_TOKENS = 32_768


def add_parser(subparsers: Any) -> None:
    """Register `bench` on the `sae-cache-ext` command's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="time sae-lens's runner against ours (throughput, memory, disk)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", choices=[*MODELS, "both"], default="both")
    bench.add_argument(
        "--repeats", type=int, default=3, help="runs per arm (default 3)"
    )
    bench.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1)"
    )
    bench.add_argument(
        "--tokens", type=int, default=16_384, help="smollm2 tokens (default 16384)"
    )
    bench.add_argument(
        "--tiny-tokens", type=int, default=524_288, help="tiny tokens (default 524288)"
    )
    bench.add_argument(
        "--tiny-width",
        type=int,
        default=TINY_WIDTH,
        help=f"the tiny model's d_model (default {TINY_WIDTH})",
    )
    bench.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated arms to run, in this order (default {','.join(ARMS)}; "
        f"also {', '.join(HOOK_ARMS)})",
    )
    bench.add_argument(
        "--hooks",
        action="store_true",
        help=f"also run {' and '.join(HOOK_ARMS)}: four hooks in one pass against "
        "four single-hook runs",
    )
    bench.add_argument(
        "--disk-interval",
        type=float,
        default=0.02,
        help="seconds between disk-use samples; 0 samples only before and after",
    )
    bench.add_argument("--json", metavar="PATH", help="also write every number here")
    bench.add_argument(
        "--workdir",
        help="make the run folders (and keep the logs) under here (default: a "
        "temporary folder, removed afterwards)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: tiny model only, 1 repeat, {QUICK_TINY_TOKENS} tokens",
    )
    bench.set_defaults(func=run_bench_command)


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The plan the options ask for, with errors that name the option."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if getattr(args, "hooks", False):
        arms += HOOK_ARMS
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms {args.arms!r}: choose from {', '.join(ALL_ARMS)}.")
    for option, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}.")
    if args.disk_interval < 0:
        raise ValueError(
            f"--disk-interval must be 0 or more, got {args.disk_interval}."
        )
    models = list(MODELS) if args.model == "both" else [args.model]
    repeats, tiny_tokens = args.repeats, args.tiny_tokens
    if args.quick:
        models, repeats, tiny_tokens = ["tiny"], 1, QUICK_TINY_TOKENS
    setups = [
        tiny_setup(tiny_tokens, args.tiny_width)
        if m == "tiny"
        else smollm2_setup(args.tokens)
        for m in models
    ]
    return BenchPlan(
        setups=setups,
        arms=list(dict.fromkeys(arms)),
        repeats=repeats,
        threads=args.threads,
        disk_interval=args.disk_interval,
        workdir=Path(args.workdir).expanduser() if args.workdir else None,
    )


def run_bench_command(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    for setup in plan.setups:
        logger.info("bench %s: %s", setup.name, setup.describe())
    report = run_benchmark(plan)
    for message in report["warnings"]:
        logger.warning(message)
    print(format_report(report))
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        logger.info("wrote every number to %s", path)
    return 0

"""`sae-cache-ext run`: a config file to a cache, cheapest checks first.

1. the file and `--set` values, typed and checked (`config_io`), and the checks that
   need no model (`precheck`): no torch imported yet, a typo answers at once;
2. the real config (its cross-field rules), the local dataset, then the model;
3. the runner (`build_and_run`), and a summary whose every rate says what it is
   measured over. A cache cut short by the dataset exits with `EXIT_SHORT_CACHE`.

Hub failures while offline become one line with the fix (`explain_hub_errors`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_cache_ext.config_io import ConfigError, read_config
from sae_cache_ext.precheck import check_before_loading

if TYPE_CHECKING:
    from sae_cache_ext.config import CacheActivationsRunnerConfig
    from sae_cache_ext.runner import CacheActivationsRunner

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_SHORT_CACHE = 3
SMOLLM2_NAMES = {"smollm2", "smollm2-135m-instruct"}

# exception class names (anywhere in the chain) that mean "the Hub was not reached"
_HUB_UNREACHABLE = {
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ProxyError",
}


class HubUnreachable(Exception):
    """The Hub was needed and could not be reached: one line, with the fix."""


def _hub_failure(error: BaseException) -> BaseException | None:
    seen: BaseException | None = error
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        text = str(seen)
        if names & _HUB_UNREACHABLE or (
            isinstance(seen, OSError)
            and ("huggingface.co" in text or "offline mode" in text.lower())
        ):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def explain_hub_errors(what: str, fix: str) -> Iterator[None]:
    """Turn "the Hub could not be reached" (offline mode, no network, not in the
    local cache) into `HubUnreachable` naming `what` and `fix`."""
    try:
        yield
    except Exception as error:
        cause = _hub_failure(error)
        if cause is None:
            raise
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise HubUnreachable(
            f"{what} needs the Hugging Face Hub, which could not be reached "
            f"({type(cause).__name__}: {first[:160]}). {fix}"
        ) from None


def model_fix(name: str) -> str:
    return (
        f"Download it while online (`huggingface-cli download {name}`) so it is in "
        "the local cache, give a local model folder, use 'smollm2' (bundled, offline), "
        "or unset HF_HUB_OFFLINE."
    )


DATASET_FIX = (
    "Give a local .txt/.jsonl file or a folder written by Dataset.save_to_disk, "
    "download the dataset while online, or unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE."
)


# -- steps ------------------------------------------------------------------------


def load_checked_config(
    path: str, overrides: list[str]
) -> CacheActivationsRunnerConfig:
    """The config, every cheap check first (no torch until they pass)."""
    values = read_config(path, overrides)
    check_before_loading(values)
    from sae_cache_ext.config import CacheActivationsRunnerConfig

    try:
        return CacheActivationsRunnerConfig(**values)
    except TypeError as error:
        raise ConfigError(f"config: {error}") from None


def load_model(cfg: CacheActivationsRunnerConfig):
    """Our local loaders for `smollm2` and model folders, else sae-lens's
    `load_model` (as its runner would call it)."""
    from sae_lens.load_model import load_model as load_named_model

    from sae_cache_ext import models

    name = cfg.model_name
    if name.lower() in SMOLLM2_NAMES:
        return models.load_smollm2_hooked(device=cfg.device)
    if Path(name).expanduser().is_dir():
        class_name = (
            cfg.model_class_name
            if cfg.model_class_name in models.SUPPORTED_MODEL_CLASS_NAMES
            else None
        )
        return models.load_local_model(
            name, device=cfg.device, model_class_name=class_name
        )
    return load_named_model(
        model_class_name=cfg.model_class_name,
        model_name=cfg.model_name,
        device=cfg.device,
        model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
    )


def load_dataset(cfg: CacheActivationsRunnerConfig):
    from sae_cache_ext.data import is_local_dataset, load_local_dataset

    if is_local_dataset(cfg.dataset_path):
        return load_local_dataset(cfg.dataset_path)
    return None  # a Hub id: sae-lens's store loads it


def build_and_run(
    cfg: CacheActivationsRunnerConfig, quiet: bool
) -> tuple[CacheActivationsRunner, float]:
    """Load the dataset and model, build the runner and run it: the runner and
    the seconds `run()` took."""
    from sae_cache_ext.distributed import rank_device, world_from_env
    from sae_cache_ext.runner import CacheActivationsRunner
    from sae_cache_ext.validate import validate_output_path

    # under torchrun: join the process group first, so that `device: cuda` loads
    # the model on this rank's own GPU
    world = world_from_env(cfg.device)
    cfg.device = rank_device(cfg.device, world)
    if world.is_main:  # as the runner does, but before the model loads
        validate_output_path(cfg, world.size)
    dataset = load_dataset(cfg)  # before the model: a bad file fails fast
    with explain_hub_errors(
        f"model_name={cfg.model_name!r}", model_fix(cfg.model_name)
    ):
        model = load_model(cfg)
    with explain_hub_errors(f"dataset_path={cfg.dataset_path!r}", DATASET_FIX):
        runner = CacheActivationsRunner(
            cfg, override_dataset=dataset, override_model=model, quiet=quiet
        )
        started = time.perf_counter()
        runner.run()
    return runner, time.perf_counter() - started


# -- the summary ---------------------------------------------------------------------


@dataclass
class RunSummary:
    """What `run` reports. Rates are over this run's computed tokens."""

    path: str
    rows: int
    tokens: int
    tokens_computed_this_run: int
    resumed: bool
    bytes_on_disk: int
    run_seconds: float  # runner.run(): caching, shuffle, writes (model loaded)
    wall_seconds: float  # the whole command: imports, model load, run
    dataset_ran_out: bool
    training_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "tokens_per_second_run": _rate(
                self.tokens_computed_this_run, self.run_seconds
            ),
            "tokens_per_second_wall": _rate(
                self.tokens_computed_this_run, self.wall_seconds
            ),
            "exit_status": EXIT_SHORT_CACHE if self.dataset_ran_out else EXIT_OK,
        }

    def lines(self) -> list[tuple[str, str]]:
        facts = self.to_json()
        pairs = [
            ("path", self.path),
            ("rows", f"{self.rows:,} ({self.tokens:,} tokens)"),
            (
                "computed this run",
                f"{self.tokens_computed_this_run:,} tokens"
                + (
                    " (resumed: the rest was cached by an earlier run)"
                    if self.resumed
                    else ""
                ),
            ),
            ("bytes on disk", f"{self.bytes_on_disk:,}"),
            ("run seconds", f"{self.run_seconds:.2f}  (caching, shuffle and writes)"),
            (
                "wall seconds",
                f"{self.wall_seconds:.2f}  (the whole command, model load included)",
            ),
            ("tokens/s over run", f"{facts['tokens_per_second_run']}"),
            ("tokens/s over wall", f"{facts['tokens_per_second_wall']}"),
        ]
        if self.dataset_ran_out:
            pairs.append(
                (
                    "DATASET RAN OUT",
                    f"the cache holds {self.tokens:,} of training_tokens="
                    f"{self.training_tokens:,} (exit status {EXIT_SHORT_CACHE})",
                )
            )
        else:
            pairs.append(("dataset ran out", "no"))
        return pairs


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 1) if seconds > 0 and tokens else None


def summarize(
    cfg: CacheActivationsRunnerConfig,
    runner: CacheActivationsRunner,
    run_seconds: float,
    wall_seconds: float,
) -> RunSummary:
    from sae_cache_ext.verify import describe_cache, folder_bytes

    out = Path(str(cfg.new_cached_activations_path))
    description = describe_cache(out)
    facts = description.get("manifest") or {}
    exhaustion = facts.get("dataset_exhaustion") or {}
    producer = runner.producer
    computed_rows = producer.rows_cached - producer.rows_restored
    return RunSummary(
        path=str(out),
        rows=description["rows"],
        tokens=description["tokens"],
        tokens_computed_this_run=computed_rows * runner.context_size,
        resumed=bool(facts.get("resumed")) or producer.rows_restored > 0,
        bytes_on_disk=folder_bytes(out),
        run_seconds=round(run_seconds, 2),
        wall_seconds=round(wall_seconds, 2),
        dataset_ran_out=bool(exhaustion.get("exhausted")),
        training_tokens=cfg.training_tokens,
    )

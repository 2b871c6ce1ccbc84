"""The life of a run at an output path: lease, recover, stage, swap.

`owned` takes the output path's lease (no other run, on any host, works there
meanwhile); `recover` cleans up after an earlier run and decides, in one place,
whether the output path already holds this run's finished cache and whether the
interrupted run's work can be continued (same config, same inputs, a checkpoint
to continue from); `staged` hands out the staging folder and, when the work in it
is done, swaps it into place (the last step of a run). The low-level names, markers
and renames are `staging`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_cache_ext import checkpoints, staging
from sae_cache_ext.checkpoints import Phase
from sae_cache_ext.config import changed_fields
from sae_cache_ext.inputs import Inputs, differences
from sae_cache_ext.lease import Lease

logger = logging.getLogger(__name__)

# where a data-parallel run's ranks keep their progress (see `parallel`)
_RANK_PROGRESS = ("rank-*/" + checkpoints.CHECKPOINT, "rank-*/done.json")


@dataclass(frozen=True)
class Run:
    """What identifies a run at its output path, and how it treats an earlier one."""

    layout: staging.Layout
    fingerprint: str  # the config's (and the number of ranks')
    config: dict[str, Any]  # the config, to name the fields that differ
    inputs: Inputs  # what it computes from
    plan: dict[str, Any]  # what the plan derived (reused on resume)
    resume: bool
    lease_stale_seconds: float = 120.0
    wait_for_lease: bool = False

    def marker_fields(self, plan: dict[str, Any]) -> dict[str, Any]:
        return {"config": self.config, "inputs": self.inputs.to_json(), "plan": plan}


@dataclass(frozen=True)
class Recovery:
    """What an earlier run at the output path left for this one."""

    resumable: bool  # its staging folder is kept for this run to continue
    finished: bool  # the output path holds this run's finished cache already
    plan: dict[str, Any] | None = None  # the kept run's plan, to reuse


@contextlib.contextmanager
def owned(run: Run) -> Iterator[Lease]:
    """Hold the output path's lease for the block (see `lease`)."""
    layout = run.layout
    layout.final.parent.mkdir(parents=True, exist_ok=True)
    lease = Lease.acquire(
        layout.lease,
        stale_seconds=run.lease_stale_seconds,
        wait=run.wait_for_lease,
        what=f"new_cached_activations_path={str(layout.final)!r}",
    )
    try:
        yield lease
    finally:
        lease.release()


def recover(run: Run, lease: Lease | None = None) -> Recovery:
    """Clean up after an earlier run at the output path (keeping its staging folder
    when `resume` and it can be continued), then refuse an output path that holds
    anything but this run's finished cache."""
    layout = run.layout
    kept: dict[str, Any] = {}

    def resumable(marker: dict[str, Any]) -> bool:
        _check_can_resume(run, marker)
        if not _has_progress(layout.staging):
            logger.warning(
                "resume=True: nothing to resume at %s (the interrupted run saved no "
                "checkpoint); starting over.",
                layout.final,
            )
            return False
        logger.warning(
            "Resuming the interrupted run at %s from %s.", layout.final, layout.staging
        )
        kept.update(marker)
        return True

    swap_finished, resuming = staging.recover(
        layout, resume=resumable if run.resume else None, lease=lease
    )
    if (swap_finished or run.resume) and staging.holds_finished_cache(
        layout.final, run.fingerprint
    ):
        _check_finished_inputs(run)
        logger.warning(
            "%s already holds this config's finished cache; returning it.",
            layout.final,
        )
        return Recovery(resuming, finished=True)
    staging.check_output_free(layout)
    plan = kept.get("plan")
    return Recovery(resuming, finished=False, plan=plan if resuming else None)


def _check_can_resume(run: Run, marker: dict[str, Any]) -> None:
    """Refuse (keeping the work) to continue a run made from another config or
    other inputs."""
    changed: list[str] = []
    if marker.get("fingerprint") != run.fingerprint:
        before = marker.get("config")
        changed = changed_fields(before, run.config) if isinstance(before, dict) else []
        if not changed:
            changed = [
                f"run fingerprint: {marker.get('fingerprint')} -> {run.fingerprint} "
                "(the config or the number of data-parallel processes)"
            ]
    changed += differences(marker.get("inputs"), run.inputs)
    if changed:
        raise ValueError(
            f"resume=True cannot continue the interrupted run at {run.layout.final}: "
            "what it computes from changed since it started, so its cached part "
            "would not match the rest. Changed: " + "; ".join(changed) + ". Its work "
            f"is kept in {run.layout.staging}. Rerun with the original config and "
            "inputs to continue it, or with resume=False to start over (this deletes "
            "that work)."
        )


def _check_finished_inputs(run: Run) -> None:
    manifest = staging.read_marker(run.layout.final) or {}
    changed = differences(manifest.get("inputs"), run.inputs)
    if changed:
        raise ValueError(
            f"{run.layout.final} holds a finished cache of this config, but made from "
            "other inputs, so it is not returned as this run's. Changed: "
            + "; ".join(changed)
            + ". Delete it or choose a different new_cached_activations_path, and "
            "rerun."
        )


def _has_progress(folder: Path) -> bool:
    """Whether `folder` holds work a resumed run continues from."""
    return (
        staging.is_our_finished_cache(folder)
        or (folder / checkpoints.CHECKPOINT).exists()
        or any(any(folder.glob(pattern)) for pattern in _RANK_PROGRESS)
    )


def _caching_done(folder: Path) -> bool:
    """Whether every activation of the run is on disk in `folder`."""
    if staging.is_our_finished_cache(folder):
        return True
    try:
        value = json.loads((folder / checkpoints.CHECKPOINT).read_text())
    except (OSError, ValueError):
        return False
    return value.get("phase") == Phase.GATHER.value


def _keep_reason(run: Run, folder: Path, error: BaseException) -> str | None:
    """Why a failed run's staging folder is kept (and how to go on), or None."""
    interrupted = isinstance(error, KeyboardInterrupt)
    if _caching_done(folder):
        final = run.layout.final
        blocked = final.is_dir() and any(final.iterdir())
        return (
            f"Caching had completed: the work is kept in {folder}. "
            + (f"Move away what appeared at {final}, then r" if blocked else "R")
            + "erun with resume=True to finish it (no activations are computed "
            "again)."
        )
    if run.resume:
        return (
            f"The run {'was interrupted' if interrupted else 'failed'}; its work so "
            f"far is kept in {folder}. Rerun with the same config (resume=True is "
            "set) to continue, or with resume=False to start over."
        )
    if interrupted and _has_progress(folder):
        return (
            f"The work so far is kept in {folder}: rerun with resume=True to "
            "continue it, or with resume=False to start over."
        )
    return None


@contextlib.contextmanager
def staged(run: Run, recovery: Recovery, lease: Lease | None = None) -> Iterator[Path]:
    """The staging folder (the kept one when `recovery.resumable`); once the block
    is done, its leftover checkpoint goes and the folder is swapped into place. If
    anything fails it is removed, unless `resume`, or caching had completed, or the
    run was interrupted with work to continue: then it is kept, and the error says
    how to go on."""
    layout = run.layout
    with staging.staging_area(
        layout,
        run.fingerprint,
        reuse=recovery.resumable,
        keep_on_error=lambda error: _keep_reason(run, layout.staging, error),
        lease=lease,
        extra=run.marker_fields(recovery.plan or run.plan),
    ) as folder:
        yield folder
        checkpoints.remove(folder)  # a crash may have kept them past the manifest
        if lease is not None:
            lease.check()
        staging.swap_into_place(layout)
    logger.info("Cached activations at %s", layout.final)

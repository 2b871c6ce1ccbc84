"""Staging, the atomic swap into place, and recovery after a crash.

A cache is built in a staging folder beside the output path and renamed into place
at the very end, so the output path holds either nothing of ours or the finished
dataset. Every folder this module may delete carries a marker file that names it as
ours and names the output path it belongs to; anything without one is never touched.

    <parent>/<name>                              the output path (final)
    <parent>/.<name>.sae-cache-ext-staging       the dataset being built
    <parent>/.<name>.sae-cache-ext-backup        whatever stood at <name>, mid-swap
    <parent>/.<name>.sae-cache-ext-lease         the live run's lease (`lease`)

Everything here that deletes runs under the lease, which the run took first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_cache_ext.lease import Lease
from sae_cache_ext.precheck import output_path_problem
from sae_cache_ext.writer import fsync_dir, write_json_atomic

logger = logging.getLogger(__name__)

MARKER = "sae_cache_ext_manifest.json"
TOOL = "sae-cache-ext"
STATE_STAGING = "staging"
STATE_COMPLETE = "complete"


@dataclass(frozen=True)
class Layout:
    """The three paths one output path involves."""

    final: Path

    @classmethod
    def for_output(cls, path: str | os.PathLike[str]) -> Layout:
        return cls(Path(path).expanduser().absolute())

    @property
    def staging(self) -> Path:
        return self.final.parent / f".{self.final.name}.sae-cache-ext-staging"

    @property
    def backup(self) -> Path:
        return self.final.parent / f".{self.final.name}.sae-cache-ext-backup"

    @property
    def lease(self) -> Path:
        return self.final.parent / f".{self.final.name}.sae-cache-ext-lease"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker in `folder`, or None when there is none (or it is unreadable)."""
    try:
        value = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("tool") == TOOL else None


def is_our_finished_cache(folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("state") == STATE_COMPLETE


def holds_finished_cache(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` holds the finished cache of the run with `fingerprint`."""
    marker = read_marker(folder)
    return (
        marker is not None
        and marker.get("state") == STATE_COMPLETE
        and marker.get("fingerprint") == fingerprint
    )


def _belongs_to(marker: dict[str, Any] | None, layout: Layout) -> bool:
    return marker is not None and marker.get("final_path") == str(layout.final)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_still_running(marker: dict[str, Any]) -> bool:
    pid = marker.get("pid")
    return (
        isinstance(pid, int)
        and pid != os.getpid()
        and marker.get("host") == socket.gethostname()
        and _pid_alive(pid)
    )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _is_unstarted_staging(path: Path) -> bool:
    """Empty, or holding only a half-written marker (a run killed while writing
    its first marker): nothing in it is anyone's data."""
    return (
        path.is_dir()
        and not path.is_symlink()
        and all(child.name == MARKER + ".tmp" for child in path.iterdir())
    )


def recover(
    layout: Layout,
    resume: Callable[[dict[str, Any]], bool] | None = None,
    lease: Lease | None = None,
) -> tuple[bool, bool]:
    """Clean up what a crashed run at this output path left behind.

    Removes only folders that carry our marker for this output path (or are empty);
    raises `FileExistsError` for anything else standing at our private names, and
    `RuntimeError` when another live process is writing there. With `resume`, a
    staging folder of ours is kept when `resume(marker)` says so (it raises to
    refuse a folder it must neither continue nor delete). Run it holding `lease`.

    Returns `(swap_finished, resumable)`: whether a crashed swap was completed here
    (the finished dataset is in place), and whether a staging folder was kept.
    """
    if lease is not None:
        lease.check()
    swap_finished = False
    backup = layout.backup
    if backup.exists() or backup.is_symlink():
        if not (layout.final.exists() or layout.final.is_symlink()):
            os.rename(backup, layout.final)
            logger.warning(
                "A previous run stopped in the middle of its swap; restored %s from %s.",
                layout.final,
                backup,
            )
        elif is_our_finished_cache(layout.final) and _is_empty_dir(backup):
            backup.rmdir()
            swap_finished = True
            logger.warning(
                "A previous run stopped right after its swap; removed its empty "
                "backup folder %s.",
                backup,
            )
        else:
            raise FileExistsError(
                f"{backup} exists and sae-cache-ext cannot tell it is safe to remove. "
                f"Inspect it, then delete or move it, and rerun."
            )

    staging = layout.staging
    if staging.exists() or staging.is_symlink():
        marker = read_marker(staging)
        if _is_unstarted_staging(staging):
            shutil.rmtree(staging)
        elif _belongs_to(marker, layout) and staging.is_dir():
            assert marker is not None
            if _writer_still_running(marker):
                raise RuntimeError(
                    f"Another process (pid {marker['pid']}) is still writing a cache "
                    f"to {layout.final} (staging at {staging}). Wait for it to finish "
                    "or stop it; two runs cannot share an output path."
                )
            if resume is not None and resume(marker):
                return swap_finished, True
            logger.warning(
                "Removing the leftovers of an interrupted run at %s (staging folder %s).",
                layout.final,
                staging,
            )
            shutil.rmtree(staging)
        else:
            raise FileExistsError(
                f"{staging} exists but was not created by sae-cache-ext for "
                f"{layout.final}; it is left untouched. Move or delete it, and rerun."
            )
    return swap_finished, False


def check_output_free(layout: Layout) -> None:
    """Refuse an output path that holds anything (sae-lens's rule), before any work."""
    problem = output_path_problem(layout.final, str(layout.final))
    if problem is not None:
        raise FileExistsError(problem)


def new_marker(layout: Layout, fingerprint: str, **extra: Any) -> dict[str, Any]:
    return {
        "tool": TOOL,
        "state": STATE_STAGING,
        "final_path": str(layout.final),
        "fingerprint": fingerprint,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


@contextlib.contextmanager
def staging_area(
    layout: Layout,
    fingerprint: str,
    reuse: bool = False,
    keep_on_error: Callable[[BaseException], str | None] | None = None,
    lease: Lease | None = None,
    extra: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """A staging folder with our marker (holding `extra` too): fresh, or (`reuse`)
    the one an interrupted run left. If the block fails it is removed, unless
    `keep_on_error(error)` gives a reason to keep it (logged, or for Ctrl-C added
    to the interrupt as a note), or the run no longer holds `lease` (another run
    owns the folder now)."""
    layout.final.parent.mkdir(parents=True, exist_ok=True)
    staging = layout.staging
    if not reuse:
        staging.mkdir()
    try:
        marker = read_marker(staging) if reuse else None
        write_json_atomic(
            staging / MARKER,
            {**(marker or {}), **new_marker(layout, fingerprint, **(extra or {}))}
            if marker is None or marker.get("state") != STATE_COMPLETE
            else marker,
        )
        yield staging
    except BaseException as error:
        if lease is not None and not lease.held():
            logger.error(
                "This run no longer holds the lease on %s: %s is left untouched.",
                layout.final,
                staging,
            )
            raise
        reason = None
        if keep_on_error is not None and staging.exists():
            reason = keep_on_error(error)
        if reason is not None:
            if isinstance(error, KeyboardInterrupt):  # said in one line by the CLI
                error.add_note(reason)
            else:  # logged: the error's own message stays the last line
                logger.warning("%s", reason)
        elif staging.exists() and _belongs_to(read_marker(staging), layout):
            shutil.rmtree(staging, ignore_errors=True)
        elif _is_unstarted_staging(staging):
            shutil.rmtree(staging)
        raise


def swap_into_place(layout: Layout) -> None:
    """Move the finished staging folder to the output path, atomically.

    1. rename whatever stands at the output path (an empty folder) to the backup name;
    2. rename the staging folder to the output path;
    3. remove the backup, which must be empty: nothing we did not create is deleted.
    Any failure undoes the steps already done, in reverse, and re-raises.
    """
    final, staging, backup = layout.final, layout.staging, layout.backup
    moved_aside = False
    placed = False
    try:
        if final.exists() or final.is_symlink():
            os.rename(final, backup)
            moved_aside = True
        os.rename(staging, final)
        placed = True
        if moved_aside:
            backup.rmdir()
    except BaseException:
        if placed:
            os.rename(final, staging)
        if moved_aside:
            os.rename(backup, final)
        raise
    fsync_dir(final.parent)

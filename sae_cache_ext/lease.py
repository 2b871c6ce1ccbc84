"""The ownership lease of an output path: one live run at a time, on any host.

A run creates the lease file with `O_EXCL` before it touches anything at the output
path, and a heartbeat thread renews it (its mtime) while the run lives. Another run
finding the file refuses (or, asked to, waits) until the lease is released, or until
it has not been renewed for `stale_seconds`: only then is it taken over. Age is
measured on the filesystem's own clock (a probe file's mtime against the lease's),
so hosts whose clocks differ agree on it.

Host names and pids alone never decide: a holder is only known dead without waiting
when it ran in this very pid namespace on this very boot (`boot_id`, the namespace's
inode) and its pid is gone, which is how a run killed on this machine is taken over
at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_cache_ext.writer import fsync_dir

logger = logging.getLogger(__name__)

DEFAULT_STALE_SECONDS = 120.0
_TAKEOVER = ".takeover"


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it went stale): it must stop."""


def _namespace() -> str:
    """This boot and pid namespace: where a pid means the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{pidns}"


# A lease file is named (its holder written) right after its exclusive creation; one
# still unnamed after this long was left by a run killed in between.
UNNAMED_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says, and how long ago it was renewed."""

    host: str | None
    pid: int | None
    run_id: str | None
    since: str | None
    namespace: str | None
    age_seconds: float

    def describe(self) -> str:
        if self.run_id is None:
            who = "a run that has not written its name yet"
        else:
            who = f"run {self.run_id} (host {self.host}, pid {self.pid})"
        return (
            f"{who}, holding it since {self.since}, last renewed "
            f"{self.age_seconds:.0f} s ago"
        )

    def abandoned(self, stale_seconds: float) -> bool:
        """Stale, or its process is known to be gone, or it was never named (its
        creator died between creating and writing it)."""
        return (
            self.age_seconds > stale_seconds
            or self.known_dead()
            or (self.run_id is None and self.age_seconds > UNNAMED_GRACE_SECONDS)
        )

    def known_dead(self) -> bool:
        """Its process ran in our pid namespace on this boot and is gone."""
        if not self.namespace or self.namespace != _namespace() or not self.pid:
            return False
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _fs_now(folder: Path) -> float:
    """The time now on the filesystem's clock: the mtime of a fresh probe file."""
    probe = folder / f".sae-cache-ext-probe-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[str, Any], os.stat_result] | None:
    """The lease's content ({} while half-written) and stat, or None if gone."""
    try:
        stat = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = {}
    return (value if isinstance(value, dict) else {}), stat


def read_holder(path: Path) -> Holder | None:
    """Who holds the lease at `path`, or None if there is none."""
    found = _read(path)
    if found is None:
        return None
    value, stat = found
    return Holder(
        host=value.get("host"),
        pid=value.get("pid"),
        run_id=value.get("run_id"),
        since=value.get("since"),
        namespace=value.get("namespace"),
        age_seconds=max(0.0, _fs_now(path.parent) - stat.st_mtime),
    )


class Lease:
    """A held lease: renewed on a heartbeat thread until `release()`."""

    def __init__(
        self,
        path: Path,
        run_id: str,
        heartbeat_seconds: float,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
    ) -> None:
        self.path = path
        self.run_id = run_id
        self._stale_seconds = stale_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(
            target=self._beat, name="sae-cache-ext-lease", daemon=True
        )
        self._thread.start()

    @classmethod
    def acquire(
        cls,
        path: Path,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
        wait: bool = False,
        what: str = "",
    ) -> Lease:
        """Create the lease at `path` (taking over a stale one), or raise
        `LeaseHeldError` naming its holder; with `wait`, wait for it instead.
        `what` names the thing it guards, for the messages."""
        heartbeat = max(0.05, min(10.0, stale_seconds / 12))
        run_id = uuid.uuid4().hex[:12]
        waiting_since = None
        while True:
            if _create(path, run_id):
                return cls(path, run_id, heartbeat, stale_seconds)
            holder = read_holder(path)
            if holder is None:
                continue  # released meanwhile
            if holder.run_id is None and holder.age_seconds <= UNNAMED_GRACE_SECONDS:
                time.sleep(0.05)  # its creator writes its name next, or died
                continue
            if holder.abandoned(stale_seconds):
                logger.warning(
                    "Taking over the lease on %s from %s (%s).",
                    what or path,
                    holder.describe(),
                    "its process is gone"
                    if holder.known_dead()
                    else "never named: its run died creating it"
                    if holder.run_id is None
                    else f"stale after {stale_seconds:.0f} s",
                )
                _remove_if_unchanged(path, stale_seconds, run_id)
                continue
            if not wait:
                raise LeaseHeldError(
                    f"{what or path} is in use by another sae-cache-ext run: "
                    f"{holder.describe()} (lease file {path}). Two runs cannot "
                    "share an output path: wait for that run to finish or stop it, "
                    "set wait_for_lease=True to wait for it, or choose another "
                    "new_cached_activations_path. A lease not renewed for "
                    f"lease_stale_seconds={stale_seconds:g} is taken over."
                )
            if waiting_since is None:
                waiting_since = time.monotonic()
                logger.warning(
                    "Waiting for %s: in use by %s.", what or path, holder.describe()
                )
            time.sleep(min(heartbeat, 5.0))

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_seconds):
            if not self.held():
                self.lost = True
                logger.error(
                    "This run's lease %s was taken over by another run: this run "
                    "will stop before touching the output path.",
                    self.path,
                )
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def held(self) -> bool:
        """Whether the lease file is still this run's."""
        found = _read(self.path)
        return found is not None and found[0].get("run_id") == self.run_id

    def check(self) -> None:
        """Raise `LeaseLostError` if another run has taken the lease over."""
        if self.lost or not self.held():
            self.lost = True
            raise LeaseLostError(
                f"This run lost its lease {self.path}: it was not renewed for "
                "lease_stale_seconds and another run took it over. Nothing was "
                "moved into place; rerun once the other run is done."
            )

    def release(self) -> None:
        """Stop renewing and remove the lease file (if it is still ours)."""
        self._stop.set()
        self._thread.join()
        if self.held():
            self.path.unlink(missing_ok=True)
            # a takeover file left by a run killed while taking this lease over
            _clear_abandoned(_takeover_path(self.path), self._stale_seconds)
            fsync_dir(self.path.parent)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def _create(path: Path, run_id: str) -> bool:
    """Create the lease file exclusively; False if one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        value = {
            "tool": "sae-cache-ext",
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "namespace": _namespace(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.write(fd, json.dumps(value).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return True


def _remove_if_unchanged(path: Path, stale_seconds: float, run_id: str) -> None:
    """Remove the stale lease at `path`, unless it changed meanwhile. Contenders
    take turns through an exclusively created `<lease>.takeover` file (naming its
    holder, as a lease does), and each re-reads the lease under it, so a lease just
    created by the winner is never removed by a slower contender."""
    mutex = _takeover_path(path)
    if not _create(mutex, run_id):
        _clear_abandoned(mutex, stale_seconds)  # a contender died mid-takeover
        time.sleep(0.01)
        return
    try:
        holder = read_holder(path)
        if holder is not None and holder.abandoned(stale_seconds):
            try:
                path.unlink()
            except OSError as error:  # pragma: no cover - a race lost to a rm
                if error.errno != errno.ENOENT:
                    raise
    finally:
        mutex.unlink(missing_ok=True)


def _takeover_path(path: Path) -> Path:
    return path.with_name(path.name + _TAKEOVER)


def _clear_abandoned(mutex: Path, stale_seconds: float) -> None:
    """Remove the takeover file `mutex` if its holder is gone (killed while taking
    a lease over), so it never outlives the runs."""
    holder = read_holder(mutex)
    if holder is not None and holder.abandoned(stale_seconds):
        mutex.unlink(missing_ok=True)

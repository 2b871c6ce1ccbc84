"""Measuring one run, inside its own process: wall and CPU time, peak RSS above the
RSS at the start (the kernel's peak counter is reset there), disk writes from
`/proc/self/io`, and peak disk use from a thread that sums the run folder's sizes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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

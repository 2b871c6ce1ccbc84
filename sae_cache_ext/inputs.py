"""A fingerprint of a run's inputs: the dataset's content, the weights, the device.

The config fingerprint says what a run was asked to do; this says what it was given.
Both are recorded in the staging marker and the finished manifest, and a resume (or
a finished cache returned as this run's) must match both. The weights' sha256 is
the manifest's (`manifest.weights_sha256`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

_NAMES = {"dataset": "dataset", "weights_sha256": "model weights", "device": "device"}


@dataclass(frozen=True)
class Inputs:
    """What a run computes from, as comparable strings (None: not known)."""

    dataset: str | None  # `datasets`' `_fingerprint`, or a hash of local files
    weights_sha256: str | None
    device: str | None  # the kind of device, e.g. "cpu" or "cuda NVIDIA H200"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def dataset_fingerprint(dataset: Any, dataset_path: str | None) -> str | None:
    """`datasets`' fingerprint of the data (content-derived for in-memory data,
    cache files' for loaded data) and, for a local path, its files' sizes and
    mtimes. None for a stream that has neither."""
    parts = []
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str):
        parts.append(fingerprint)
    local = _local_files_digest(dataset_path)
    if local is not None:
        parts.append(local)
    return "-".join(parts) if parts else None


def _local_files_digest(dataset_path: str | None) -> str | None:
    """Local files by name, size and mtime (hashing a large corpus's content would
    cost as much as reading it)."""
    if not dataset_path:
        return None
    root = Path(dataset_path).expanduser()
    if not root.exists():
        return None
    files = (
        [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    )
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root.parent)}\0{stat.st_size}\0".encode())
        digest.update(str(stat.st_mtime_ns).encode())
    return "files:" + digest.hexdigest()[:16]


def device_kind(model: torch.nn.Module) -> str:
    """The kind of device the model runs on (not its index: `cuda:0` and `cuda:1`
    of one machine compute alike)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return "cpu"
    device = parameter.device
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def differences(before: dict[str, Any] | None, now: Inputs) -> list[str]:
    """What changed between a recorded fingerprint and this one, as
    `what: before -> now` lines (an input unknown on either side is not compared)."""
    if not before:
        return []
    changed = []
    for key, value in now.to_json().items():
        old = before.get(key)
        if old is not None and value is not None and old != value:
            changed.append(f"{_NAMES[key]}: {old} -> {value}")
    return changed

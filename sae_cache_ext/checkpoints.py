"""A resumable run's progress, saved in its staging folder after every step.

`checkpoint.json` says where the run is (which buffers are written, how far the
store has read, what the sink holds); tensors carried from one buffer to the next
go beside it in `carry.pt`. Both are replaced atomically, so a crash leaves the
previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sae_cache_ext.writer import write_json_atomic

CHECKPOINT = "checkpoint.json"
CARRY = "carry.pt"


def save(folder: Path, state: dict[str, Any]) -> None:
    """Save `state`; a `carry` entry (tensors or None) goes to its own file."""
    state = dict(state)
    carry = state.pop("carry", None)
    if carry is not None:
        tmp = folder / (CARRY + ".tmp")
        torch.save(carry, tmp)
        os.replace(tmp, folder / CARRY)
    state["carry"] = carry is not None
    write_json_atomic(folder / CHECKPOINT, state)


def load(folder: Path) -> dict[str, Any] | None:
    """The last saved state, with `carry` loaded back, or None if there is none."""
    try:
        state = json.loads((folder / CHECKPOINT).read_text())
    except FileNotFoundError:
        return None
    state["carry"] = torch.load(folder / CARRY) if state.get("carry") else None
    return state


def remove(folder: Path) -> None:
    for name in (CHECKPOINT, CARRY):
        (folder / name).unlink(missing_ok=True)

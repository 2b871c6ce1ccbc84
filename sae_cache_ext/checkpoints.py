"""A resumable run's progress, saved in its staging folder after every step.

`checkpoint.json` says where the run is (which buffers are written, how far the
store has read, what the sink holds); tensors carried from one buffer to the next
go beside it in a `carry-*.pt` file that the checkpoint names. Each is written
under a new name or replaced atomically, so a crash leaves the previous checkpoint
or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from sae_cache_ext.writer import write_json_atomic

CHECKPOINT = "checkpoint.json"
CARRY_PREFIX = "carry-"


def save(folder: Path, state: dict[str, Any]) -> None:
    """Save `state`; a `carry` entry (tensors or None) goes to its own file, named
    in the checkpoint, so the JSON never points at another checkpoint's carry."""
    state = dict(state)
    carry = state.pop("carry", None)
    state["carry"] = None
    if carry is not None:
        name = f"{CARRY_PREFIX}{time.time_ns()}.pt"
        tmp = folder / (name + ".tmp")
        torch.save(carry, tmp)
        os.replace(tmp, folder / name)
        state["carry"] = name
    write_json_atomic(folder / CHECKPOINT, state)
    for old in folder.glob(f"{CARRY_PREFIX}*"):  # the ones no checkpoint names now
        if old.name != state["carry"]:
            old.unlink(missing_ok=True)


def load(folder: Path) -> dict[str, Any] | None:
    """The last saved state, with `carry` loaded back, or None if there is none."""
    try:
        state = json.loads((folder / CHECKPOINT).read_text())
    except FileNotFoundError:
        return None
    state["carry"] = torch.load(folder / state["carry"]) if state.get("carry") else None
    return state


def remove(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
    for carry in folder.glob(f"{CARRY_PREFIX}*"):
        carry.unlink(missing_ok=True)

"""A resumable run's progress, saved in its staging folder after every step.

One dataclass, `Checkpoint`, says where the run is: in the caching phase, the
producer's state (which buffers are built, how far the source has read, the tokens
carried to the next buffer) and the sink's (what is on disk); in the gather phase,
the sink's state with the gather's progress and the caching facts for the manifest.
The caching phase also carries the activation statistics so far and the envelope.
`checkpoint.json` holds it; tensors carried from one buffer to the next go beside it
in a `carry-*.pt` file that the checkpoint names. Each is written under a new name
or replaced atomically, so a crash leaves the previous checkpoint or the new one,
never a mix. What a checkpoint counts is on stable storage before it is: the sink
syncs its files (`Sink.sync`) before `save`, which syncs the carried tensors, the
checkpoint and the folder's entries.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from sae_cache_ext.producer import ProducerState
from sae_cache_ext.shuffle import SinkState, sink_state_from_json
from sae_cache_ext.source import SourceState
from sae_cache_ext.statistics import CacheStatistics
from sae_cache_ext.writer import fsync_dir, write_json_atomic

CHECKPOINT = "checkpoint.json"
CARRY_PREFIX = "carry-"


class Phase(str, Enum):
    CACHING = "caching"  # buffers are being built and written
    GATHER = "gather"  # every buffer is written; the sink is finishing


@dataclass
class Checkpoint:
    phase: Phase
    sink: SinkState
    producer: ProducerState | None = None  # in the caching phase
    facts: dict[str, Any] | None = None  # in the gather phase: the caching facts
    # in the caching phase: the statistics of the buffers written so far, and the
    # envelope once measured (in the gather phase both are among the facts)
    statistics: CacheStatistics | None = None
    envelope: dict[str, Any] | None = None


def save(folder: Path, checkpoint: Checkpoint) -> None:
    """Save `checkpoint`; the producer's carried tensors go to their own file,
    named in the checkpoint, so the JSON never points at another checkpoint's."""
    producer = checkpoint.producer
    carry_name = None
    if producer is not None and producer.carry is not None:
        carry_name = f"{CARRY_PREFIX}{time.time_ns()}.pt"
        tmp = folder / (carry_name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(producer.carry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / carry_name)
    value = {
        "phase": checkpoint.phase.value,
        "sink": checkpoint.sink.to_json(),
        "producer": None
        if producer is None
        else {
            "buffers_done": producer.buffers_done,
            "rows_cached": producer.rows_cached,
            "source": None if producer.source is None else asdict(producer.source),
        },
        "carry": carry_name,
        "facts": checkpoint.facts,
        "statistics": None
        if checkpoint.statistics is None
        else checkpoint.statistics.to_json(),
        "envelope": checkpoint.envelope,
    }
    write_json_atomic(folder / CHECKPOINT, value)
    fsync_dir(folder)  # the new names are durable before the old carry goes
    for old in folder.glob(f"{CARRY_PREFIX}*"):  # the ones no checkpoint names now
        if old.name != carry_name:
            old.unlink(missing_ok=True)


def load(folder: Path) -> Checkpoint | None:
    """The last saved checkpoint, or None if there is none."""
    try:
        value = json.loads((folder / CHECKPOINT).read_text())
    except FileNotFoundError:
        return None
    producer = None
    if value["producer"] is not None:
        p = value["producer"]
        producer = ProducerState(
            buffers_done=p["buffers_done"],
            rows_cached=p["rows_cached"],
            source=None if p["source"] is None else SourceState(**p["source"]),
            carry=torch.load(folder / value["carry"]) if value["carry"] else None,
        )
    return Checkpoint(
        phase=Phase(value["phase"]),
        sink=sink_state_from_json(value["sink"]),
        producer=producer,
        facts=value["facts"],
        statistics=None
        if value.get("statistics") is None
        else CacheStatistics.from_json(value["statistics"]),
        envelope=value.get("envelope"),
    )


def remove(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
    for carry in folder.glob(f"{CARRY_PREFIX}*"):
        carry.unlink(missing_ok=True)

"""Data-parallel caching: which rank this process is, and the few collectives used.

Under `torchrun` (or any launcher that sets `RANK`, `WORLD_SIZE` and `MASTER_ADDR`),
every rank reads its own part of the dataset, runs its own model replica and writes
its buffers into its own folder inside the shared staging area; rank 0 then merges
them into one dataset. Two collectives are used, each carrying small Python objects:
a broadcast of the plan from rank 0, then after each phase (caching, merging,
gathering, putting the cache in place) an all-gather of every rank's outcome
(`World.agree`): a rank that failed sends its error instead of waiting, and every
rank then fails at once with it. The wait at a collective is bounded by
`distributed_timeout_minutes`.

The backend is gloo on CPU and NCCL when the run's device is CUDA. A rank that dies
makes the others fail at their next collective (and torchrun stops the job); the
staging folder stays hidden, so no partial dataset is ever visible.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sae_cache_ext.accounting import merge_summaries
from sae_cache_ext.envelope import merge_envelopes
from sae_cache_ext.statistics import merge_statistics

logger = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Raised on every rank when one or more ranks failed at a phase."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(
        self, phase: str, value: Any = None, error: BaseException | None = None
    ) -> list[Any]:
        """Every rank's `value` for `phase`, rank by rank, once every rank got there;
        if any rank brings an `error`, every rank raises `RankFailed` naming each
        failed rank and its error (the local error as the cause)."""
        outcome = None if error is None else f"{type(error).__name__}: {error}"
        if self.distributed:
            outcomes: list[Any] = [None] * self.size
            dist.all_gather_object(outcomes, (outcome, value))
        else:
            outcomes = [(outcome, value)]
        failed = [(r, o) for r, (o, _) in enumerate(outcomes) if o is not None]
        if failed:
            named = "; ".join(f"rank {r}: {o}" for r, o in failed)
            raise RankFailed(f"The run failed while {phase} ({named}).") from error
        return [v for _, v in outcomes]

    def phase(self, name: str, work: Callable[[], Any]) -> list[Any]:
        """Run `work` here, then `agree` on its outcome: every rank's result, or
        `RankFailed` on every rank if it failed on any."""
        try:
            value = work()
        except BaseException as error:  # handed to every rank, then raised
            return self.agree(name, error=error)
        return self.agree(name, value)


def world_from_env(device: str, timeout_minutes: float = 360.0) -> World:
    """The `World` torchrun describes in the environment, with the process group
    started if it is not yet (gloo on CPU, NCCL on CUDA; its collectives wait
    `timeout_minutes`); a single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={size} asks for a data-parallel run, but this torch build "
            "has no torch.distributed."
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        # NCCL collectives run on the current device: make it this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, timeout=timeout)
    world = World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    logger.info("Rank %d of %d (%s backend)", world.rank, world.size, backend)
    return world


def rank_device(device: str, world: World) -> str:
    """`cuda` means this rank's own GPU (`cuda:LOCAL_RANK`) in a data-parallel run;
    any other device is kept as it is."""
    if world.distributed and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def rows_of_rank(total_rows: int, world: World, rank: int | None = None) -> int:
    """How many of `total_rows` rows rank `rank` (default: this one) caches: an
    even split, the first ranks taking one more when it does not divide."""
    rank = world.rank if rank is None else rank
    return total_rows // world.size + int(rank < total_rows % world.size)


def merge_rank_facts(ranks: list[dict[str, Any]], world: World) -> dict[str, Any]:
    """The facts each rank recorded about its caching, as one run's, plus a
    `data_parallel` entry with the world size and every rank's counts."""
    writers = [facts["writer"] for facts in ranks]
    return {
        "dataset_exhaustion": {
            "exhausted": any(f["dataset_exhaustion"]["exhausted"] for f in ranks),
            "repeats": max(f["dataset_exhaustion"]["repeats"] for f in ranks),
        },
        "accounting": merge_summaries([facts["accounting"] for facts in ranks]),
        "writer": {
            "overflow_policy": writers[0]["overflow_policy"],
            "stall_seconds": sum(w["stall_seconds"] for w in writers),
            "stalls": sum(w["stalls"] for w in writers),
            "max_queue_depth": max(w["max_queue_depth"] for w in writers),
            "write_seconds": sum(w["write_seconds"] for w in writers),
        },
        "caching_seconds": max(facts["caching_seconds"] for facts in ranks),
        "resumed": any(facts["resumed"] for facts in ranks),
        "statistics": merge_statistics([facts["statistics"] for facts in ranks]),
        "envelope": merge_envelopes([facts["envelope"] for facts in ranks]),
        "data_parallel": {
            "world_size": world.size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "ranks": [
                {
                    "rank": rank,
                    "rows": facts["rows"],
                    "documents_read": facts["accounting"]["documents_read"],
                    "source_tokens_read": facts["accounting"]["source_tokens_read"],
                    "caching_seconds": facts["caching_seconds"],
                    "exhausted": facts["dataset_exhaustion"]["exhausted"],
                    "resumed": facts["resumed"],
                }
                for rank, facts in enumerate(ranks)
            ],
        },
    }

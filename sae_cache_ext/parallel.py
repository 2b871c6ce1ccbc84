"""Data-parallel caching: the plan, every rank's part, and rank 0's merge.

Rank 0 recovers the output path and broadcasts the plan (`RankPlan`); every rank
caches its part into its own folder of the shared staging area and writes
`done.json` there; after a barrier rank 0 moves every rank's files into one sink
(`Sink.merge`), records that in a checkpoint, removes the rank folders, finishes the
sink and swaps the whole into place. Which rank this is and the collectives are
`distributed`'s.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_cache_ext import checkpoints, lifecycle, staging
from sae_cache_ext.checkpoints import Checkpoint, Phase
from sae_cache_ext.distributed import World, merge_rank_facts
from sae_cache_ext.pipeline import Pipeline
from sae_cache_ext.shuffle import sink_state_from_json
from sae_cache_ext.writer import write_json_atomic

# Rank r caches into `<staging>/rank-0000r/` and writes `done.json` there when its
# part is complete.
RANK_FOLDER_PREFIX = "rank-"
RANK_DONE = "done.json"


@dataclass(frozen=True)
class RankPlan:
    """What rank 0 tells the other ranks before any caching."""

    folder: str | None = None  # the staging folder
    resumable: bool = False  # continue the parts already there
    built: bool = False  # the staging folder holds the finished cache already
    finished: bool = False  # the output path holds it already: nothing to do
    n_buckets: int = 0
    error: str | None = None  # rank 0 failed before the plan


def rank_folder(folder: Path, rank: int) -> Path:
    return folder / f"{RANK_FOLDER_PREFIX}{rank:05d}"


def run_data_parallel(
    pipeline: Pipeline, world: World, run: lifecycle.Run | None
) -> None:
    """Cache this rank's part; on rank 0 (given `run`), also merge, finish and
    swap. Returns on every rank once the cache is in place."""
    if world.is_main:
        assert run is not None
        _lead(pipeline, world, run)
    else:
        plan: RankPlan = world.broadcast(None)
        if plan.error is not None:
            raise RuntimeError(f"Rank 0 could not start the run: {plan.error}")
        if not plan.finished and not plan.built and plan.folder is not None:
            pipeline.n_buckets = plan.n_buckets
            cache_rank(pipeline, world, Path(plan.folder), plan.resumable)
            world.barrier()  # every rank has cached its part
    world.barrier()  # the cache is in place


def _lead(pipeline: Pipeline, world: World, run: lifecycle.Run) -> None:
    """Rank 0's part, holding the output path's lease. Any error before the plan
    is sent reaches the other ranks (they are waiting for the plan)."""
    plan_sent = False
    try:
        with lifecycle.owned(run) as lease:
            recovery = lifecycle.recover(run, lease)
            if recovery.finished:
                plan_sent = True
                world.broadcast(RankPlan(finished=True))
                return
            if recovery.plan is not None:  # the kept run's, e.g. its buckets
                pipeline.n_buckets = recovery.plan["n_buckets"]
            pipeline.start_run_facts()
            with lifecycle.staged(run, recovery, lease) as folder:
                plan = RankPlan(
                    folder=str(folder),
                    resumable=recovery.resumable,
                    built=staging.is_our_finished_cache(folder),
                    n_buckets=pipeline.n_buckets,
                )
                plan_sent = True
                world.broadcast(plan)
                if not plan.built:
                    cache_rank(pipeline, world, folder, plan.resumable)
                    world.barrier()  # every rank has cached its part
                    merge_ranks(pipeline, world, folder, plan.resumable)
    except BaseException as error:
        if not plan_sent:
            world.broadcast(RankPlan(error=f"{type(error).__name__}: {error}"))
        raise


def cache_rank(pipeline: Pipeline, world: World, folder: Path, resumable: bool) -> None:
    """This rank's part, cached into its own folder of the staging area, with
    `done.json` (its sink's state and its facts) written when complete."""
    if resumable and checkpoints.load(folder) is not None:
        return  # rank 0 had started merging: every part is cached
    own = rank_folder(folder, world.rank)
    done = own / RANK_DONE
    if resumable and done.exists():
        return
    own.mkdir(exist_ok=True)
    checkpoint = checkpoints.load(own) if resumable else None
    sink, facts = pipeline.cache(own, checkpoint)
    sink.sync()  # `done.json` counts these bytes
    sink.close()
    write_json_atomic(done, {"sink": sink.state().to_json(), "facts": facts.to_json()})


def merge_ranks(
    pipeline: Pipeline, world: World, folder: Path, resumable: bool
) -> None:
    """Rank 0: move every rank's files into one sink (recorded in a checkpoint
    before the rank folders go), then finish and describe it."""
    marker = staging.read_marker(folder) or {}
    checkpoint = checkpoints.load(folder) if resumable else None
    if checkpoint is not None:
        sink = pipeline.resume_sink(folder, checkpoint)
        facts: dict[str, Any] = {**(checkpoint.facts or {}), "resumed": True}
    else:
        folders = [rank_folder(folder, r) for r in range(world.size)]
        ranks = [json.loads((f / RANK_DONE).read_text()) for f in folders]
        sink = pipeline.make_sink(folder)
        parts = [
            (f, sink_state_from_json(done["sink"]))
            for f, done in zip(folders, ranks, strict=True)
        ]
        sink.merge(parts)  # type: ignore[arg-type]
        facts = merge_rank_facts([done["facts"] for done in ranks], world)
        facts["resumed"] = facts["resumed"] or resumable
        checkpoints.save(folder, Checkpoint(Phase.GATHER, sink.state(), facts=facts))
    # every rank's files are in the sink now (a resumed merge may find some rank
    # folders left by a crash in this very loop)
    for rank in range(world.size):
        shutil.rmtree(rank_folder(folder, rank), ignore_errors=True)
    pipeline.finish(folder, sink, facts, marker)

"""Data-parallel caching: the plan, every rank's part, the merge and the gather.

Rank 0 recovers the output path and broadcasts the plan (`RankPlan`). Then, with
every rank's outcome exchanged after each phase (`World.phase`: a failure anywhere
fails every rank at once, with its error):
1. caching: every rank caches its part into its own folder of the shared staging
   area and writes `done.json` there;
2. merging: rank 0 moves every rank's files into one sink (`Sink.merge`) and
   records that, with the gather's plan, in a checkpoint before the rank folders go;
3. gathering: with the shuffle, every rank gathers its share of the buckets (shard
   positions rank, rank + N, ...) into the staging area, recording its progress in
   `gather-rank-0000r.json`; without it, rank 0 renames the shards;
4. rank 0 describes the dataset and swaps it into place.
The shards are numbered by bucket, so the bytes are those of one process gathering
every bucket. Which rank this is and the collectives are `distributed`'s.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_cache_ext import checkpoints, lifecycle, staging
from sae_cache_ext.checkpoints import Checkpoint, Phase
from sae_cache_ext.distributed import RankFailed, World, merge_rank_facts
from sae_cache_ext.pipeline import Pipeline
from sae_cache_ext.shuffle import (
    BucketShuffleSink,
    BucketState,
    Gathered,
    Shards,
    gathered_from_json,
    gathered_to_json,
    shards_in_order,
    sink_state_from_json,
)
from sae_cache_ext.writer import write_json_atomic

# Rank r caches into `<staging>/rank-0000r/` and writes `done.json` there when its
# part is complete.
RANK_FOLDER_PREFIX = "rank-"
RANK_DONE = "done.json"
# Rank r's gathered shards, in the staging folder until the dataset is described.
GATHER_PROGRESS = "gather-rank-{rank:05d}.json"


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
    """Cache this rank's part and gather its share; on rank 0 (given `run`), also
    plan, merge, describe and swap. Returns on every rank once the cache is in
    place, or raises on every rank if any failed."""
    error = None
    try:
        if world.is_main:
            if run is None:
                raise ValueError("rank 0 of a data-parallel run needs its Run")
            _lead(pipeline, world, run)
        else:
            _follow(pipeline, world)
    except RankFailed:
        raise  # every rank knows already
    except BaseException as failure:  # handed to every rank below
        error = failure
    world.agree("putting the cache in place", error=error)


def _follow(pipeline: Pipeline, world: World) -> None:
    plan: RankPlan = world.broadcast(None)
    if plan.error is not None:
        raise RuntimeError(f"Rank 0 could not start the run: {plan.error}")
    if not plan.finished and not plan.built and plan.folder is not None:
        pipeline.n_buckets = plan.n_buckets
        _cache_and_gather(pipeline, world, Path(plan.folder), plan.resumable)


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
                    _cache_and_gather(pipeline, world, folder, plan.resumable)
    except BaseException as error:
        if not plan_sent:
            world.broadcast(RankPlan(error=f"{type(error).__name__}: {error}"))
        raise


def _cache_and_gather(
    pipeline: Pipeline, world: World, folder: Path, resumable: bool
) -> None:
    """The phases every rank goes through; rank 0 then describes the dataset."""
    world.phase("caching", lambda: cache_rank(pipeline, world, folder, resumable))
    started = time.perf_counter()
    facts = world.phase(
        "merging",
        lambda: (
            merge_ranks(pipeline, world, folder, resumable) if world.is_main else None
        ),
    )[0]
    gathered = world.phase("gathering", lambda: gather_share(pipeline, world, folder))
    if world.is_main:
        shards = _shards_of(pipeline, folder, world, gathered)
        marker = staging.read_marker(folder) or {}
        pipeline.describe(folder, shards, facts, marker, started)


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
) -> dict[str, Any]:
    """Rank 0: move every rank's files into one sink and record that, with the
    gather's plan, in a checkpoint before the rank folders go. Returns the caching
    facts of every rank, merged."""
    checkpoint = checkpoints.load(folder) if resumable else None
    if checkpoint is not None:  # merged before: the files are in the sink already
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
        if isinstance(sink, BucketShuffleSink):
            sink.start_gather()
        facts = merge_rank_facts([done["facts"] for done in ranks], world)
        facts["resumed"] = facts["resumed"] or resumable
        checkpoints.save(folder, Checkpoint(Phase.GATHER, sink.state(), facts=facts))
    # every rank's files are in the sink now (a resumed merge may find some rank
    # folders left by a crash in this very loop)
    for rank in range(world.size):
        shutil.rmtree(rank_folder(folder, rank), ignore_errors=True)
    return facts


def gather_share(pipeline: Pipeline, world: World, folder: Path) -> Gathered | Shards:
    """This rank's share of the gather: the shards at positions rank, rank + N, ...
    of the merged plan, by position (those gathered before a resume included).
    Without the shuffle, rank 0 renames every shard and returns them all."""
    checkpoint = checkpoints.load(folder)
    if checkpoint is None:
        raise RuntimeError(f"{folder} has no checkpoint of the merge to gather from.")
    if not isinstance(checkpoint.sink, BucketState):
        if not world.is_main:
            return {}
        sink = pipeline.resume_sink(folder, checkpoint)
        return sink.finish(quiet=pipeline.quiet)
    sink = BucketShuffleSink(
        folder, pipeline.schema, seed=pipeline.cfg.seed, n_buckets=pipeline.n_buckets
    )
    sink.adopt(checkpoint.sink)
    gather = sink.start_gather()
    progress = folder / GATHER_PROGRESS.format(rank=world.rank)
    if progress.exists():
        gather.done.update(gathered_from_json(json.loads(progress.read_text())))
    mine = range(world.rank, len(gather.buckets), world.size)

    def record(state: BucketState) -> None:
        done = state.gather.done if state.gather is not None else {}
        write_json_atomic(
            progress, gathered_to_json({p: done[p] for p in mine if p in done})
        )

    return sink.gather(mine, pipeline.quiet, record)


def _shards_of(
    pipeline: Pipeline, folder: Path, world: World, gathered: list[Any]
) -> Shards:
    """Rank 0: every rank's gathered shards in order, with the gather's leftovers
    (the emptied bucket folder, the progress files) removed."""
    if not pipeline.cfg.shuffle:
        return gathered[0]
    done: Gathered = {}
    for part in gathered:
        done.update(part)
    (folder / "buckets").rmdir()
    for rank in range(world.size):
        (folder / GATHER_PROGRESS.format(rank=rank)).unlink(missing_ok=True)
    return shards_in_order(pipeline.schema, done)

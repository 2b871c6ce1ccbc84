"""Where buffers go: straight to shards in generation order, or through a persisted,
seeded global row shuffle.

The shuffle takes two passes and never holds more than about two buffers in memory:

1. scatter: each buffer sends every row, at random (`Generator(seed, buffer index)`),
   to one of K bucket files, appending one record batch per bucket;
2. gather: each bucket is read whole, permuted in memory
   (`Generator(seed, bucket index)`), written as final shard k, and deleted.

Every row lands in a uniformly random bucket and every bucket is permuted uniformly,
so the concatenated buckets are a uniform random permutation of all rows. The data is
written once more than without the shuffle, read sequentially, and the disk holds at
most the dataset plus one bucket (1 + 1/K of the final size).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_cache_ext.bucket_files import append_batches, choose_n_buckets
from sae_cache_ext.gather import PlannedShard, gather_shards
from sae_cache_ext.packing import Stream, assign_buckets, seeded_generator
from sae_cache_ext.shard_files import ShardInfo, write_split_tables
from sae_cache_ext.writer import (
    CacheSchema,
    fsync_dir,
    gathered_tables,
    release_freed_memory,
)

logger = logging.getLogger(__name__)
__all__ = ["choose_n_buckets"]  # re-exported: the runner sizes the shuffle with it
# Shards of every dataset a sink writes, by subfolder ("" is the folder itself).
Shards = dict[str, list[ShardInfo]]


def _shards_from_json(value: dict[str, Any]) -> Shards:
    return {d: [ShardInfo(**s) for s in infos] for d, infos in value.items()}


@dataclass
class OrderedState:
    """The buffers an ordered sink has written: run-wide number -> one shard per
    dataset (in `CacheSchema.outputs` order)."""

    shards: dict[int, list[ShardInfo]]

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": {
                str(i): [asdict(info) for info in infos]
                for i, infos in self.shards.items()
            }
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> OrderedState:
        return cls(
            {
                int(i): [ShardInfo(**v) for v in infos]
                for i, infos in value["shards"].items()
            }
        )


# A gather's shards written so far: position -> one shard per dataset (in
# `CacheSchema.outputs` order). Shard `position` is bucket `buckets[position]`.
Gathered = dict[int, list[ShardInfo]]


def gathered_to_json(done: Gathered) -> dict[str, Any]:
    return {str(p): [asdict(info) for info in infos] for p, infos in done.items()}


def gathered_from_json(value: dict[str, Any]) -> Gathered:
    if any(not key.isdigit() for key in value):  # {dataset: [shards in order]}
        shards = _shards_from_json(value)
        return {
            p: list(infos) for p, infos in enumerate(zip(*shards.values(), strict=True))
        }
    return {int(p): [ShardInfo(**v) for v in infos] for p, infos in value.items()}


@dataclass
class GatherState:
    """How far the gather is: the buckets to gather, in order, and the shards
    written so far."""

    buckets: list[int]
    done: Gathered

    def to_json(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "done": gathered_to_json(self.done)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> GatherState:
        return cls(list(value["buckets"]), gathered_from_json(value["done"]))


@dataclass
class BucketState:
    """A bucket sink's part files with their sizes, and its gather's progress.

    `session` numbers the part files of each run (a first run, then each resume)."""

    session: int
    parts: dict[int, list[tuple[str, int]]]  # bucket -> [(part file, bytes)]
    gather: GatherState | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "parts": {
                str(k): [[name, size] for name, size in parts]
                for k, parts in self.parts.items()
            },
            "gather": None if self.gather is None else self.gather.to_json(),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BucketState:
        gather = value.get("gather")
        return cls(
            session=int(value["session"]),
            parts={
                int(k): [(str(name), int(size)) for name, size in parts]
                for k, parts in value["parts"].items()
            },
            gather=None if gather is None else GatherState.from_json(gather),
        )


SinkState = OrderedState | BucketState


def sink_state_from_json(value: dict[str, Any]) -> SinkState:
    return (
        BucketState.from_json(value)
        if "parts" in value
        else OrderedState.from_json(value)
    )


# Called with a sink's state after each gathered shard, to record it for a resume.
Checkpoint = Callable[[BucketState], None]


def shard_name(index: int, total: int) -> str:
    return f"data-{index:05d}-of-{total:05d}.arrow"


def shards_in_order(schema: CacheSchema, done: Gathered) -> Shards:
    """The gathered shards of every dataset, by position."""
    shards: Shards = {subdir: [] for subdir, _ in schema.outputs}
    for position in sorted(done):
        for subdir, info in zip(shards, done[position], strict=True):
            shards[subdir].append(info)
    return shards


def _targets(folder: Path, schema: CacheSchema, name: str) -> list[tuple[Path, Any]]:
    """Shard `name` of every dataset of `schema` in `folder`, with its features."""
    return [(folder / subdir / name, features) for subdir, features in schema.outputs]


def _write_shards(
    folder: Path, schema: CacheSchema, name: str, tables: Any
) -> list[ShardInfo]:
    """Write `tables` as shard `name` of every dataset of `schema` in `folder`."""
    return write_split_tables(_targets(folder, schema, name), tables)


def _check_size(path: Path, recorded: int) -> int:
    """The size of `path`, refusing one shorter than the checkpoint recorded (its
    end was lost, e.g. in a power cut: padding it would drop rows silently)."""
    size = path.stat().st_size if path.exists() else None
    if size is None or size < recorded:
        raise ValueError(
            f"Cannot resume: {path} "
            + ("is missing" if size is None else f"holds {size} bytes")
            + f" but the checkpoint recorded {recorded} bytes (its end was lost, "
            "e.g. in a power cut). Rerun with resume=False to start over."
        )
    return size


def _make_output_folders(folder: Path, schema: CacheSchema) -> None:
    for subdir, _ in schema.outputs:
        (folder / subdir).mkdir(exist_ok=True)


class OrderedSink:
    """Writes each buffer as one shard, in generation order."""

    def __init__(self, folder: Path, schema: CacheSchema):
        self.folder = folder
        self.schema = schema
        _make_output_folders(folder, schema)
        self._shards: dict[int, list[ShardInfo]] = {}

    def write_buffer(
        self,
        index: int,
        acts_RTD: torch.Tensor,
        toks_RT: torch.Tensor,
        order_N: torch.Tensor | None = None,
    ) -> None:
        """Write buffer `index` as one shard, its tokens in `order_N` if given."""
        tables = gathered_tables(self.schema, acts_RTD, toks_RT, order_N)
        name = f"buffer-{index:05d}.arrow"
        self._shards[index] = _write_shards(self.folder, self.schema, name, tables)
        del tables, acts_RTD, toks_RT
        release_freed_memory()

    def close(self) -> None:
        """Nothing is held open between buffers."""

    def state(self) -> OrderedState:
        """What a resumed run needs to know of the buffers written so far."""
        return OrderedState(dict(self._shards))

    def sync(self) -> None:
        """Make the written shards' names durable (their bytes already are)."""
        for subdir, _ in self.schema.outputs:
            fsync_dir(self.folder / subdir, strict=True)

    def restore(self, state: OrderedState) -> None:
        """Take back the written buffers (refusing a shard shorter than recorded);
        drop files of buffers written later."""
        for infos in state.shards.values():
            for (subdir, _), info in zip(self.schema.outputs, infos, strict=True):
                path = self.folder / subdir / info.filename
                if path.exists():  # (the gather may have renamed it already)
                    _check_size(path, info.nbytes)
        self._shards = dict(state.shards)
        known = {f"buffer-{i:05d}.arrow" for i in self._shards}
        for subdir, _ in self.schema.outputs:
            for path in (self.folder / subdir).glob("buffer-*.arrow"):
                if path.name not in known:
                    path.unlink()

    def merge(self, parts: list[tuple[Path, OrderedState]]) -> None:
        """Take over the buffers other sinks wrote in their own folders (named by
        run-wide buffer number, so they never collide), moving their files here."""
        shards: dict[int, list[ShardInfo]] = {}
        for source, state in parts:
            for number, infos in state.shards.items():
                for (subdir, _), info in zip(self.schema.outputs, infos, strict=True):
                    if (source / subdir / info.filename).exists():
                        os.replace(
                            source / subdir / info.filename,
                            self.folder / subdir / info.filename,
                        )
                shards[number] = infos
        self.restore(OrderedState(shards))

    def finish(
        self, quiet: bool = False, checkpoint: Checkpoint | None = None
    ) -> Shards:
        """Rename the buffers' files to the final shard names, in buffer order."""
        total = len(self._shards)
        shards: Shards = {subdir: [] for subdir, _ in self.schema.outputs}
        for position, index in enumerate(sorted(self._shards)):
            name = shard_name(position, total)
            for (subdir, _), info in zip(
                self.schema.outputs, self._shards[index], strict=True
            ):
                if (self.folder / subdir / info.filename).exists():
                    os.replace(
                        self.folder / subdir / info.filename,
                        self.folder / subdir / name,
                    )
                shards[subdir].append(ShardInfo(**{**asdict(info), "filename": name}))
        return shards


class BucketShuffleSink:
    """Scatters buffers into bucket files, then gathers each into a permuted shard.

    Each run (a first run, then each resume) appends to its own part file per
    bucket, so a resumed run only has to cut the previous parts back to their size
    at the last checkpoint. No file is held open between writes.
    """

    def __init__(
        self,
        folder: Path,
        schema: CacheSchema,
        seed: int,
        n_buckets: int,
    ):
        self.folder = folder
        self.schema = schema
        self.features = schema.features
        _make_output_folders(folder, schema)
        self.seed = seed
        self.n_buckets = n_buckets
        self._bucket_dir = folder / "buckets"
        self._bucket_dir.mkdir(exist_ok=True)
        self._session = 0
        # bucket -> its part files, in order, with their sizes
        self._parts: dict[int, list[tuple[str, int]]] = {}
        self._gather: GatherState | None = None
        self._unsynced: set[str] = set()  # part files appended since the last sync

    def _append(self, k: int, batches: Iterable[Any]) -> None:
        """Append record batches to bucket k's part file of this session."""
        name = f"bucket-{k:05d}.part{self._session:03d}.arrow"
        parts = self._parts.setdefault(k, [])
        size = parts.pop()[1] if parts and parts[-1][0] == name else 0
        size += append_batches(
            self._bucket_dir / name, self.features.arrow_schema, batches
        )
        parts.append((name, size))
        self._unsynced.add(name)

    def write_buffer(
        self,
        index: int,
        acts_RTD: torch.Tensor,
        toks_RT: torch.Tensor,
        order_N: torch.Tensor | None = None,
    ) -> None:
        """Scatter buffer `index`'s rows (tokens in `order_N` if given) into the
        buckets, gathering one bucket's rows at a time."""
        n_rows, context_size, _ = acts_RTD.shape
        generator = seeded_generator(self.seed, index, Stream.BUCKET_ASSIGNMENT)
        positions_RT = (
            torch.arange(n_rows * context_size) if order_N is None else order_N
        ).view(n_rows, context_size)
        arrow_schema = self.features.arrow_schema
        for k, rows in enumerate(assign_buckets(n_rows, self.n_buckets, generator)):
            if rows.numel():
                tables = gathered_tables(
                    self.schema, acts_RTD, toks_RT, positions_RT[rows].reshape(-1)
                )
                self._append(
                    k,
                    (
                        batch
                        for table in tables
                        for batch in table.cast(arrow_schema).to_batches()
                    ),
                )
        del acts_RTD, toks_RT
        release_freed_memory()

    def state(self) -> BucketState:
        """The part files and their sizes now (every write so far is in them)."""
        return BucketState(
            session=self._session,
            parts={k: list(parts) for k, parts in self._parts.items()},
            gather=self._gather,
        )

    def sync(self) -> None:
        """Put what was written since the last call on stable storage (file data,
        then the bucket folder's new names): a checkpoint may then count it."""
        for name in sorted(self._unsynced):
            fd = os.open(self._bucket_dir / name, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        self._unsynced = set()
        fsync_dir(self._bucket_dir, strict=True)

    def restore(self, state: BucketState) -> None:
        """Cut every part back to its size at the checkpoint (refusing, untouched,
        one shorter than recorded), drop later files, and write further buffers to
        new parts (or continue the gather it records)."""
        sizes = {
            name: (_check_size(self._bucket_dir / name, size), size)
            for parts in state.parts.values()
            for name, size in parts
        }
        self.adopt(state)
        self._unsynced = set()
        keep = set()
        for parts in state.parts.values():
            for name, size in parts:
                if sizes[name][0] > size:  # bytes written after the checkpoint
                    os.truncate(self._bucket_dir / name, size)
                keep.add(name)
        for path in self._bucket_dir.iterdir():
            if path.name not in keep:
                path.unlink()

    def adopt(self, state: BucketState) -> None:
        """Take `state` as this sink's without touching any file (for a rank that
        gathers its share of buckets another process merged)."""
        self._session = state.session + 1
        self._parts = {k: list(parts) for k, parts in state.parts.items()}
        self._gather = state.gather

    def merge(self, parts: list[tuple[Path, BucketState]]) -> None:
        """Take over the bucket files other sinks wrote in their own folders: part
        `name` of the sink in folder `f` becomes `<f's name>.<name>` here, bucket
        k's parts in the order given."""
        merged: dict[int, list[tuple[str, int]]] = {}
        for source, state in parts:
            for k, bucket_parts in state.parts.items():
                for name, size in bucket_parts:
                    moved = f"{source.name}.{name}"
                    if (source / "buckets" / name).exists():
                        os.replace(source / "buckets" / name, self._bucket_dir / moved)
                    merged.setdefault(k, []).append((moved, size))
        self.restore(BucketState(session=0, parts=merged))

    def close(self) -> None:
        """Nothing is held open between buffers."""

    def start_gather(self) -> GatherState:
        """The gather's plan (the buckets holding rows, in order), fixed once."""
        if self._gather is None:
            self._gather = GatherState(sorted(self._parts), {})
        return self._gather

    def finish(
        self, quiet: bool = False, checkpoint: Checkpoint | None = None
    ) -> Shards:
        """Gather every bucket into one permuted shard, deleting buckets as it goes.

        After each shard, `checkpoint(state)` records progress for a resumed run."""
        gather = self.start_gather()
        done = self.gather(range(len(gather.buckets)), quiet, checkpoint)
        self._bucket_dir.rmdir()
        return shards_in_order(self.schema, done)

    def gather(
        self,
        positions: Iterable[int],
        quiet: bool = False,
        checkpoint: Checkpoint | None = None,
    ) -> Gathered:
        """Gather the shards at `positions` (of `start_gather`'s plan) that are not
        done yet; returns every one of them. Several processes may each gather
        their own positions of one plan at once."""
        gather = self.start_gather()
        positions = list(positions)
        for position in positions:  # left by a crash between checkpoint and delete
            if position in gather.done:
                self._delete_bucket(gather.buckets[position])
        total = len(gather.buckets)

        def plan(position: int) -> PlannedShard:
            k = gather.buckets[position]
            name = shard_name(position, total)
            return PlannedShard(
                position=position,
                bucket=k,
                paths=[self._bucket_dir / n for n, _ in self._parts[k]],
                targets=_targets(self.folder, self.schema, name),
            )

        def order(shard: PlannedShard, rows: int) -> np.ndarray:
            generator = seeded_generator(
                self.seed, shard.bucket, Stream.BUCKET_PERMUTATION
            )
            return torch.randperm(rows, generator=generator).numpy()

        def done(shard: PlannedShard, infos: list[ShardInfo]) -> None:
            gather.done[shard.position] = infos
            # forget the bucket before recording progress: a resumed run must never
            # read a bucket that was being deleted
            parts = self._parts.pop(shard.bucket)
            if checkpoint is not None:
                checkpoint(self.state())
            for part, _ in parts:
                (self._bucket_dir / part).unlink()

        todo = [plan(p) for p in positions if p not in gather.done]
        gather_shards(self.schema, todo, order, done, quiet)
        release_freed_memory()
        return {p: gather.done[p] for p in positions}

    def _delete_bucket(self, k: int) -> None:
        for name, _ in self._parts.pop(k, []):
            (self._bucket_dir / name).unlink(missing_ok=True)


Sink = OrderedSink | BucketShuffleSink

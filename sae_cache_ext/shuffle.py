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
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from sae_cache_ext.packing import Stream, assign_buckets, seeded_generator
from sae_cache_ext.writer import (
    ROWS_PER_RECORD_BATCH,
    CacheSchema,
    ShardInfo,
    gathered_tables,
    read_table,
    release_freed_memory,
    write_split_tables,
    write_tables,
)

logger = logging.getLogger(__name__)

# Arrow allocations go through glibc, so `release_freed_memory` can return them.
_POOL = pa.system_memory_pool()
MIN_BUCKETS = 4
MAX_BUCKETS = 1024
# Shards of every dataset a sink writes, by subfolder ("" is the folder itself).
Shards = dict[str, list[ShardInfo]]


def _shards_to_json(shards: Shards) -> dict[str, Any]:
    return {d: [asdict(s) for s in infos] for d, infos in shards.items()}


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


@dataclass
class GatherState:
    """How far the gather is: the buckets to gather, in order, and the shards
    written so far."""

    buckets: list[int]
    done: Shards

    def to_json(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "done": _shards_to_json(self.done)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> GatherState:
        return cls(list(value["buckets"]), _shards_from_json(value["done"]))


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


def choose_n_buckets(n_buffers: int) -> int:
    """About one buffer per bucket, at least 4 (disk peak 1.25x), and few enough
    open files for this process's limit."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = MAX_BUCKETS
    if soft_limit != resource.RLIM_INFINITY:
        cap = max(MIN_BUCKETS, min(cap, soft_limit // 2))
    return max(MIN_BUCKETS, min(n_buffers, cap))


def _write_shards(
    folder: Path, schema: CacheSchema, name: str, tables: Any
) -> list[ShardInfo]:
    """Write `tables` as shard `name` of every dataset of `schema` in `folder`."""
    outputs = schema.outputs
    if len(outputs) == 1:
        subdir, features = outputs[0]
        return [write_tables(folder / subdir / name, tables, features)]
    return write_split_tables(
        [(folder / subdir / name, features) for subdir, features in outputs], tables
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            _fsync_dir(self.folder / subdir)

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
    at the last checkpoint.
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
        self._parts: dict[int, list[str]] = {}  # bucket -> part files, in order
        self._streams: dict[
            int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]
        ] = {}
        self._gather: GatherState | None = None
        self._synced: dict[int, int] = {}  # bucket -> bytes on stable storage

    def _stream(self, k: int) -> pa.ipc.RecordBatchStreamWriter:
        if k not in self._streams:
            name = f"bucket-{k:05d}.part{self._session:03d}.arrow"
            sink = pa.OSFile(str(self._bucket_dir / name), "wb")
            self._streams[k] = (
                sink,
                pa.ipc.new_stream(sink, self.features.arrow_schema),
            )
            self._parts.setdefault(k, []).append(name)
        return self._streams[k][1]

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
        for k, rows in enumerate(assign_buckets(n_rows, self.n_buckets, generator)):
            if rows.numel():
                tables = gathered_tables(
                    self.schema, acts_RTD, toks_RT, positions_RT[rows].reshape(-1)
                )
                for table in tables:
                    for batch in table.cast(self.features.arrow_schema).to_batches():
                        self._stream(k).write_batch(batch)
        del acts_RTD, toks_RT
        release_freed_memory()

    def state(self) -> BucketState:
        """The part files and their sizes now (every write so far is in them)."""
        sizes = {
            self._parts[k][-1]: sink.tell() for k, (sink, _) in self._streams.items()
        }
        return BucketState(
            session=self._session,
            parts={
                k: [
                    (name, sizes.get(name, (self._bucket_dir / name).stat().st_size))
                    for name in names
                ]
                for k, names in self._parts.items()
            },
            gather=self._gather,
        )

    def sync(self) -> None:
        """Put what was written since the last call on stable storage (file data,
        then the bucket folder's new names): a checkpoint may then count it."""
        for k, (sink, _) in self._streams.items():
            if self._synced.get(k) != sink.tell():
                os.fdatasync(sink.fileno())
                self._synced[k] = sink.tell()
        _fsync_dir(self._bucket_dir)

    def restore(self, state: BucketState) -> None:
        """Cut every part back to its size at the checkpoint (refusing, untouched,
        one shorter than recorded), drop later files, and write further buffers to
        new parts (or continue the gather it records)."""
        self._session = state.session + 1
        self._parts = {}
        self._synced = {}
        keep = set()
        sizes = {
            name: (_check_size(self._bucket_dir / name, size), size)
            for parts in state.parts.values()
            for name, size in parts
        }
        for k, parts in state.parts.items():
            for name, size in parts:
                if sizes[name][0] > size:  # bytes written after the checkpoint
                    os.truncate(self._bucket_dir / name, size)
                self._parts.setdefault(k, []).append(name)
                keep.add(name)
        for path in self._bucket_dir.iterdir():
            if path.name not in keep:
                path.unlink()
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
        """Close the bucket files (another process is going to gather them)."""
        self._close_streams()

    def _close_streams(self) -> None:
        for sink, stream in self._streams.values():
            stream.close()
            sink.close()
        self._streams = {}

    def _read_bucket(self, k: int) -> pa.Table:
        return pa.concat_tables(
            read_table(self._bucket_dir / n) for n in self._parts[k]
        )

    def finish(
        self, quiet: bool = False, checkpoint: Checkpoint | None = None
    ) -> Shards:
        """Gather every bucket into one permuted shard, deleting buckets as it goes.

        After each shard, `checkpoint(state)` records progress for a resumed run."""
        self._close_streams()
        gather = self._gather or GatherState(sorted(self._parts), {})
        filled = gather.buckets
        shards: Shards = {
            subdir: list(gather.done.get(subdir, []))
            for subdir, _ in self.schema.outputs
        }
        first = len(next(iter(shards.values())))
        for position in tqdm(
            range(first, len(filled)),
            desc="Shuffling shards",
            unit="shard",
            disable=quiet,
            total=len(filled),
            initial=first,
        ):
            k = filled[position]
            table = self._read_bucket(k)
            generator = seeded_generator(self.seed, k, Stream.BUCKET_PERMUTATION)
            perm = torch.randperm(table.num_rows, generator=generator).numpy()
            chunks = (
                pc.take(
                    table,
                    pa.array(perm[i : i + ROWS_PER_RECORD_BATCH]),
                    memory_pool=_POOL,
                )
                for i in range(0, len(perm), ROWS_PER_RECORD_BATCH)
            )
            name = shard_name(position, len(filled))
            written = _write_shards(self.folder, self.schema, name, chunks)
            for subdir, info in zip(shards, written, strict=True):
                shards[subdir].append(info)
            del table, chunks
            # forget the bucket before recording progress: a resumed run must never
            # read a bucket that was being deleted
            gathered = self._parts.pop(k)
            if checkpoint is not None:
                self._gather = GatherState(
                    filled, {d: list(i) for d, i in shards.items()}
                )
                checkpoint(self.state())
            for part in gathered:
                (self._bucket_dir / part).unlink()
            release_freed_memory()
        self._bucket_dir.rmdir()
        return shards


Sink = OrderedSink | BucketShuffleSink

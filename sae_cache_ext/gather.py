"""The shuffle's gather as a pipeline over three threads, so the disk never waits
for the processor nor the processor for the disk.

- this thread reads a bucket into arrays and takes its rows in their permuted order,
  a record batch at a time (`BucketReader`);
- a writer thread writes each record batch into the shard's files, hashing them;
- a sync thread fsyncs each finished shard and then reports it done (the caller
  checkpoints and deletes the bucket there, so progress is only ever recorded for a
  shard on disk), in order.

So the next bucket is read while the last batches of the previous shard are being
written, and a shard is written while the one before it is flushed. Memory: one
bucket, plus `SLOTS` record batches (each about 32 MB, `RECORD_BATCH_VALUES`). Disk:
at most two buckets are held beside the shards already done (the shard being synced
and the next one written, `SYNCS`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sae_cache_ext.bucket_files import BucketReader
from sae_cache_ext.shard_files import ShardFiles, ShardInfo
from sae_cache_ext.writer import BackgroundWriter, CacheSchema

SLOTS = 2  # record batches alive at once: one being taken, one being written
SYNCS = 1  # a shard being fsynced while the next is written: the disk then holds
# at most two buckets beside the shards already done


@dataclass(frozen=True)
class PlannedShard:
    """One shard to gather: its position in the plan, the bucket it comes from
    (its part files, in order) and the files it becomes, with their features."""

    position: int
    bucket: int
    paths: list[Path]
    targets: list[tuple[Path, Any]]


Order = Callable[[PlannedShard, int], np.ndarray]
"""(shard, rows in its bucket) -> the permutation of those rows."""
Done = Callable[[PlannedShard, list[ShardInfo]], None]
"""Called, in order, once a shard is on disk (on the sync thread)."""


def gather_shards(
    schema: CacheSchema,
    shards: list[PlannedShard],
    order: Order,
    done: Done,
    quiet: bool = False,
) -> None:
    """Gather `shards` in order. The first error on any thread stops every thread
    and is raised here; shards reported done are complete on disk."""
    reader = BucketReader(schema, slots=SLOTS)
    opened: list[ShardFiles] = []
    try:
        # the writer closes first (it hands shards to the syncer), then the syncer
        with (
            BackgroundWriter(max_buffers=SYNCS) as syncer,
            BackgroundWriter(max_buffers=SLOTS) as writer,
        ):
            for shard in tqdm(
                shards, desc="Shuffling shards", unit="shard", disable=quiet
            ):
                bucket = reader.read(shard.paths)
                tables = reader.permuted_tables(bucket, order(shard, bucket.rows))
                files = ShardFiles(shard.targets)
                opened.append(files)
                while True:
                    writer.reserve()  # before the take: its slot must be free
                    table = next(tables, None)
                    if table is None:
                        break
                    writer.submit(functools.partial(files.write, table))
                    del table
                hand_over = functools.partial(_hand_over, syncer, shard, files, done)
                writer.submit(hand_over)  # in the slot reserved last
                del bucket, tables
    finally:
        for files in opened:
            files.abort()  # no-op for those synced


def _hand_over(
    syncer: BackgroundWriter, shard: PlannedShard, files: ShardFiles, done: Done
) -> None:
    """On the writer thread: end the shard's streams and queue its fsync."""
    files.close()
    syncer.reserve()
    syncer.submit(lambda: done(shard, files.sync()))

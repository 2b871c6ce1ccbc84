"""The shuffle's bucket files: appended to without holding them open, read back whole.

A bucket part file is an Arrow IPC stream: the schema message, written when the file
is made, then record-batch messages appended one write at a time (the file is opened
in append mode, written and closed), with no end-of-stream marker: a stream reader
reads to the end of the file. So no file stays open between buffers, and the number
of buckets does not depend on the open-file limit.

The gather reads a bucket's record batches straight into one numpy array per column
(`Bucket`), then takes rows in a permuted order one record batch at a time: memory
holds one bucket plus a few record batches (`slots`, about 32 MB each: those still
being written), every take is chunk-free numpy indexing, and
nothing passes a 32-bit offset. Array axes: R rows, T tokens a row, D a hook's width.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from sae_cache_ext.writer import (
    TOKEN_IDS,
    TOKEN_POSITIONS,
    CacheSchema,
    arrays_to_table,
)

MIN_BUCKETS = 4
# Expected bytes of a shard at most; a bucket's size varies with its random share
# of rows, so shards stay under about 2 GB (sae-lens warns that larger ones fail).
TARGET_SHARD_BYTES = 1_500_000_000
# Pages of a bucket file already copied are unmapped every this many bytes.
_RELEASE_BYTES = 16 << 20
# Arrow allocations go through glibc, so `release_freed_memory` can return them.
_POOL = pa.system_memory_pool()


def choose_n_buckets(n_buffers: int, total_bytes: int = 0) -> int:
    """One bucket per buffer (so a final shard is about one buffer), at least 4
    (the disk peaks at the dataset plus two buckets: at most 1.5x), and enough that
    a shard's expected size stays under `TARGET_SHARD_BYTES` when buffers are larger
    than that."""
    return max(MIN_BUCKETS, n_buffers, math.ceil(total_bytes / TARGET_SHARD_BYTES))


def append_batches(
    path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]
) -> int:
    """Append `batches` to the stream at `path` (starting it with `schema` if the
    file does not exist yet), holding the file open for this call only. Returns the
    bytes written."""
    written = 0
    with open(path, "ab") as f:
        if f.tell() == 0:
            written += f.write(schema.serialize())
        for batch in batches:
            written += f.write(batch.serialize(memory_pool=_POOL))
    return written


@dataclass
class Bucket:
    """One bucket's rows: each hook's values `(R, T, D)`, the token ids `(R, T)`
    and, with `store_token_positions`, each token's `(sequence, position)`."""

    hooks_RTD: list[np.ndarray]
    toks_RT: np.ndarray
    positions_RT2: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.toks_RT)

    @classmethod
    def empty(cls, rows: int, schema: CacheSchema) -> Bucket:
        T = schema.context_size
        return cls(
            [np.empty((rows, T, w), dtype=schema.dtype) for _, w in schema.hooks],
            np.empty((rows, T), dtype=np.int32),
            np.empty((rows, T, 2), dtype=np.int64) if schema.token_positions else None,
        )

    def head(self, rows: int) -> Bucket:
        """The first `rows` rows (views)."""
        positions = None if self.positions_RT2 is None else self.positions_RT2[:rows]
        return Bucket(
            [v[:rows] for v in self.hooks_RTD], self.toks_RT[:rows], positions
        )


def _values(column: pa.Array) -> np.ndarray:
    """The flat values of a fixed-shape list column (Array2D or fixed-size list)."""
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=True)


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of a stream file, memory-mapped (zero-copy), with the
    pages already read unmapped as it goes, so they never add up in memory. (The
    map itself goes when the last batch made from it does.)"""
    if path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    source = pa.BufferReader(pa.py_buffer(mm))
    released = 0
    for batch in pa.ipc.open_stream(source):
        yield batch
        done = source.tell() // mmap.PAGESIZE * mmap.PAGESIZE
        if done - released >= _RELEASE_BYTES:
            mm.madvise(mmap.MADV_DONTNEED, released, done - released)
            released = done


def _count_rows(paths: list[Path]) -> int:
    """Rows in stream files (only their metadata pages are read)."""
    return sum(batch.num_rows for path in paths for batch in _batches(path))


class BucketReader:
    """Reads buckets into arrays and takes their rows in a permuted order.

    The arrays (a bucket, and `slots` record batches of output) are kept from one bucket
    to the next: fresh memory costs a page fault per page on first touch, which is
    slower than the disk on many machines.
    """

    def __init__(self, schema: CacheSchema, slots: int = 1) -> None:
        self.schema = schema
        self._bucket = Bucket.empty(0, schema)
        # record batches taken, used in turn: a table stays valid until `slots`
        # more are made (so `slots - 1` may still be being written)
        self._slots = [Bucket.empty(0, schema) for _ in range(slots)]
        self._turn = 0

    def read(self, paths: list[Path]) -> Bucket:
        """The part files `paths` of one bucket, in order, copied into one array
        per column a record batch at a time (never a table of many chunks). The
        arrays are valid until the next `read`."""
        rows = _count_rows(paths)
        if rows > self._bucket.rows:
            self._bucket = Bucket.empty(0, self.schema)  # free before allocating
            self._bucket = Bucket.empty(rows, self.schema)
        bucket = self._bucket.head(rows)
        names = [name for name, _ in self.schema.hooks]
        start = 0
        for path in paths:
            for batch in _batches(path):
                stop = start + batch.num_rows
                for values, name in zip(bucket.hooks_RTD, names, strict=True):
                    values[start:stop].reshape(-1)[:] = _values(batch.column(name))
                bucket.toks_RT[start:stop].reshape(-1)[:] = _values(
                    batch.column(TOKEN_IDS)
                )
                if bucket.positions_RT2 is not None:
                    bucket.positions_RT2[start:stop].reshape(-1)[:] = _values(
                        batch.column(TOKEN_POSITIONS)
                    )
                start = stop
        if start != rows:
            raise RuntimeError(f"The bucket files {paths} changed while being read.")
        return bucket

    def permuted_tables(self, bucket: Bucket, perm_R: np.ndarray) -> Iterator[pa.Table]:
        """The bucket's rows in the order `perm_R`, as tables of one record batch
        each; a table is valid until `slots` more are made (by any call)."""
        step = self.schema.rows_per_record_batch
        for start in range(0, len(perm_R), step):
            index = perm_R[start : start + step]
            out = self._slot(min(step, len(perm_R))).head(len(index))
            for values, taken in zip(bucket.hooks_RTD, out.hooks_RTD, strict=True):
                np.take(values, index, axis=0, out=taken, mode="clip")
            np.take(bucket.toks_RT, index, axis=0, out=out.toks_RT, mode="clip")
            if bucket.positions_RT2 is not None and out.positions_RT2 is not None:
                np.take(
                    bucket.positions_RT2,
                    index,
                    axis=0,
                    out=out.positions_RT2,
                    mode="clip",
                )
            yield arrays_to_table(
                self.schema, out.hooks_RTD, out.toks_RT, out.positions_RT2
            )

    def _slot(self, rows: int) -> Bucket:
        """The next record batch's arrays, of at least `rows` rows."""
        turn = self._turn
        self._turn = (turn + 1) % len(self._slots)
        if rows > self._slots[turn].rows:
            self._slots[turn] = Bucket.empty(0, self.schema)  # free before allocating
            self._slots[turn] = Bucket.empty(rows, self.schema)
        return self._slots[turn]

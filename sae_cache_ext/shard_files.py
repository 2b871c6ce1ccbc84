"""Shard files: Arrow streams written a table at a time, hashed as they pass (never
read back to be checksummed) and fsynced.

`ShardFiles` splits the work into steps (write each table, close, sync) that may run
on different threads, so the shuffle's gather can write one shard while the disk
flushes the previous one; `write_tables` and `write_split_tables` do it all at once.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
from datasets import Features

from sae_cache_ext.writer import features_rows_per_record_batch


@dataclass
class ShardInfo:
    """One Arrow file on disk: its name, row count and checksum."""

    filename: str
    rows: int
    sha256: str
    nbytes: int


def write_tables(
    path: Path, tables: Iterable[pa.Table], features: Features
) -> ShardInfo:
    """Write tables, one after another, as one Arrow stream at `path` (fsynced),
    holding only one of them in memory at a time, and checksum the file."""
    return write_split_tables([(path, features)], tables)[0]


def write_split_tables(
    targets: list[tuple[Path, Features]], tables: Iterable[pa.Table]
) -> list[ShardInfo]:
    """Like `write_tables`, but each table's columns go to several files at once:
    target `(path, features)` receives the columns `features` names."""
    files = ShardFiles(targets)
    try:
        for table in tables:
            files.write(table)
        files.close()
        return files.sync()
    finally:
        files.abort()


class ShardFiles:
    """One shard's files (a target `(path, features)` each, receiving the columns
    `features` names), written a table at a time and hashed as they go: `close`
    ends their streams, `sync` puts them on disk and says what they hold. Each
    step may run on another thread than the one before, one at a time."""

    def __init__(self, targets: list[tuple[Path, Features]]) -> None:
        self._targets = targets
        self._stack = ExitStack()
        self._files = []
        try:
            for path, features in targets:
                raw = self._stack.enter_context(open(path, "wb"))  # noqa: SIM115
                digest = hashlib.sha256()
                sink = pa.PythonFile(_HashingWriter(raw, digest), mode="w")
                stream = pa.ipc.new_stream(sink, features.arrow_schema)
                self._files.append((raw, digest, stream, features.arrow_schema))
        except BaseException:
            self._stack.close()
            raise
        self._per_batch = min(features_rows_per_record_batch(f) for _, f in targets)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        for _, _, stream, schema in self._files:
            part = table.select(schema.names) if len(self._targets) > 1 else table
            part = part.cast(schema) if part.schema != schema else part
            for batch in part.to_batches(max_chunksize=self._per_batch):
                stream.write_batch(batch)
        self.rows += table.num_rows

    def close(self) -> None:
        """End the streams (the files stay open for `sync`)."""
        for raw, _, stream, _ in self._files:
            stream.close()
            raw.flush()

    def sync(self) -> list[ShardInfo]:
        """fsync and close the files; what each holds."""
        for raw, _, _, _ in self._files:
            os.fsync(raw.fileno())
        self._stack.close()
        return [
            ShardInfo(
                filename=path.name,
                rows=self.rows,
                sha256=digest.hexdigest(),
                nbytes=path.stat().st_size,
            )
            for (path, _), (_, digest, _, _) in zip(
                self._targets, self._files, strict=True
            )
        ]

    def abort(self) -> None:
        """Close the files as they are (nothing is synced); safe to call again."""
        self._stack.close()


class _HashingWriter(io.RawIOBase):
    """A file that hashes what passes through it, so a shard is never read back
    just to be checksummed."""

    def __init__(self, raw: BinaryIO, digest: Any) -> None:
        self._raw = raw
        self._digest = digest

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._digest.update(data)
        return self._raw.write(data)


def write_table(path: Path, table: pa.Table, features: Features) -> ShardInfo:
    """Write `table` as an Arrow stream at `path` (fsynced) and checksum it."""
    return write_tables(path, [table], features)

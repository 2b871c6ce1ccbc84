"""Arrow shards built straight from tensors, and a background thread that writes them.

The files are Arrow IPC streams with the schema `datasets.load_from_disk` expects
(`<hook>`: `Array2D(T, D)`, `token_ids`: `Sequence(int32, length=T)`), so a folder of
them plus `state.json`/`dataset_info.json` is a dataset sae-lens trains from.

Overflow policy: the queue to the writer is bounded; when it is full the producer
(the model loop) blocks until the writer catches up. Nothing is ever dropped. The time
spent blocked and the deepest queue seen are counted in `WriterStats`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Array2D, Features, Sequence, Value
from datasets.features.features import Array2DExtensionType

logger = logging.getLogger(__name__)

ROWS_PER_RECORD_BATCH = 1024
# datasets' Array2D storage is list<list<...>> with 32-bit offsets: a record batch
# (and any array built at once) holds fewer than 2^31 values per column. Tests lower
# it to stand in for sizes this machine cannot hold.
MAX_VALUES_PER_RECORD_BATCH = 2**31 - 1
# And about this many values (32 MB of float32) at most, so that what is held per
# record batch (a take in the gather, a chunk of a scattered buffer) stays small
# whatever the row: wide rows get fewer rows per batch.
RECORD_BATCH_VALUES = 1 << 23
TOKEN_IDS = "token_ids"
TOKEN_POSITIONS = "token_positions"


def rows_per_record_batch(values_per_row: int) -> int:
    """Rows per record batch: `ROWS_PER_RECORD_BATCH`, or fewer when that many rows
    of `values_per_row` values each would pass a 32-bit offset or hold more than
    `RECORD_BATCH_VALUES` values."""
    limit = MAX_VALUES_PER_RECORD_BATCH
    if values_per_row > limit:
        raise ValueError(
            f"One row holds {values_per_row} values (context_size x width), more than "
            f"an Arrow list with 32-bit offsets can ({limit}): lower context_size, or "
            "cache fewer hooks per dataset."
        )
    cap = min(limit, RECORD_BATCH_VALUES)
    return max(1, min(ROWS_PER_RECORD_BATCH, cap // values_per_row))


def features_rows_per_record_batch(features: Features) -> int:
    """`rows_per_record_batch` for the widest Array2D column of `features`."""
    sizes = [int(np.prod(f.shape)) for f in features.values() if isinstance(f, Array2D)]
    return rows_per_record_batch(max(sizes, default=1))


def cache_features(
    hook_name: str, context_size: int, d_in: int, dtype: str
) -> Features:
    """The dataset schema sae-lens writes and reads."""
    return Features(
        {
            hook_name: Array2D(shape=(context_size, d_in), dtype=dtype),
            TOKEN_IDS: Sequence(Value(dtype="int32"), length=context_size),
        }
    )


@dataclass(frozen=True)
class CacheSchema:
    """What the buffers hold and where the datasets go.

    A buffer's activations are the hooks' activations side by side, `(rows, T, sum of
    widths)`, so packing and permuting treat every hook alike. With `per_hook_folders`
    each hook becomes its own dataset in the subfolder named after it, every one
    with the same `token_ids`; otherwise one dataset holds every column.
    """

    hooks: tuple[tuple[str, int], ...]
    context_size: int
    dtype: str
    per_hook_folders: bool = False
    token_positions: bool = False  # buffers' tokens carry (sequence, position)

    @property
    def width(self) -> int:
        return sum(width for _, width in self.hooks)

    def hook_features(self, hook_name: str) -> Features:
        width = dict(self.hooks)[hook_name]
        features = cache_features(hook_name, self.context_size, width, self.dtype)
        return Features({**features, **self._position_features()})

    def _position_features(self) -> dict[str, Array2D]:
        if not self.token_positions:
            return {}
        return {TOKEN_POSITIONS: Array2D(shape=(self.context_size, 2), dtype="int64")}

    @property
    def features(self) -> Features:
        """The schema of a buffer: every hook's column, then `token_ids`."""
        columns = {
            name: Array2D(shape=(self.context_size, width), dtype=self.dtype)
            for name, width in self.hooks
        }
        ids = Sequence(Value(dtype="int32"), length=self.context_size)
        return Features({**columns, TOKEN_IDS: ids, **self._position_features()})

    @property
    def rows_per_record_batch(self) -> int:
        """Rows per record batch of every file written (the widest hook decides)."""
        width = max((w for _, w in self.hooks), default=1)
        return rows_per_record_batch(self.context_size * width)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in the datasets: every hook's values and its id."""
        return self.width * np.dtype(self.dtype).itemsize + 4

    @property
    def outputs(self) -> list[tuple[str, Features]]:
        """`(subfolder, schema)` of each dataset written ("" is the folder itself)."""
        if not self.per_hook_folders:
            return [("", self.features)]
        return [(name, self.hook_features(name)) for name, _ in self.hooks]


def _torch_to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return tensor.detach().to("cpu").contiguous().numpy().astype(dtype, copy=False)


def _offsets(n_lists: int, length: int) -> pa.Array:
    """Offsets of `n_lists` lists of `length` each (32-bit, checked not to wrap)."""
    if n_lists * length > MAX_VALUES_PER_RECORD_BATCH:
        raise ValueError(
            f"{n_lists} lists of {length} values pass a 32-bit offset: write them in "
            "record batches of `rows_per_record_batch` rows."
        )
    return pa.array(np.arange(0, n_lists * length + 1, length, dtype=np.int32))


def array2d_column(values_RTD: np.ndarray) -> pa.ExtensionArray:
    """An Array2D column (datasets' `list<list<dtype>>` storage) over the values of
    `values_RTD` (rows, T, D), without copying them when they are contiguous."""
    n_rows, context_size, d_in = values_RTD.shape
    values = pa.array(np.ascontiguousarray(values_RTD).reshape(-1))
    inner = pa.ListArray.from_arrays(_offsets(n_rows * context_size, d_in), values)
    outer = pa.ListArray.from_arrays(_offsets(n_rows, context_size), inner)
    extension = Array2DExtensionType(
        shape=(context_size, d_in), dtype=str(values_RTD.dtype)
    )
    return pa.ExtensionArray.from_storage(extension, outer)


def arrays_to_table(
    schema: CacheSchema,
    hooks_RTD: list[np.ndarray],
    toks_RT: np.ndarray,
    positions_RT2: np.ndarray | None = None,
) -> pa.Table:
    """An Arrow table of numpy arrays: one Array2D column per hook (in the schema's
    dtype), then `token_ids` (int32), then `token_positions` (int64) if given."""
    columns = [
        array2d_column(values.astype(schema.dtype, copy=False)) for values in hooks_RTD
    ]
    toks = np.ascontiguousarray(toks_RT, dtype=np.int32).reshape(-1)
    toks_col = pa.FixedSizeListArray.from_arrays(pa.array(toks), schema.context_size)
    names = [name for name, _ in schema.hooks]
    if positions_RT2 is None:
        return pa.Table.from_arrays([*columns, toks_col], names=[*names, TOKEN_IDS])
    positions = array2d_column(np.ascontiguousarray(positions_RT2, dtype=np.int64))
    return pa.Table.from_arrays(
        [*columns, toks_col, positions], names=[*names, TOKEN_IDS, TOKEN_POSITIONS]
    )


def rows_to_table(
    schema: CacheSchema, acts_RTD: torch.Tensor, toks_RT: torch.Tensor
) -> pa.Table:
    """Build an Arrow table from tensors without going through Python objects: one
    column per hook (a slice of the last dimension each), then `token_ids`.

    `toks_RT` is `(R, T)` token ids, or `(R, T, 3)` ids with each token's
    `(sequence, position)` (`store_token_positions`), written as `token_positions`."""
    if acts_RTD.shape[-1] != schema.width:
        raise ValueError(
            f"activations have width {acts_RTD.shape[-1]}, but the hooks "
            f"{[name for name, _ in schema.hooks]} add up to {schema.width}."
        )
    columns, start = [], 0
    for _, width in schema.hooks:
        columns.append(
            _torch_to_numpy(acts_RTD[..., start : start + width], schema.dtype)
        )
        start += width
    positions_RT2 = None
    if toks_RT.dim() == 3:
        positions_RT2 = _torch_to_numpy(toks_RT[..., 1:], "int64")
        toks_RT = toks_RT[..., 0]
    return arrays_to_table(
        schema, columns, _torch_to_numpy(toks_RT, "int32"), positions_RT2
    )


def gathered_tables(
    schema: CacheSchema,
    acts_RTD: torch.Tensor,
    toks_RT: torch.Tensor,
    order_N: torch.Tensor | None,
    rows_per_chunk: int | None = None,
) -> Iterator[pa.Table]:
    """The rows as tables of `rows_per_chunk` rows (default: the schema's rows per
    record batch), with tokens taken in `order_N` (flat token indices) when given:
    each chunk is gathered only when needed, so reordering costs one chunk of
    memory, not a copy of the buffer."""
    n_rows, context_size, d_in = acts_RTD.shape
    rows_per_chunk = rows_per_chunk or schema.rows_per_record_batch
    if order_N is None:
        for start in range(0, max(n_rows, 1), rows_per_chunk):  # one if empty
            stop = start + rows_per_chunk
            yield rows_to_table(schema, acts_RTD[start:stop], toks_RT[start:stop])
        return
    acts_ND = acts_RTD.reshape(-1, d_in)
    toks_N = toks_RT.flatten(0, 1)  # (N,) or (N, 3) with positions
    for start in range(0, n_rows, rows_per_chunk):
        index = order_N[start * context_size : (start + rows_per_chunk) * context_size]
        rows = index.numel() // context_size
        yield rows_to_table(
            schema,
            acts_ND[index].view(rows, context_size, d_in),
            toks_N[index].view(rows, context_size, *toks_N.shape[1:]),
        )


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's `malloc_trim`).

    Buffers are tens of MB to GB; glibc raises its mmap threshold after freeing one,
    then keeps later ones in per-thread heaps that only grow. Trimming after each
    buffer keeps the resident set flat. A no-op where glibc is absent.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (raises AttributeError where it is missing)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def read_table(path: Path) -> pa.Table:
    """Read a whole Arrow stream file into memory."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path, strict: bool = False) -> None:
    """Put a folder's new and renamed entries on stable storage. Where a filesystem
    cannot (an OSError), that is ignored unless `strict`."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


@dataclass
class WriterStats:
    """What the background writer saw: blocked producer time and queue depth."""

    stall_seconds: float = 0.0
    stalls: int = 0
    max_queue_depth: int = 0
    jobs: int = 0
    write_seconds: float = 0.0


class BackgroundWriter:
    """Runs write jobs in order on one background thread.

    Memory is bounded by buffer slots: the producer calls `reserve()` before it
    builds a buffer and every job frees its slot when done, so at most
    `max_buffers` buffers exist at once (one being filled, one being written). When
    the writer falls behind, `reserve()` blocks the producer (counted as a stall);
    nothing is ever dropped. The first job error is raised again in the producer, at
    the next `reserve`/`submit` or at `close`.
    """

    def __init__(self, max_buffers: int = 2) -> None:
        if max_buffers < 1:
            raise ValueError(f"max_buffers must be at least 1, got {max_buffers}.")
        self._slots = threading.Semaphore(max_buffers)
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self.stats = WriterStats()
        self._thread = threading.Thread(
            target=self._loop, name="sae-cache-ext-writer", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                start = time.perf_counter()
                try:
                    job()
                except BaseException as error:  # handed to the producer thread
                    self._error = error
                self.stats.write_seconds += time.perf_counter() - start
            self._slots.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def reserve(self) -> None:
        """Wait for a free buffer slot (a stall if the writer is behind)."""
        self._raise_if_failed()
        if self._slots.acquire(blocking=False):
            return
        self.stats.stalls += 1
        start = time.perf_counter()
        while not self._slots.acquire(timeout=0.1):
            self._raise_if_failed()
        self.stats.stall_seconds += time.perf_counter() - start
        self._raise_if_failed()

    def release(self) -> None:
        """Give back a reserved slot that will not be submitted."""
        self._slots.release()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job for a reserved slot; the slot is freed when it finishes."""
        self._raise_if_failed()
        self.stats.jobs += 1
        self._queue.put(job)
        self.stats.max_queue_depth = max(
            self.stats.max_queue_depth, self._queue.qsize()
        )

    def close(self) -> None:
        """Wait for every job, stop the thread, and raise the first job error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._thread.is_alive():  # already failing: stop without raising again
            self._error = self._error or RuntimeError("cancelled")
            self._queue.put(None)
            self._thread.join()

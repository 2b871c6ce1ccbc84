"""The write path at any size, with limits lowered to stand in for sizes this
machine cannot hold: the open-file limit, the 32-bit offsets of a record batch, and
the memory of the gather.

Axes: R rows, T tokens a row (4 here), D the width (8 here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from sae_cache_ext import bucket_files, gather, writer
from sae_cache_ext.bucket_files import TARGET_SHARD_BYTES, choose_n_buckets
from sae_cache_ext.shuffle import BucketShuffleSink, OrderedSink
from sae_cache_ext.writer import CacheSchema, rows_per_record_batch

ROOT = Path(__file__).resolve().parent.parent
T, D = 4, 8
SCHEMA = CacheSchema(hooks=(("hook", D),), context_size=T, dtype="float32")


def _buffer(index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose token ids are unique run-wide (buffer index, row, position) and
    whose activations repeat the token id, so every row can be traced."""
    toks_RT = torch.arange(rows * T, dtype=torch.int32).view(rows, T) + index * 10_000
    return toks_RT.float()[..., None].expand(rows, T, D).contiguous(), toks_RT


def _read(path: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Rows per record batch, activations (R, T, D) and token ids (R, T) of a file."""
    with pa.memory_map(str(path)) as source:
        batches = list(pa.ipc.open_stream(source))
    table = pa.Table.from_batches(batches)
    acts = np.array(table.column("hook").to_pylist(), dtype=np.float32)
    toks = np.array(table.column("token_ids").to_pylist(), dtype=np.int32)
    return [b.num_rows for b in batches], acts.reshape(-1, T, D), toks.reshape(-1, T)


def test_bucket_count_is_one_per_buffer_whatever_the_count_or_file_limit():
    assert choose_n_buckets(1) == 4  # at least 4: the disk peak stays under 1.5x
    assert choose_n_buckets(300) == 300  # the same as before for small runs
    assert choose_n_buckets(600) == 600  # no longer capped by the open-file limit
    assert choose_n_buckets(100_000) == 100_000
    # buffers larger than the target shard: more buckets than buffers
    assert choose_n_buckets(10, 100 * TARGET_SHARD_BYTES) == 100


def test_rows_per_record_batch_keep_every_offset_under_2_to_the_31(monkeypatch):
    monkeypatch.setattr(writer, "RECORD_BATCH_VALUES", 2**40)  # offsets alone
    assert rows_per_record_batch(128 * 1024) == 1024  # 2^27 values: well under
    assert rows_per_record_batch(2048 * 4096) == 255  # 255 * 2^23 < 2^31 <= 256 * ...
    assert rows_per_record_batch(2**31 - 1) == 1
    with pytest.raises(ValueError, match="context_size"):
        rows_per_record_batch(2**31)


def test_a_record_batch_holds_about_32_mb_of_float32_whatever_the_row():
    assert writer.RECORD_BATCH_VALUES == 2**23
    assert rows_per_record_batch(16 * 64) == 1024  # small rows: the row cap
    assert rows_per_record_batch(128 * 1024) == 64  # the wide benchmark's rows
    assert rows_per_record_batch(2048 * 4096) == 1  # one row of 2^23 values
    assert rows_per_record_batch(2**31 - 1) == 1  # never none


@pytest.mark.slow  # a fresh process importing sae-lens: about 20 s here
def test_many_buffers_under_a_tiny_open_file_limit_give_a_shard_per_buffer(tmp_path):
    """64 buffers of 5 rows under a soft limit of 24 open files (the old cap was
    half the limit: 12 buckets, shards of 5 buffers each)."""
    script = f"""
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from tests.test_scale import SCHEMA, _buffer
from sae_cache_ext.bucket_files import choose_n_buckets
from sae_cache_ext.shuffle import BucketShuffleSink
resource.setrlimit(resource.RLIMIT_NOFILE, (24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
n = choose_n_buckets(64)
sink = BucketShuffleSink(Path({str(tmp_path)!r}), SCHEMA, seed=3, n_buckets=n)
for i in range(64):
    sink.write_buffer(i, *_buffer(i, 5))
shards = sink.finish(quiet=True)[""]
print(json.dumps({{"n": n, "rows": [s.rows for s in shards]}}))
"""
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    # a bucket no row landed in (chance e^-5 each) makes no shard
    assert result["n"] == 64 and 58 <= len(result["rows"]) <= 64
    assert sum(result["rows"]) == 320  # 5 rows a shard on average: one buffer
    assert max(result["rows"]) < 20  # never many buffers in one shard
    toks = np.concatenate(
        [_read(p)[2] for p in sorted(tmp_path.glob("data-*.arrow"))]
    ).reshape(-1)
    expected = np.concatenate([_buffer(i, 5)[1].numpy().reshape(-1) for i in range(64)])
    assert np.array_equal(np.sort(toks), np.sort(expected))  # every row once


def test_record_batches_stay_under_a_lowered_offset_limit(tmp_path, monkeypatch):
    """With the 2^31 limit lowered to 3 rows' values, every record batch written
    (bucket files, shuffled and ordered shards) holds at most 3 rows, and the data
    is what the default limit gives."""

    def run(folder: Path) -> tuple[list[list[int]], list[np.ndarray]]:
        shuffled = BucketShuffleSink(folder / "shuffled", SCHEMA, seed=1, n_buckets=4)
        for i in range(3):
            shuffled.write_buffer(i, *_buffer(i, 10))
        bucket_batches = [
            _read(p)[0] for p in sorted((folder / "shuffled" / "buckets").iterdir())
        ]
        shuffled.finish(quiet=True)
        ordered = OrderedSink(folder / "ordered", SCHEMA)
        ordered.write_buffer(0, *_buffer(0, 10))
        paths = sorted((folder / "shuffled").glob("data-*.arrow"))
        paths += sorted((folder / "ordered").glob("buffer-*.arrow"))
        files = [_read(p) for p in paths]
        return bucket_batches + [f[0] for f in files], [a for f in files for a in f[1:]]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    default_batches, default_data = run(tmp_path / "a")
    assert max(max(b) for b in default_batches) == 10  # a whole share in one batch
    monkeypatch.setattr(writer, "MAX_VALUES_PER_RECORD_BATCH", 3 * T * D + 5)
    batches, data = run(tmp_path / "b")
    assert max(max(b) for b in batches) == 3
    assert all(np.array_equal(x, y) for x, y in zip(data, default_data, strict=True))


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs"
)
def test_the_gather_holds_one_bucket_and_its_record_batch_slots(tmp_path):
    """One bucket of 64 MB scattered from 64 buffers (64 record batches): the
    gather's peak resident memory grows by about the bucket and the record batches
    being taken and written (`gather.SLOTS` of 32 MB), not a multiple."""
    rows, t, d = 32, 64, 128  # 32 KB a row, 1 MB a buffer
    schema = CacheSchema(hooks=(("hook", d),), context_size=t, dtype="float32")
    sink = BucketShuffleSink(tmp_path, schema, seed=1, n_buckets=1)
    for i in range(64):
        sink.write_buffer(i, torch.full((rows, t, d), float(i)), torch.zeros(rows, t))
    bucket_bytes = 64 * rows * t * d * 4  # 64 MB
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _peak_rss_bytes()
    shards = sink.finish(quiet=True)[""]
    grown = _peak_rss_bytes() - before
    assert shards[0].rows == 64 * rows
    # the bucket, the 32 MB record batches, and the pages being copied
    slots = gather.SLOTS * 32 * 2**20
    assert grown < bucket_bytes + slots + bucket_files._RELEASE_BYTES + 16 * 2**20

"""The gather's pipeline (`sae_cache_ext.gather`): the shards it writes across its
threads hold exactly the permuted buckets, progress is only ever reported for a
shard on disk, and an error on any thread stops the gather with that error and
leaves what is not done resumable."""

from __future__ import annotations

import numpy as np
import pytest

from sae_cache_ext import gather, writer
from sae_cache_ext.shard_files import ShardFiles
from sae_cache_ext.shuffle import BucketShuffleSink
from tests.test_scale import SCHEMA, _buffer, _read


def _scattered(folder, buffers: int = 6, rows: int = 40) -> BucketShuffleSink:
    sink = BucketShuffleSink(folder, SCHEMA, seed=3, n_buckets=4)
    for i in range(buffers):
        sink.write_buffer(i, *_buffer(i, rows))
    return sink


def test_shards_written_across_threads_hold_every_row_once_in_record_batches(
    tmp_path, monkeypatch
):
    # record batches of 3 rows: each shard is many batches taken and written in turn
    monkeypatch.setattr(writer, "MAX_VALUES_PER_RECORD_BATCH", 3 * 4 * 8)
    sink = _scattered(tmp_path)
    reported = []
    shards = sink.finish(quiet=True, checkpoint=lambda s: reported.append(s))[""]
    tokens = []
    for shard in shards:
        batch_rows, acts, toks = _read(tmp_path / shard.filename)
        assert max(batch_rows) == 3 and sum(batch_rows) == shard.rows
        np.testing.assert_array_equal(acts[..., 0], toks)  # rows stay whole
        tokens.append(toks[:, 0])
    firsts = np.concatenate(tokens)
    expected = np.concatenate([_buffer(i, 40)[1][:, 0].numpy() for i in range(6)])
    assert sorted(firsts) == sorted(expected)  # every row, once
    assert not np.array_equal(firsts, expected)  # in a shuffled order
    # one checkpoint per shard, each with one bucket fewer left
    assert [len(s.parts) for s in reported] == [3, 2, 1, 0]
    assert sorted(reported[-1].gather.done) == [0, 1, 2, 3]


def test_an_fsync_failure_stops_the_gather_with_it_and_keeps_the_rest(
    tmp_path, monkeypatch
):
    sink = _scattered(tmp_path)
    real_sync = ShardFiles.sync
    synced = []

    def sync(self: ShardFiles):
        if len(synced) == 1:
            raise OSError(28, "No space left on device")
        synced.append(self)
        return real_sync(self)

    monkeypatch.setattr(ShardFiles, "sync", sync)
    reported = []
    with pytest.raises(OSError, match="No space left"):
        sink.finish(quiet=True, checkpoint=lambda s: reported.append(s))
    # the first shard is done and recorded; the second's bucket is still there
    assert len(reported) == 1 and list(reported[0].gather.done) == [0]
    left = sorted(p.name for p in (tmp_path / "buckets").iterdir())
    assert len(left) == 3 and all(name.startswith("bucket-") for name in left)


def test_a_write_failure_on_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    sink = _scattered(tmp_path)

    def write(self: ShardFiles, table):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(ShardFiles, "write", write)
    reported = []
    with pytest.raises(RuntimeError, match="disk gone"):
        sink.finish(quiet=True, checkpoint=lambda s: reported.append(s))
    assert reported == []
    assert len(list((tmp_path / "buckets").iterdir())) == 4


def test_the_gather_gives_the_same_bytes_with_one_slot_as_with_several(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(writer, "MAX_VALUES_PER_RECORD_BATCH", 5 * 4 * 8)
    digests = []
    for slots in (1, gather.SLOTS, 4):
        monkeypatch.setattr(gather, "SLOTS", slots)
        folder = tmp_path / f"slots-{slots}"
        folder.mkdir()
        shards = _scattered(folder).finish(quiet=True)[""]
        digests.append([s.sha256 for s in shards])
    assert digests[0] == digests[1] == digests[2]


def test_the_disk_holds_at_most_the_dataset_and_two_buckets(tmp_path):
    sink = _scattered(tmp_path, buffers=8)
    buckets = [p.stat().st_size for p in (tmp_path / "buckets").iterdir()]
    seen = []

    def measure(_state) -> None:  # at each shard done, before its bucket goes
        seen.append(sum(p.stat().st_size for p in tmp_path.rglob("*.arrow")))

    shards = sink.finish(quiet=True, checkpoint=measure)[""]
    # the buckets, then at most two shards whose buckets are not deleted yet (the
    # one being synced and the next one written)
    assert max(seen) <= sum(buckets) + 2 * max(s.nbytes for s in shards)
    assert max(seen) > sum(buckets)  # a bucket and its shard do coexist

"""Simulated power cuts: what was not fsynced is lost, at a random point.

A run (resume=True) stops after a buffer's bytes are written but before they are
synced and checkpointed; then the tail of every file beyond what was last fsynced
(fsync/fdatasync are watched) is cut at a random point, as a power cut may leave
it. The resumed run must give the uninterrupted dataset. A file shorter than its
checkpoint records (what a missing sync would leave) is refused with a clear error,
never padded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from sae_cache_ext import CacheActivationsRunnerConfig, shuffle
from sae_cache_ext.staging import Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import before_nth_call, columns, run_ours

TRAINING_TOKENS = 6 * 2 * 4 * 16 + 40  # 6 full buffers and a partial one
CONFIGS = {
    "shuffled": {"shuffle": True, "shuffle_across_sequences": True},
    "ordered": {"shuffle": False},
}


class PowerCut(Exception):
    pass


def _watch_syncs(monkeypatch) -> dict[str, int]:
    """`{path: bytes on stable storage}`, kept up to date by fsync/fdatasync (and
    os.replace, which moves a synced file)."""
    synced: dict[str, int] = {}
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def watched(fd: int, real=real) -> None:
            real(fd)
            synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

        monkeypatch.setattr(os, name, watched)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs) -> None:  # a synced file renamed
        real_replace(src, dst, *args, **kwargs)
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        if src in synced:
            synced[dst] = synced.pop(src)

    monkeypatch.setattr(os, "replace", replace)
    return synced


def _cut_unsynced_tails(folder: Path, synced: dict[str, int], rng: random.Random):
    cut = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        size, durable = path.stat().st_size, synced.get(str(path), 0)
        if size > durable:
            os.truncate(path, rng.randint(durable, size))
            cut += 1
    return cut


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model, corpus):
    out = {}
    for name, options in CONFIGS.items():
        cfg = CacheActivationsRunnerConfig(
            **default_cfg_kwargs(
                tmp_path_factory.mktemp(name),
                training_tokens=TRAINING_TOKENS,
                **options,
            )
        )
        out[name] = columns(run_ours(cfg, tiny_model, corpus))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_power_cut_then_resume_gives_the_uninterrupted_dataset(
    tmp_path, tiny_model, corpus, monkeypatch, references, config, seed
):
    rng = random.Random(seed)
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(
            tmp_path, resume=True, training_tokens=TRAINING_TOKENS, **CONFIGS[config]
        )
    )
    sink = shuffle.BucketShuffleSink if cfg.shuffle else shuffle.OrderedSink
    with monkeypatch.context() as m:
        synced = _watch_syncs(m)

        def power_cut() -> None:
            raise PowerCut

        # buffer n is written, not yet synced nor checkpointed
        n = rng.randint(2, 6)
        m.setattr(sink, "sync", before_nth_call(sink.sync, n, power_cut))
        with pytest.raises(PowerCut):
            run_ours(cfg, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    cut = _cut_unsynced_tails(layout.staging, synced, rng)
    assert cut or not cfg.shuffle  # the shuffled run had unsynced bucket bytes

    acts, toks = columns(run_ours(cfg, tiny_model, corpus))
    ref_acts, ref_toks = references[config]
    assert acts.tobytes() == ref_acts.tobytes() and np.array_equal(toks, ref_toks)


def test_a_bucket_file_shorter_than_its_checkpoint_is_refused_not_padded(
    tmp_path, tiny_model, corpus, monkeypatch
):
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, resume=True, shuffle=True)
    )
    sink = shuffle.BucketShuffleSink

    def stop() -> None:
        raise PowerCut

    with monkeypatch.context() as m:
        m.setattr(sink, "write_buffer", before_nth_call(sink.write_buffer, 3, stop))
        with pytest.raises(PowerCut):
            run_ours(cfg, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    part = max((layout.staging / "buckets").iterdir(), key=lambda p: p.stat().st_size)
    recorded = part.stat().st_size
    os.truncate(part, recorded - 100)  # the end lost in a power cut
    with pytest.raises(
        ValueError,
        match=rf"{part.name} holds {recorded - 100} bytes but the checkpoint "
        rf"recorded {recorded} bytes.*resume=False to start over",
    ):
        run_ours(cfg, tiny_model, corpus)
    assert part.stat().st_size == recorded - 100  # never padded with zeros
    assert layout.staging.exists()  # kept: resume=True

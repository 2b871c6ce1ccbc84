"""resume=True continues an interrupted run and gives the uninterrupted result.

Interruptions here are exceptions raised inside the write path (the run keeps its
staging folder because resume=True); test_fault_injection.py does the same with
SIGKILL in a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sae_cache_ext import CacheActivationsRunnerConfig, shuffle
from sae_cache_ext.shard_files import ShardFiles
from sae_cache_ext.staging import MARKER, Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import before_nth_call, columns, run_ours

CONFIGS = {
    "shuffled": {"shuffle": True, "shuffle_across_sequences": True},
    "ordered": {"shuffle": False},
    "excluding": {"shuffle": True, "exclude_special_tokens": True},  # carries tokens
}
# 6 full buffers and a partial one
TRAINING_TOKENS = 6 * 2 * 4 * 16 + 40


class Interrupt(Exception):
    pass


def _interrupt_on_call(monkeypatch, owner, name: str, n: int) -> None:
    def interrupt() -> None:
        raise Interrupt(f"{name} call {n}")

    monkeypatch.setattr(
        owner, name, before_nth_call(getattr(owner, name), n, interrupt)
    )


@pytest.mark.parametrize("where", ["caching", "gather"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_gives_the_uninterrupted_dataset(
    tmp_path, tiny_model, corpus, monkeypatch, config, where
):
    options = {**CONFIGS[config], "training_tokens": TRAINING_TOKENS}
    reference_cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path / "ref", **options)
    )
    reference = run_ours(reference_cfg, tiny_model, corpus)
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path / "run", resume=True, **options)
    )
    sink = shuffle.BucketShuffleSink if cfg.shuffle else shuffle.OrderedSink
    with monkeypatch.context() as m:
        if where == "caching":
            _interrupt_on_call(m, sink, "write_buffer", 4)
        else:  # the shuffle's gather (or, unshuffled, the last buffer's write)
            _interrupt_on_call(m, ShardFiles, "__init__", 7 if not cfg.shuffle else 3)
        with pytest.raises(Interrupt):
            run_ours(cfg, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    assert layout.staging.exists() and not layout.final.exists()

    resumed = run_ours(cfg, tiny_model, corpus)
    acts, toks = columns(resumed)
    ref_acts, ref_toks = columns(reference)
    assert acts.tobytes() == ref_acts.tobytes() and np.array_equal(toks, ref_toks)
    ours = json.loads((layout.final / MARKER).read_text())
    theirs = json.loads(
        (Path(reference_cfg.new_cached_activations_path) / MARKER).read_text()
    )
    assert [s["sha256"] for s in ours["shards"]] == [
        s["sha256"] for s in theirs["shards"]
    ]
    assert ours["resumed"] is True and theirs["resumed"] is False
    assert ours["accounting"] == theirs["accounting"]
    assert not layout.staging.exists()
    assert (
        len(resumed) == TRAINING_TOKENS // 16
    )  # exactly training_tokens, rounded down


def test_a_failed_run_without_resume_leaves_nothing(
    tmp_path, tiny_model, corpus, monkeypatch
):
    cfg = CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, shuffle=True))
    _interrupt_on_call(monkeypatch, shuffle.BucketShuffleSink, "write_buffer", 2)
    with pytest.raises(Interrupt):
        run_ours(cfg, tiny_model, corpus)
    assert not Layout.for_output(cfg.new_cached_activations_path).staging.exists()


def test_resume_with_a_changed_config_refuses_naming_the_field_and_keeps_the_work(
    tmp_path, tiny_model, corpus, monkeypatch
):
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, shuffle=True, resume=True)
    )
    with monkeypatch.context() as m:
        _interrupt_on_call(m, shuffle.BucketShuffleSink, "write_buffer", 2)
        with pytest.raises(Interrupt):
            run_ours(cfg, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    kept = sorted(p.name for p in layout.staging.rglob("*"))
    changed = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, shuffle=True, resume=True, seed=7)
    )
    with pytest.raises(ValueError, match=r"seed: 42 -> 7.*resume=False to start over"):
        run_ours(changed, tiny_model, corpus)
    assert sorted(p.name for p in layout.staging.rglob("*")) == kept
    assert not layout.lease.exists()
    # asked to start over, it does
    fresh = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, shuffle=True, resume=False, seed=7)
    )
    dataset = run_ours(fresh, tiny_model, corpus)
    assert json.loads((layout.final / MARKER).read_text())["resumed"] is False
    assert len(dataset) == changed.training_tokens // 16

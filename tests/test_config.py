"""The config subclass keeps every upstream field and default, and checks new ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import sae_lens

from sae_cache_ext import CacheActivationsRunnerConfig
from tests.conftest import default_cfg_kwargs

NEW_FIELDS = {
    "disable_concat_sequences": False,
    "sequence_separator_token": "bos",
    "exclude_special_tokens": False,
    "shuffle_across_sequences": False,
    "on_dataset_exhausted": "warn",
    "hook_names": None,
    "resume": False,
    "on_non_finite": "error",
    "lease_stale_seconds": 120.0,
    "wait_for_lease": False,
    "distributed_timeout_minutes": 360.0,
    "store_token_positions": False,
}


def test_config_subclasses_upstream_and_keeps_every_field_and_default():
    assert issubclass(
        CacheActivationsRunnerConfig, sae_lens.CacheActivationsRunnerConfig
    )
    ours = {f.name: f for f in dataclasses.fields(CacheActivationsRunnerConfig)}
    for field in dataclasses.fields(sae_lens.CacheActivationsRunnerConfig):
        assert field.name in ours
        assert ours[field.name].default == field.default
        assert ours[field.name].default_factory == field.default_factory  # type: ignore[comparison-overlap]


def test_new_fields_have_the_documented_defaults(make_cfg):
    cfg = make_cfg()
    for name, default in NEW_FIELDS.items():
        assert getattr(cfg, name) == default
    assert set(NEW_FIELDS) == {
        f.name for f in dataclasses.fields(CacheActivationsRunnerConfig)
    } - {f.name for f in dataclasses.fields(sae_lens.CacheActivationsRunnerConfig)}


def test_store_token_positions_changes_the_fingerprint_only_when_on(make_cfg):
    plain = make_cfg()
    assert make_cfg(store_token_positions=False).data_fingerprint == (
        plain.data_fingerprint
    )
    assert make_cfg(store_token_positions=True).data_fingerprint != (
        plain.data_fingerprint
    )
    with pytest.raises(ValueError, match="store_token_positions"):
        make_cfg(store_token_positions="yes")


def test_derived_sizes_match_upstream(tmp_path: Path):
    kwargs = default_cfg_kwargs(tmp_path, seqpos_slice=(1, -1))
    ours = CacheActivationsRunnerConfig(**kwargs)
    theirs = sae_lens.CacheActivationsRunnerConfig(**kwargs)
    for prop in (
        "n_buffers",
        "n_seq_in_buffer",
        "n_batches_in_buffer",
        "sliced_context_size",
    ):
        assert getattr(ours, prop) == getattr(theirs, prop)


def test_from_upstream_copies_every_field_and_adds_new_ones(tmp_path: Path):
    upstream = sae_lens.CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path))
    ours = CacheActivationsRunnerConfig.from_upstream(
        upstream, shuffle=True, shuffle_across_sequences=True
    )
    assert ours.shuffle_across_sequences is True
    for field in dataclasses.fields(upstream):
        if field.name != "shuffle":
            assert getattr(ours, field.name) == getattr(upstream, field.name)


def test_shuffle_across_sequences_without_shuffle_names_both_fields(make_cfg):
    with pytest.raises(ValueError, match=r"shuffle_across_sequences.*shuffle=True"):
        make_cfg(shuffle=False, shuffle_across_sequences=True)


@pytest.mark.parametrize("bad", ["BOS", "start", 1.5, True, -3, [1]])
def test_invalid_separator_token_is_refused_with_the_field_name(make_cfg, bad):
    with pytest.raises(ValueError, match="sequence_separator_token"):
        make_cfg(sequence_separator_token=bad)


@pytest.mark.parametrize("good", ["bos", "eos", "sep", None, 0, 7])
def test_valid_separator_tokens_are_accepted(make_cfg, good):
    assert make_cfg(sequence_separator_token=good).sequence_separator_token == good


@pytest.mark.parametrize("bad", ["yes", [1, "a"], [-1], 3, [True]])
def test_invalid_exclude_special_tokens_is_refused(make_cfg, bad):
    with pytest.raises(ValueError, match="exclude_special_tokens"):
        make_cfg(exclude_special_tokens=bad)


def test_exclude_special_tokens_tuple_becomes_a_list(make_cfg):
    assert make_cfg(exclude_special_tokens=(3, 1)).exclude_special_tokens == [3, 1]


def test_unknown_exhaustion_policy_is_refused(make_cfg):
    with pytest.raises(ValueError, match="on_dataset_exhausted"):
        make_cfg(on_dataset_exhausted="loop")


def test_unknown_non_finite_policy_is_refused(make_cfg):
    with pytest.raises(ValueError, match="on_non_finite='ignore'"):
        make_cfg(on_non_finite="ignore")


def test_the_non_finite_policy_does_not_change_the_data_fingerprint(make_cfg):
    # it decides whether a run finishes, never what a finished cache holds
    fingerprint = make_cfg().data_fingerprint
    assert make_cfg(on_non_finite="warn").data_fingerprint == fingerprint


def test_bfloat16_is_refused_with_a_fix(make_cfg):
    with pytest.raises(ValueError, match=r"dtype='bfloat16'.*float16"):
        make_cfg(dtype="bfloat16")


def test_data_fingerprint_ignores_upload_fields_but_not_data_fields(make_cfg):
    base = make_cfg().data_fingerprint
    assert make_cfg(hf_repo_id="me/x", hf_revision="v2").data_fingerprint == base
    assert make_cfg(resume=True).data_fingerprint == base
    assert make_cfg(seed=7).data_fingerprint != base
    assert make_cfg(exclude_special_tokens=[1]).data_fingerprint != base


@pytest.mark.parametrize("bad", [0, -5, "60", True])
def test_invalid_distributed_timeout_is_refused_with_the_field_name(make_cfg, bad):
    with pytest.raises(ValueError, match="distributed_timeout_minutes"):
        make_cfg(distributed_timeout_minutes=bad)


def test_the_distributed_timeout_changes_no_fingerprint(make_cfg):
    assert (
        make_cfg(distributed_timeout_minutes=5).data_fingerprint
        == make_cfg().data_fingerprint
    )

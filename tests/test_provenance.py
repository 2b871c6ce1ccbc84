"""`store_token_positions`: every stored token's (sequence, position) points at the
token sae-lens's store read there, through exclusion, re-packing and every shuffle;
sae-lens still trains from the dataset."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from sae_cache_ext.provenance import source_sequences
from sae_cache_ext.train import evaluate_sae, train_sae_from_cache
from sae_cache_ext.verify import CHECK_RERUN, compare_activations, verify_cache
from sae_cache_ext.verify.rerun import rerun_tokens
from sae_cache_ext.writer import TOKEN_IDS, TOKEN_POSITIONS
from tests.helpers import HOOK, run_ours

EXCLUDED_ACROSS = {
    "exclude_special_tokens": True,
    "shuffle": True,
    "shuffle_across_sequences": True,
}


def _positions_point_at_their_tokens(cfg, model, corpus, dataset) -> None:
    data = dataset.with_format("numpy")
    ids_RT = np.asarray(data[TOKEN_IDS])
    pos_RT2 = np.asarray(data[TOKEN_POSITIONS])
    assert pos_RT2.shape == (*ids_RT.shape, 2) and pos_RT2.dtype == np.int64
    sequences_ST = source_sequences(cfg, model, corpus, int(pos_RT2[..., 0].max()) + 1)
    assert np.array_equal(
        sequences_ST.numpy()[pos_RT2[..., 0], pos_RT2[..., 1]], ids_RT
    )
    # every (sequence, position) at most once
    flat = pos_RT2.reshape(-1, 2)
    assert len({tuple(p) for p in flat.tolist()}) == len(flat)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        EXCLUDED_ACROSS,
        {"seqpos_slice": (2, None), "shuffle": True},
    ],
    ids=["plain", "excluded-shuffled-across", "sliced-row-shuffled"],
)
def test_positions_travel_with_their_token_ids(make_cfg, tiny_model, corpus, overrides):
    cfg = make_cfg(store_token_positions=True, **overrides)
    dataset = run_ours(cfg, tiny_model, corpus)
    _positions_point_at_their_tokens(cfg, tiny_model, corpus, dataset)
    on_disk = load_from_disk(str(cfg.new_cached_activations_path))
    assert on_disk.features[TOKEN_POSITIONS].shape == (len(on_disk[0][TOKEN_IDS]), 2)


def test_every_token_reruns_from_its_rebuilt_context(make_cfg, tiny_model, corpus):
    cfg = make_cfg(store_token_positions=True, hook_names=[HOOK], **EXCLUDED_ACROSS)
    run_ours(cfg, tiny_model, corpus)
    data = load_from_disk(f"{cfg.new_cached_activations_path}/{HOOK}")
    data = data.with_format("numpy")
    positions_N2 = torch.from_numpy(np.asarray(data[TOKEN_POSITIONS]).reshape(-1, 2))
    stored_ND = torch.from_numpy(np.asarray(data[HOOK])).flatten(0, 1)
    sequences_ST = source_sequences(
        cfg, tiny_model, corpus, int(positions_N2[:, 0].max()) + 1
    )
    rerun_ND = rerun_tokens(tiny_model, sequences_ST, positions_N2, HOOK)
    stats = compare_activations(rerun_ND[None], stored_ND[None], 1e-4, 1e-4)
    assert stats.n_outside == 0 and stats.n_values == stored_ND.numel()
    assert stats.max_abs_error <= 1e-5 * stats.activation_scale


def test_verify_reruns_tokens_from_their_positions(make_cfg, tiny_model, corpus):
    # excluded, shuffled across rows, several hooks: verify rebuilds every sampled
    # token's context by replaying the store over the dataset
    cfg = make_cfg(store_token_positions=True, hook_names=[HOOK], **EXCLUDED_ACROSS)
    run_ours(cfg, tiny_model, corpus)
    cache = cfg.new_cached_activations_path
    report = verify_cache(cache, model=tiny_model, rows=3, dataset=corpus)
    assert report.ok and f"{HOOK}: {CHECK_RERUN}" in report.checks, report.format()
    assert len(report.rerun_rows) == 3 and report.rerun_tokens == 3 * 16
    assert report.max_abs_error is not None and report.activation_scale is not None
    assert report.max_abs_error <= 1e-5 * report.activation_scale
    sequences = report.rerun_sequences
    assert sequences is not None and 0 < sequences <= 24 + 8  # not the whole run
    assert "48 tokens, each from its token_positions" in report.format()
    # a model with one weight changed fails the re-run
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.blocks[0].attn.W_V[0, 0, 0] += 1.0
    failed = verify_cache(cache, model=changed, rows=3, dataset=corpus)
    assert not failed.ok and failed.problems[0].startswith(f"{HOOK}: re-run:")
    # dataset_path ('local/corpus') is not there: skipped, naming it
    skipped = verify_cache(cache, model=tiny_model)
    assert skipped.ok and skipped.max_abs_error is None, skipped.format()
    (reason,) = [s for s in skipped.skipped if CHECK_RERUN in s]
    assert "dataset_path='local/corpus'" in reason


def test_verify_loads_a_local_dataset_path(make_cfg, tiny_model, corpus, tmp_path):
    folder = tmp_path / "corpus"
    corpus.save_to_disk(str(folder))
    cfg = make_cfg(
        store_token_positions=True, dataset_path=str(folder), **EXCLUDED_ACROSS
    )
    run_ours(cfg, tiny_model, corpus)
    report = verify_cache(cfg.new_cached_activations_path, model=tiny_model, seed=1)
    assert report.ok and CHECK_RERUN in report.checks, report.format()
    assert report.rerun_tokens == 8 * 16


@pytest.mark.slow
def test_sae_lens_trains_from_a_cache_with_positions(make_cfg, tiny_model, corpus):
    cfg = make_cfg(
        store_token_positions=True, training_tokens=32 * 8 * 16, **EXCLUDED_ACROSS
    )
    run_ours(cfg, tiny_model, corpus)
    sae = train_sae_from_cache(
        cfg.new_cached_activations_path,
        tiny_model,
        d_sae=64,
        k=8,
        training_tokens=2048,
        eval_rows=32,
        train_batch_size_tokens=32,
        lr=3e-3,
    )
    result = evaluate_sae(sae, cfg.new_cached_activations_path, eval_rows=32)
    assert result.tokens == 32 * 16 and result.mse < result.variance

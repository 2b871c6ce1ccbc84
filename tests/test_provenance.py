"""`store_token_positions`: every stored token's (sequence, position) points at the
token sae-lens's store read there, through exclusion, re-packing and every shuffle;
sae-lens still trains from the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from sae_cache_ext.provenance import source_sequences
from sae_cache_ext.train import evaluate_sae, train_sae_from_cache
from sae_cache_ext.verify import compare_activations, verify_cache
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
    # verify accepts the column, and says (before loading a model) how to re-run
    report = verify_cache(cfg.new_cached_activations_path, model=lambda: 1 / 0)
    assert report.ok, report.format()
    assert any("token_positions" in s for s in report.skipped)


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

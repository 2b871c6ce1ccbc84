"""An SAE trained straight from our cache by sae-lens's own trainer."""

from __future__ import annotations

import pytest

from sae_cache_ext.train import evaluate_sae, train_sae_from_cache
from tests.helpers import run_ours


def test_sae_trained_from_the_cache_reconstructs_unseen_rows(
    make_cfg, tiny_model, corpus
):
    # 64 buffers of 8 rows x 16 tokens: 8192 tokens; the last 32 rows are held out.
    cfg = make_cfg(
        shuffle=True,
        shuffle_across_sequences=True,
        training_tokens=64 * 8 * 16,
    )
    run_ours(cfg, tiny_model, corpus)
    sae = train_sae_from_cache(
        cfg.new_cached_activations_path,
        tiny_model,
        d_sae=64,
        k=8,
        training_tokens=6144,
        eval_rows=32,
        train_batch_size_tokens=32,
        lr=3e-3,
    )
    result = evaluate_sae(sae, cfg.new_cached_activations_path, eval_rows=32)
    assert result.tokens == 32 * 16
    assert result.mse < result.variance  # better than predicting the mean
    assert result.explained_variance > 0.3
    assert 0 < result.l0 <= 8


def test_training_refuses_to_read_the_held_out_rows(make_cfg, tiny_model, corpus):
    cfg = make_cfg()
    run_ours(cfg, tiny_model, corpus)
    with pytest.raises(ValueError, match="eval rows"):
        train_sae_from_cache(
            cfg.new_cached_activations_path,
            tiny_model,
            d_sae=8,
            k=2,
            training_tokens=cfg.training_tokens,
            eval_rows=4,
        )

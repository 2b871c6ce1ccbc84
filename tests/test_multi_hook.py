"""hook_names: several hooks from one forward pass, one dataset per hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import load_from_disk

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig, shuffle
from sae_cache_ext.shard_files import ShardFiles
from sae_cache_ext.staging import MARKER
from sae_cache_ext.train import train_sae_from_cache
from sae_cache_ext.verify import describe_cache, format_description, verify_cache
from tests.conftest import default_cfg_kwargs
from tests.helpers import before_nth_call, columns, run_ours, run_upstream

# resid_post (d_model 32), an attention hook with a head axis (4 heads x 8), the MLP's
# hidden layer (d_mlp 64) and the last block's output: widths 32, 32, 64, 32
HOOKS = {
    "blocks.0.hook_resid_post": 32,
    "blocks.0.attn.hook_z": 32,
    "blocks.0.mlp.hook_post": 64,
    "blocks.1.hook_mlp_out": 32,
}
PRIMARY = "blocks.0.hook_resid_post"


def _kwargs(tmp_path, hook=PRIMARY, **overrides):
    """The default config, with a buffer of 2 batches whatever the width, so every
    run here has the same rows per buffer."""
    width = HOOKS[hook]
    return default_cfg_kwargs(
        tmp_path,
        hook_name=hook,
        d_in=width,
        buffer_size_gb=(2 * 4 * 16 * width * 4 + 0.5) / 1e9,
        **overrides,
    )


def _multi(tmp_path, tiny_model, corpus, **overrides):
    cfg = CacheActivationsRunnerConfig(
        **_kwargs(tmp_path / "multi", hook_names=list(HOOKS), **overrides)
    )
    runner = CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=tiny_model, quiet=True
    )
    returned = runner.run()
    return cfg, runner, returned


def test_each_hook_equals_upstreams_single_hook_run(
    tmp_path, tiny_model, corpus, monkeypatch
):
    _, runner, returned = _multi(tmp_path, tiny_model, corpus)
    assert set(runner.datasets) == set(HOOKS)
    assert returned is runner.datasets[PRIMARY]
    for hook in HOOKS:
        theirs = run_upstream(
            _kwargs(tmp_path / hook, hook), tiny_model, corpus, monkeypatch
        )
        ours = load_from_disk(str(tmp_path / "multi" / "cache" / hook))
        assert ours.column_names == [hook, "token_ids"]
        assert ours.features == theirs.features
        acts, toks = columns(ours, hook)
        up_acts, up_toks = columns(theirs, hook)
        assert acts.tobytes() == up_acts.tobytes(), hook  # bit for bit
        assert np.array_equal(toks, up_toks)


def test_shuffled_and_excluding_each_hook_equals_our_single_hook_run(
    tmp_path, tiny_model, corpus
):
    options = {
        "shuffle": True,
        "shuffle_across_sequences": True,
        "exclude_special_tokens": True,
        "training_tokens": 5 * 2 * 4 * 16 + 48,  # a partial last buffer
        "seed": 7,
    }
    _multi(tmp_path, tiny_model, corpus, **options)
    token_ids = []
    for hook in HOOKS:
        single = run_ours(
            CacheActivationsRunnerConfig(**_kwargs(tmp_path / hook, hook, **options)),
            tiny_model,
            corpus,
        )
        acts, toks = columns(tmp_path / "multi" / "cache" / hook, hook)
        single_acts, single_toks = columns(single, hook)
        assert acts.shape == (5 * 8 + 3, 16, HOOKS[hook])
        assert acts.tobytes() == single_acts.tobytes(), hook
        assert np.array_equal(toks, single_toks)
        token_ids.append(toks)
    # one row order for every hook
    for toks in token_ids[1:]:
        assert np.array_equal(toks, token_ids[0])


def test_activations_line_up_with_the_model(tmp_path, tiny_model, corpus):
    """Row i of every hook comes from the same tokens: the embedding hook holds
    W_E[token] + W_pos[position] and the resid_pre of block 0 the same."""
    hooks = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(
            tmp_path,
            hook_name="hook_embed",
            hook_names=hooks,
            shuffle=True,
            shuffle_across_sequences=True,
        )
    )
    runner = CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=tiny_model, quiet=True
    )
    runner.run()
    embed, toks = columns(runner.datasets["hook_embed"], "hook_embed")
    w_e = tiny_model.W_E.detach().numpy()
    assert np.array_equal(embed, w_e[toks])
    resid_pre, toks_2 = columns(
        runner.datasets["blocks.0.hook_resid_pre"], "blocks.0.hook_resid_pre"
    )
    assert np.array_equal(toks, toks_2)
    # resid_pre = embed + W_pos[position]: what is left is one of W_pos's rows
    w_pos = tiny_model.W_pos.detach().numpy()
    rest = (resid_pre - embed).reshape(-1, 1, 32)
    nearest = np.abs(rest - w_pos[None, : cfg.context_size]).max(-1).min(-1)
    assert nearest.max() < 1e-6


def test_layout_manifests_verify_and_info(tmp_path, tiny_model, corpus):
    _multi(tmp_path, tiny_model, corpus, shuffle=True)
    out = tmp_path / "multi" / "cache"
    root = json.loads((out / MARKER).read_text())
    assert root["config"]["hook_names"] == list(HOOKS)
    assert root["hook_datasets"] == {
        hook: {"folder": hook, "d_in": width, "rows": 24}
        for hook, width in HOOKS.items()
    }
    for hook, width in HOOKS.items():
        sub = json.loads((out / hook / MARKER).read_text())
        assert sub["config"]["hook_name"] == hook
        assert sub["config"]["d_in"] == width
        assert sub["rows"] == 24
        assert sub["run"]["hook_name"] == hook
    assert sorted(p.name for p in out.iterdir()) == sorted([*HOOKS, MARKER])

    report = verify_cache(out, model=tiny_model, rows=4)
    assert report.ok, report.format()
    assert "same token_ids in every hook" in report.checks
    assert report.max_abs_error is not None and report.max_abs_error < 1e-5
    described = format_description(describe_cache(out))
    for hook in HOOKS:
        assert f"{hook}: d_in {HOOKS[hook]}" in described

    # a flipped byte in one hook's data is reported against that hook
    shard = sorted((out / "blocks.0.mlp.hook_post").glob("data-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_cache(out)
    assert not report.ok
    assert any(
        p.startswith("blocks.0.mlp.hook_post: ") and "sha256" in p
        for p in report.problems
    ), report.problems


def test_a_hook_dataset_trains_with_sae_lens(tmp_path, tiny_model, corpus):
    """sae-lens's trainer reads a hook's folder as it is (16 buffers, 128 rows)."""
    _multi(tmp_path, tiny_model, corpus, shuffle=True, training_tokens=16 * 128)
    hook = "blocks.0.mlp.hook_post"
    sae = train_sae_from_cache(
        tmp_path / "multi" / "cache" / hook,
        tiny_model,
        d_sae=64,
        k=8,
        training_tokens=1024,
        eval_rows=16,
        train_batch_size_tokens=32,
        lr=3e-3,
    )
    assert sae.cfg.d_in == 64
    assert sae.cfg.metadata.hook_name == hook


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hook_names": ["blocks.1.hook_resid_post"]}, "is not in hook_names"),
        ({"hook_names": [PRIMARY, PRIMARY]}, "more than once"),
        ({"hook_names": PRIMARY}, "list of hook names"),
        ({"hook_names": []}, "non-empty list"),
    ],
)
def test_bad_hook_names_fail_in_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, **overrides))


def test_bad_hooks_fail_before_anything_runs(tmp_path, tiny_model, corpus):
    for hooks, message in [
        ([PRIMARY, "blocks.0.hook_resid_pots"], "hook_names entry .* Did you mean"),
        ([PRIMARY, "blocks.0.attn.hook_pattern"], "attention pattern"),
    ]:
        cfg = CacheActivationsRunnerConfig(
            **default_cfg_kwargs(tmp_path, hook_names=hooks)
        )
        with pytest.raises(ValueError, match=message):
            CacheActivationsRunner(
                cfg, override_dataset=corpus, override_model=tiny_model
            )
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, hook_names=list(HOOKS), hf_repo_id="me/acts")
    )
    with pytest.raises(ValueError, match="hf_repo_id='me/acts' with hook_names"):
        CacheActivationsRunner(cfg, override_dataset=corpus, override_model=tiny_model)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("where", ["caching", "gather"])
def test_resume_gives_the_uninterrupted_hooks(
    tmp_path, tiny_model, corpus, monkeypatch, where
):
    options = {"shuffle": True, "shuffle_across_sequences": True}
    _multi(tmp_path / "ref", tiny_model, corpus, **options)
    with monkeypatch.context() as m:
        if where == "caching":
            target, name, n = shuffle.BucketShuffleSink, "write_buffer", 2
        else:
            target, name, n = ShardFiles, "__init__", 2
        m.setattr(target, name, before_nth_call(getattr(target, name), n, _interrupt))
        with pytest.raises(RuntimeError, match="interrupted"):
            _multi(tmp_path / "run", tiny_model, corpus, resume=True, **options)
    assert not (tmp_path / "run" / "multi" / "cache").exists()
    _, runner, _ = _multi(tmp_path / "run", tiny_model, corpus, resume=True, **options)
    for hook in HOOKS:
        acts, toks = columns(runner.datasets[hook], hook)
        ref_acts, ref_toks = columns(tmp_path / "ref" / "multi" / "cache" / hook, hook)
        assert acts.tobytes() == ref_acts.tobytes() and np.array_equal(toks, ref_toks)
    root = json.loads((tmp_path / "run" / "multi" / "cache" / MARKER).read_text())
    assert root["resumed"] is True


def _interrupt() -> None:
    raise RuntimeError("interrupted")


def test_the_top_folder_is_described_by_hook_name_whatever_its_place(
    tmp_path, tiny_model, corpus
):
    hooks = ["blocks.0.mlp.hook_post", PRIMARY]
    cfg = CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, hook_names=hooks))
    CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=tiny_model, quiet=True
    ).run()
    out = tmp_path / "cache"
    described = describe_cache(out)
    assert (described["hook_name"], described["d_in"]) == (PRIMARY, 32)
    mlp = json.loads((out / "blocks.0.mlp.hook_post" / MARKER).read_text())
    assert (mlp["run"]["hook_name"], mlp["run"]["d_in"]) == (hooks[0], 64)

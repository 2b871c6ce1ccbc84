"""The runner against the real sae-lens runner and store, on a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sae_lens
import torch
from datasets import load_from_disk
from sae_lens.training.activations_store import ActivationsStore

from sae_cache_ext import CacheActivationsRunner
from sae_cache_ext.staging import MARKER
from tests.conftest import default_cfg_kwargs
from tests.helpers import HOOK, columns, run_ours, run_upstream


def test_runner_subclasses_upstream():
    assert issubclass(CacheActivationsRunner, sae_lens.CacheActivationsRunner)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # 2 bytes per value: the same buffer size in GB holds twice the rows
        {"dtype": "float16", "buffer_size_gb": (2 * 4 * 16 * 32 * 2 + 0.5) / 1e9},
        # 11 positions a row, 8 rows a buffer: 5 whole buffers
        {"seqpos_slice": (2, -3), "training_tokens": 5 * 8 * 11},
        {"hook_name": "blocks.1.hook_mlp_out", "model_batch_size": 3},
        {"prepend_bos": False, "context_size": 24},
    ],
    ids=["defaults", "float16", "seqpos_slice", "mlp_out", "no_bos"],
)
def test_defaults_with_shuffle_off_equal_upstream_bit_for_bit(
    tmp_path, tiny_model, corpus, monkeypatch, overrides
):
    kwargs = default_cfg_kwargs(tmp_path / "ours", **overrides)
    ours = run_ours(
        __import__("sae_cache_ext").CacheActivationsRunnerConfig(**kwargs),
        tiny_model,
        corpus,
    )
    theirs = run_upstream(
        default_cfg_kwargs(tmp_path / "theirs", **overrides),
        tiny_model,
        corpus,
        monkeypatch,
    )
    hook = overrides.get("hook_name", HOOK)
    assert ours.features == theirs.features
    acts, toks = columns(ours, hook)
    up_acts, up_toks = columns(theirs, hook)
    assert acts.dtype == up_acts.dtype
    assert acts.tobytes() == up_acts.tobytes()  # bit for bit
    assert np.array_equal(toks, up_toks)
    # and what is on disk is what was returned
    disk_acts, disk_toks = columns(tmp_path / "ours" / "cache", hook)
    assert disk_acts.tobytes() == acts.tobytes() and np.array_equal(disk_toks, toks)


def test_upstream_config_object_is_accepted(tmp_path, tiny_model, corpus):
    upstream_cfg = sae_lens.CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path))
    runner = CacheActivationsRunner(
        upstream_cfg, override_dataset=corpus, override_model=tiny_model, quiet=True
    )
    assert len(runner.run()) == upstream_cfg.n_seq_in_dataset


def _store_rows(model, corpus, cfg, n_batches: int) -> np.ndarray:
    """Token rows the sae-lens store itself yields for these options."""
    store = ActivationsStore(
        model=model,
        dataset=corpus,
        streaming=False,
        hook_name=cfg.hook_name,
        hook_head_index=None,
        context_size=cfg.context_size,
        d_in=cfg.d_in,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        total_training_tokens=cfg.training_tokens,
        store_batch_size_prompts=cfg.model_batch_size,
        train_batch_size_tokens=-1,
        prepend_bos=cfg.prepend_bos,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype=cfg.dtype,
        disable_concat_sequences=cfg.disable_concat_sequences,
        sequence_separator_token=cfg.sequence_separator_token,
    )
    batches = [store.get_batch_tokens() for _ in range(n_batches)]
    return torch.cat(batches).numpy()


@pytest.mark.parametrize(
    "options",
    [
        {"disable_concat_sequences": True},
        {"sequence_separator_token": "eos"},
        {"sequence_separator_token": None},
        {"sequence_separator_token": 7},
        {"disable_concat_sequences": True, "sequence_separator_token": "eos"},
    ],
)
def test_tokenization_options_give_the_rows_the_store_yields(
    make_cfg, tiny_model, corpus, options
):
    cfg = make_cfg(**options)
    _, toks = columns(run_ours(cfg, tiny_model, corpus))
    n_batches = cfg.n_buffers * cfg.n_batches_in_buffer
    assert np.array_equal(toks, _store_rows(tiny_model, corpus, cfg, n_batches))


def test_disable_concat_sequences_starts_every_row_with_bos(
    make_cfg, tiny_model, corpus
):
    bos = tiny_model.tokenizer.bos_token_id
    _, toks = columns(
        run_ours(make_cfg(disable_concat_sequences=True), tiny_model, corpus)
    )
    assert (toks[:, 0] == bos).all()
    assert not (toks[:, 1:] == bos).any()  # no second document joined in
    _, joined = columns(
        run_ours(
            make_cfg(
                new_cached_activations_path=str(make_cfg().new_cached_activations_path)
                + "2"
            ),
            tiny_model,
            corpus,
        )
    )
    assert (joined[:, 1:] == bos).any()  # by default documents are joined with bos


def test_separator_token_appears_between_documents(make_cfg, tiny_model, corpus):
    eos = tiny_model.tokenizer.eos_token_id
    _, toks = columns(
        run_ours(make_cfg(sequence_separator_token="eos"), tiny_model, corpus)
    )
    assert (toks == eos).sum() > 0


def test_exclude_special_tokens_true_removes_the_tokenizer_specials(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(exclude_special_tokens=True)
    specials = set(sae_lens.util.get_special_token_ids(tiny_model.tokenizer))
    plain_toks = columns(
        run_ours(
            make_cfg(
                new_cached_activations_path=cfg.new_cached_activations_path + "-plain"
            ),
            tiny_model,
            corpus,
        )
    )[1]
    assert np.isin(plain_toks, list(specials)).any()  # there was something to remove
    _, toks = columns(run_ours(cfg, tiny_model, corpus))
    assert not np.isin(toks, list(specials)).any()
    # the cache still holds as many full rows
    assert toks.shape == (cfg.n_seq_in_dataset, cfg.sliced_context_size)
    # and the kept tokens are exactly the stream without specials, in order
    kept_stream = [
        t
        for t in _store_rows(tiny_model, corpus, cfg, 40).reshape(-1)
        if t not in specials
    ]
    assert toks.reshape(-1).tolist() == kept_stream[: toks.size]


def test_exclude_special_tokens_keeps_activations_paired_at_hook_embed(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(hook_name="hook_embed", exclude_special_tokens=[0, 1, 5, 9])
    acts, toks = columns(run_ours(cfg, tiny_model, corpus))
    assert not np.isin(toks, [0, 1, 5, 9]).any()
    w_e = tiny_model.W_E.detach().numpy()
    np.testing.assert_array_equal(acts, w_e[toks])


def test_exclude_special_tokens_true_needs_a_tokenizer(make_cfg, tiny_model, corpus):
    import copy

    model = copy.copy(tiny_model)
    model.tokenizer = None
    with pytest.raises(ValueError, match="exclude_special_tokens"):
        CacheActivationsRunner(
            make_cfg(exclude_special_tokens=True),
            override_dataset=corpus,
            override_model=model,
        )


def test_shuffle_across_sequences_permutes_tokens_and_keeps_pairs(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(hook_name="hook_embed", shuffle=True, shuffle_across_sequences=True)
    acts, toks = columns(run_ours(cfg, tiny_model, corpus))
    # at hook_embed the activation of a token is its row of W_E
    np.testing.assert_array_equal(acts, tiny_model.W_E.detach().numpy()[toks])
    plain = make_cfg(
        hook_name="hook_embed",
        new_cached_activations_path=cfg.new_cached_activations_path + "-plain",
    )
    _, plain_toks = columns(run_ours(plain, tiny_model, corpus))
    # same multiset of tokens, different arrangement within rows
    assert sorted(toks.reshape(-1).tolist()) == sorted(plain_toks.reshape(-1).tolist())
    bos = tiny_model.tokenizer.bos_token_id
    assert (plain_toks[:, 0] == bos).all() and not (toks[:, 0] == bos).all()


def test_shuffle_across_sequences_mixes_tokens_from_different_rows_of_a_buffer(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(shuffle=True, shuffle_across_sequences=True)
    _, toks = columns(run_ours(cfg, tiny_model, corpus))
    plain = make_cfg(
        new_cached_activations_path=cfg.new_cached_activations_path + "-plain"
    )
    _, plain_toks = columns(run_ours(plain, tiny_model, corpus))
    plain_rows = [set(r) for r in plain_toks.tolist()]
    # a shuffled row is not a permutation of any one original row
    assert (
        sum(any(set(r) <= p for p in plain_rows) for r in toks.tolist())
        < len(toks) // 4
    )
    # each buffer's tokens stay in that buffer: compare multisets per buffer
    per_buffer = cfg.n_seq_in_buffer
    assert sorted(toks.reshape(-1).tolist()) == sorted(plain_toks.reshape(-1).tolist())
    del per_buffer


def test_shuffle_is_persisted_on_disk_and_equals_the_returned_dataset(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(shuffle=True)
    returned = run_ours(cfg, tiny_model, corpus)
    acts, toks = columns(returned)
    disk_acts, disk_toks = columns(cfg.new_cached_activations_path)
    assert disk_acts.tobytes() == acts.tobytes() and np.array_equal(disk_toks, toks)
    # the files themselves are shuffled: reading them in order is not generation order
    unshuffled = make_cfg(
        new_cached_activations_path=cfg.new_cached_activations_path + "-u"
    )
    _, gen_toks = columns(run_ours(unshuffled, tiny_model, corpus))
    assert not np.array_equal(disk_toks, gen_toks)
    assert sorted(map(tuple, disk_toks.tolist())) == sorted(
        map(tuple, gen_toks.tolist())
    )


def test_shuffled_runs_are_reproducible_and_seeded(make_cfg, tiny_model, corpus):
    base = make_cfg(
        shuffle=True, shuffle_across_sequences=True
    ).new_cached_activations_path
    first = columns(
        run_ours(
            make_cfg(
                shuffle=True,
                shuffle_across_sequences=True,
                new_cached_activations_path=base + "1",
            ),
            tiny_model,
            corpus,
        )
    )
    again = columns(
        run_ours(
            make_cfg(
                shuffle=True,
                shuffle_across_sequences=True,
                new_cached_activations_path=base + "2",
            ),
            tiny_model,
            corpus,
        )
    )
    other = columns(
        run_ours(
            make_cfg(
                shuffle=True,
                shuffle_across_sequences=True,
                seed=1,
                new_cached_activations_path=base + "3",
            ),
            tiny_model,
            corpus,
        )
    )
    assert first[0].tobytes() == again[0].tobytes() and np.array_equal(
        first[1], again[1]
    )
    assert not np.array_equal(first[1], other[1])
    # identical files too, checksums included
    m1 = json.loads((Path(base + "1") / MARKER).read_text())
    m2 = json.loads((Path(base + "2") / MARKER).read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]


def test_a_buffers_token_permutation_does_not_depend_on_earlier_buffers(
    make_cfg, tiny_model, corpus
):
    # Caching 1 buffer or 3: the first buffer's rows (before the row shuffle) are
    # the same, because its generator is seeded by (seed, 0) alone.

    cfg3 = make_cfg(shuffle=True, shuffle_across_sequences=True)
    one_buffer = cfg3.n_seq_in_buffer * cfg3.sliced_context_size
    cfg1 = make_cfg(
        shuffle=True,
        shuffle_across_sequences=True,
        training_tokens=one_buffer,
        new_cached_activations_path=cfg3.new_cached_activations_path + "-1",
    )
    firsts = []
    for cfg in (cfg1, cfg3):
        runner = CacheActivationsRunner(
            cfg, override_dataset=corpus, override_model=tiny_model
        )
        buffer = runner.producer.buffer(0)
        firsts.append(buffer.toks_RT.reshape(-1)[buffer.order_N])
    assert torch.equal(firsts[0], firsts[1])


def test_the_finished_cache_carries_a_manifest(make_cfg, tiny_model, corpus):
    cfg = make_cfg(shuffle=True)
    dataset = run_ours(cfg, tiny_model, corpus)
    manifest = json.loads((Path(cfg.new_cached_activations_path) / MARKER).read_text())
    assert manifest["state"] == "complete"
    assert manifest["rows"] == len(dataset) == cfg.n_seq_in_dataset
    assert manifest["config"]["shuffle"] is True
    assert manifest["fingerprint"] == cfg.data_fingerprint
    assert sum(s["rows"] for s in manifest["shards"]) == len(dataset)
    assert manifest["versions"]["sae-lens"] == sae_lens.__version__


def test_sae_lens_store_reads_the_cache(make_cfg, tiny_model, corpus):
    cfg = make_cfg(shuffle=True, shuffle_across_sequences=True)
    run_ours(cfg, tiny_model, corpus)
    store = ActivationsStore.from_cache_activations(tiny_model, cfg)
    acts, toks = store.get_raw_llm_batch()
    assert acts.shape == (cfg.model_batch_size * cfg.sliced_context_size, cfg.d_in)
    on_disk = load_from_disk(cfg.new_cached_activations_path).with_format("torch")
    assert torch.equal(
        toks, on_disk[: cfg.model_batch_size]["token_ids"].reshape(-1).long()
    )


def test_pretokenized_rows_equal_upstream_bit_for_bit(
    tmp_path, tiny_model, corpus, monkeypatch
):
    """Rows are read a batch at a time here, one at a time by sae-lens's store: the
    same rows in the same order either way (72 rows of 24 tokens, context 16)."""
    from datasets import Dataset

    ids = tiny_model.tokenizer("\n".join(corpus["text"][:200]))["input_ids"]
    rows = Dataset.from_dict(
        {"tokens": [ids[i : i + 24] for i in range(0, 72 * 24, 24)]}
    )
    assert len(rows) == 72
    overrides = {"training_tokens": 48 * 16}  # 6 buffers: 48 of the 72 rows
    ours = run_ours(
        __import__("sae_cache_ext").CacheActivationsRunnerConfig(
            **default_cfg_kwargs(tmp_path / "ours", **overrides)
        ),
        tiny_model,
        rows,
    )
    theirs = run_upstream(
        default_cfg_kwargs(tmp_path / "theirs", **overrides),
        tiny_model,
        rows,
        monkeypatch,
    )
    acts, toks = columns(ours, HOOK)
    up_acts, up_toks = columns(theirs, HOOK)
    assert acts.shape == (48, 16, 32)
    assert acts.tobytes() == up_acts.tobytes()
    assert np.array_equal(toks, up_toks)

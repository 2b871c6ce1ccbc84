"""Every token that does not reach the cache is counted with its reason; a dataset
that runs out is never repeated silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sae_cache_ext import accounting
from sae_cache_ext.accounting import coverage_spread, coverage_table, length_bucket
from sae_cache_ext.manifest import read_manifest
from sae_cache_ext.staging import Layout
from tests.conftest import default_cfg_kwargs
from tests.fixtures import build_corpus, build_model
from tests.helpers import columns, run_ours, run_upstream


def _lengths(model, corpus) -> list[int]:
    # as sae-lens's store tokenizes them
    return [
        model.to_tokens(text, prepend_bos=False, truncate=False).shape[1]
        for text in corpus["text"]
    ]


@pytest.mark.parametrize(
    ("n", "bucket"),
    [
        (0, "0"),
        (1, "1"),
        (2, "2"),
        (3, "3-4"),
        (4, "3-4"),
        (5, "5-8"),
        (16, "9-16"),
        (17, "17-32"),
    ],
)
def test_length_buckets_are_powers_of_two(n, bucket):
    assert length_bucket(n) == bucket


def test_short_documents_dropped_by_disable_concat_are_counted(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(disable_concat_sequences=True)
    run_ours(cfg, tiny_model, corpus)
    facts = read_manifest(Path(cfg.new_cached_activations_path))["accounting"]
    lengths = _lengths(tiny_model, corpus)
    # documents are settled when the store moves past them: all but the last read
    settled = lengths[: facts["documents_read"] - 1]
    # with BOS prepended, a document is kept when it has at least context_size - 1 tokens
    short = [n for n in settled if n < cfg.context_size - 1]
    assert facts["documents_dropped_short"] == len(short) > 0
    assert facts["tokens_dropped"]["short_document"] == sum(short)
    long_tail = sum(
        n - (cfg.context_size - 1) for n in settled if n >= cfg.context_size - 1
    )
    assert facts["tokens_dropped"]["truncated_document"] == long_tail
    assert facts["documents_kept"] == len(settled) - len(short)
    assert facts["rows_from_store"] >= cfg.n_seq_in_dataset


def test_coverage_table_flags_the_length_bias_of_disable_concat(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(disable_concat_sequences=True)
    run_ours(cfg, tiny_model, corpus)
    rows = coverage_table(
        read_manifest(Path(cfg.new_cached_activations_path))["accounting"]
    )
    assert rows[0].kept_documents == 0  # the shortest documents are all dropped
    assert coverage_spread(rows) > accounting.COVERAGE_WARNING_POINTS
    assert "WARNING" in accounting.format_coverage(rows)


def test_concatenation_keeps_every_settled_document_whole(make_cfg, tiny_model, corpus):
    cfg = make_cfg()
    run_ours(cfg, tiny_model, corpus)
    facts = read_manifest(Path(cfg.new_cached_activations_path))["accounting"]
    assert facts["documents_dropped_short"] == 0
    assert facts["tokens_dropped"] == {}
    rows = coverage_table(facts)
    assert all(r.kept_token_fraction == 1.0 for r in rows)
    assert "WARNING" not in accounting.format_coverage(rows)


def test_excluded_special_tokens_are_counted_by_id(make_cfg, tiny_model, corpus):
    cfg = make_cfg(exclude_special_tokens=True)
    run_ours(cfg, tiny_model, corpus)
    facts = read_manifest(Path(cfg.new_cached_activations_path))["accounting"]
    bos = str(tiny_model.tokenizer.bos_token_id)
    assert facts["excluded_special_tokens_by_id"][bos] > 0
    assert facts["tokens_dropped"]["excluded_special_token"] == sum(
        facts["excluded_special_tokens_by_id"].values()
    )


def test_seqpos_slice_drops_are_counted(make_cfg, tiny_model, corpus):
    cfg = make_cfg(seqpos_slice=(2, None))
    run_ours(cfg, tiny_model, corpus)
    facts = read_manifest(Path(cfg.new_cached_activations_path))["accounting"]
    rows = read_manifest(Path(cfg.new_cached_activations_path))["rows"]
    pulled = facts["rows_from_store"]
    # every row the store yields loses its first 2 positions
    assert facts["tokens_dropped"]["outside_seqpos_slice"] == 2 * pulled
    # rows computed beyond training_tokens (the last batch) are counted too
    assert facts["tokens_dropped"].get("leftover_at_end", 0) == (pulled - rows) * 14
    assert rows == cfg.training_tokens // 14


def test_an_exhausted_dataset_is_finished_with_what_was_read_and_recorded(
    make_cfg, tiny_model, caplog
):
    small = build_corpus(n_docs=30)  # about 60 rows of 16 tokens
    cfg = make_cfg(training_tokens=200 * 16 * 8)
    with caplog.at_level("WARNING"):
        dataset = run_ours(cfg, tiny_model, small)
    assert "ran out" in caplog.text
    assert 0 < len(dataset) < cfg.n_seq_in_dataset
    manifest = read_manifest(Path(cfg.new_cached_activations_path))
    assert manifest["dataset_exhaustion"] == {"exhausted": True, "repeats": 0}
    assert manifest["rows"] == len(dataset)
    _, toks = columns(dataset)
    assert len({tuple(r) for r in toks.tolist()}) == len(dataset)  # nothing repeated


def test_an_exhausted_dataset_can_be_an_error_that_leaves_nothing(make_cfg, tiny_model):
    cfg = make_cfg(training_tokens=200 * 16 * 8, on_dataset_exhausted="error")
    with pytest.raises(ValueError, match="on_dataset_exhausted"):
        run_ours(cfg, tiny_model, build_corpus(n_docs=30))
    layout = Layout.for_output(cfg.new_cached_activations_path)
    assert not layout.final.exists() and not layout.staging.exists()


def test_repeat_is_opt_in_equals_upstream_and_is_recorded(
    tmp_path, tiny_model, monkeypatch
):
    small = build_corpus(n_docs=10)  # fewer than the 96 rows asked for
    kwargs = default_cfg_kwargs(tmp_path / "ours", training_tokens=12 * 8 * 16)
    from sae_cache_ext import CacheActivationsRunnerConfig

    ours = run_ours(
        CacheActivationsRunnerConfig(**kwargs, on_dataset_exhausted="repeat"),
        tiny_model,
        small,
    )
    theirs = run_upstream(
        default_cfg_kwargs(tmp_path / "theirs", training_tokens=12 * 8 * 16),
        tiny_model,
        small,
        monkeypatch,
    )
    assert np.array_equal(columns(ours)[1], columns(theirs)[1])
    assert columns(ours)[0].tobytes() == columns(theirs)[0].tobytes()
    manifest = read_manifest(Path(kwargs["new_cached_activations_path"]))
    assert manifest["dataset_exhaustion"]["repeats"] >= 1


def test_manifest_records_how_the_activations_were_made(
    make_cfg, tiny_model, tokenizer_dir, corpus
):
    cfg = make_cfg()
    run_ours(cfg, tiny_model, corpus)
    manifest = read_manifest(Path(cfg.new_cached_activations_path))
    run = manifest["run"]
    assert run["hook_name"] == cfg.hook_name and run["d_in"] == cfg.d_in
    assert run["dtype"] == "float32" and run["device"] == "cpu"
    assert run["autocast_lm"] is False and run["deterministic_algorithms"] is False
    assert len(run["weights_sha256"]) == 64
    for package in (
        "sae-cache-ext",
        "sae-lens",
        "transformer-lens",
        "torch",
        "datasets",
    ):
        assert manifest["versions"][package]
    assert manifest["rows_are_sequences"] is True and manifest["row_length"] == 16
    assert "pid" not in manifest and "host" not in manifest
    other = make_cfg(new_cached_activations_path=cfg.new_cached_activations_path + "-2")
    run_ours(other, build_model(tokenizer_dir, seed=1), corpus)
    other_run = read_manifest(Path(other.new_cached_activations_path))["run"]
    assert other_run["weights_sha256"] != run["weights_sha256"]
    assert json.dumps(manifest)  # JSON all the way down

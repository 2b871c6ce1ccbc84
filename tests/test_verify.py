"""`describe_cache` and `verify_cache` on small caches made by our runner and
sae-lens's, with corruptions made by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from sae_cache_ext.staging import MARKER
from sae_cache_ext.verify import (
    CHECK_CHECKSUMS,
    CHECK_FILES,
    CHECK_LOAD,
    CHECK_MANIFEST,
    CHECK_RERUN,
    CHECK_ROWS,
    CHECK_SCHEMA,
    compare_activations,
    describe_cache,
    format_description,
    verify_cache,
)
from tests.conftest import default_cfg_kwargs
from tests.fixtures import build_model
from tests.helpers import HOOK, columns, run_ours, run_upstream

# make_cfg's defaults: 3 buffers of 8 rows x 16 tokens, d_in 32, one file per buffer.
ROWS, CONTEXT, D_IN = 24, 16, 32


def make_cache(make_cfg, model, corpus, **overrides) -> Path:
    cfg = make_cfg(**overrides)
    run_ours(cfg, model, corpus)
    return Path(str(cfg.new_cached_activations_path))


def data_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.arrow"))


def flip_byte(path: Path, offset: int) -> bytes:
    """Flip every bit of the byte at `offset`; return the original contents."""
    original = path.read_bytes()
    changed = bytearray(original)
    changed[offset] ^= 0xFF
    path.write_bytes(bytes(changed))
    return original


def edit_manifest(cache: Path, edit) -> None:
    manifest = json.loads((cache / MARKER).read_text())
    edit(manifest)
    (cache / MARKER).write_text(json.dumps(manifest))


# -- the comparison, on tensors small enough to check by hand -------------------------


def test_compare_activations_scales_atol_by_the_rms_and_rtol_by_each_value():
    stored = torch.tensor([[[3.0, 4.0, 0.0, 0.0]]])  # RMS = sqrt(25 / 4) = 2.5
    rerun = torch.tensor([[[3.3, 4.0, 0.2, 0.0]]])
    # errors 0.3, 0, 0.2, 0; tolerance = 0.1 x 2.5 + 0.05 x |stored|:
    # 0.25 + 0.15 = 0.40 for 3.0 (inside), 0.25 for 0.0 (0.2 is inside).
    stats = compare_activations(rerun, stored, atol=0.1, rtol=0.05)
    assert stats.activation_scale == pytest.approx(2.5)
    assert stats.max_abs_error == pytest.approx(0.3)
    # relative error only where |stored| > 0.25: 0.3 / 3 = 0.1
    assert stats.max_rel_error == pytest.approx(0.1)
    assert (stats.n_values, stats.n_outside) == (4, 0)
    # with rtol 0 the 3.0 value (error 0.3 > 0.25) falls outside
    assert compare_activations(rerun, stored, atol=0.1, rtol=0.0).n_outside == 1


def test_compare_activations_counts_nan_as_outside():
    stored = torch.ones(1, 1, 2)
    rerun = torch.tensor([[[1.0, float("nan")]]])
    assert compare_activations(rerun, stored, atol=1.0, rtol=1.0).n_outside == 1


# -- verify: a clean cache, and the re-run --------------------------------------------


def test_a_clean_cache_verifies_with_tiny_rerun_errors(make_cfg, tiny_model, corpus):
    cache = make_cache(make_cfg, tiny_model, corpus)
    report = verify_cache(cache, model=tiny_model, rows=8, seed=0)
    assert report.ok, report.format()
    assert report.problems == []
    assert report.checks == [
        CHECK_MANIFEST,
        CHECK_FILES,
        CHECK_ROWS,
        CHECK_CHECKSUMS,
        CHECK_LOAD,
        CHECK_SCHEMA,
        CHECK_RERUN,
    ]
    assert len(report.rerun_rows) == 8 and len(set(report.rerun_rows)) == 8
    # float32 on the same CPU: far inside the default 1e-4 x scale
    assert report.max_abs_error is not None and report.activation_scale is not None
    assert report.max_abs_error <= 1e-6 * report.activation_scale
    assert report.atol == 1e-4 and report.rtol == 1e-4
    text = report.format()
    assert "OK" in text and "re-run of 8 rows" in text
    # the sample is seeded: same seed, same rows; another seed, other rows
    assert verify_cache(cache, model=tiny_model, seed=0).rerun_rows == report.rerun_rows
    assert verify_cache(cache, model=tiny_model, seed=1).rerun_rows != report.rerun_rows


def test_a_float16_cache_rerun_passes_within_its_tolerance(
    make_cfg, tiny_model, corpus
):
    cache = make_cache(make_cfg, tiny_model, corpus, dtype="float16")
    report = verify_cache(cache, model=tiny_model)
    assert report.ok, report.format()
    assert (report.atol, report.rtol) == (1e-2, 1e-2)
    # float16 keeps 11 significant bits: rounding shows, within 2^-11 relative
    # (of the exact value; / (1 - 2^-11) relative to the rounded one)
    assert report.max_rel_error is not None
    assert 0 < report.max_rel_error <= 2**-11 / (1 - 2**-11)
    # ...which float32's tolerance would not forgive
    assert not verify_cache(cache, model=tiny_model, atol=1e-7, rtol=1e-7).ok


def test_a_different_model_fails_the_rerun(make_cfg, tiny_model, corpus, tokenizer_dir):
    cache = make_cache(make_cfg, tiny_model, corpus)
    other = build_model(tokenizer_dir, seed=1)
    report = verify_cache(cache, model=other)
    assert not report.ok
    assert CHECK_RERUN in report.checks
    (problem,) = report.problems
    assert problem.startswith("re-run:") and "model_name='tiny-random'" in problem


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"shuffle": True, "shuffle_across_sequences": True},
            "shuffle_across_sequences",
        ),
        ({"exclude_special_tokens": True}, "exclude_special_tokens"),
        ({"seqpos_slice": (1, None)}, "seqpos_slice"),
    ],
    ids=["shuffle_across_sequences", "exclude_special_tokens", "seqpos_slice"],
)
def test_the_rerun_is_skipped_with_a_reason_when_rows_are_not_sequences(
    make_cfg, tiny_model, corpus, overrides, reason
):
    cache = make_cache(make_cfg, tiny_model, corpus, **overrides)
    report = verify_cache(cache, model=tiny_model)
    assert report.ok, report.format()  # skipping is not a failure
    assert CHECK_RERUN not in report.checks and report.max_abs_error is None
    assert any(s.startswith(CHECK_RERUN) and reason in s for s in report.skipped)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exclude_special_tokens": True}, "exclude_special_tokens"),
        (
            {"shuffle": True, "shuffle_across_sequences": True, "hook_names": [HOOK]},
            "shuffle_across_sequences",
        ),
    ],
    ids=["exclusion", "shuffle_across_sequences-hook_names"],
)
def test_the_rerun_skip_is_said_before_any_model_is_loaded(
    make_cfg, tiny_model, corpus, tmp_path, overrides, reason
):
    cache = make_cache(make_cfg, tiny_model, corpus, **overrides)
    loaded = []
    report = verify_cache(cache, model=lambda: loaded.append(1) or tiny_model)
    assert loaded == [] and report.ok, report.format()
    (skip,) = [s for s in report.skipped if CHECK_RERUN in s]
    assert reason in skip and "store_token_positions" in skip
    # the command line: a model that does not exist is never looked for
    from sae_cache_ext.cli import main

    missing = str(tmp_path / "no-such-model")
    assert main(["verify", str(cache), "--model", missing]) == 0


def test_a_row_shuffled_cache_still_reruns(make_cfg, tiny_model, corpus):
    # shuffle=True alone moves whole rows: each row is still an original sequence
    cache = make_cache(make_cfg, tiny_model, corpus, shuffle=True)
    report = verify_cache(cache, model=tiny_model)
    assert report.ok and CHECK_RERUN in report.checks, report.format()


# -- verify: corruptions --------------------------------------------------------------


def test_any_flipped_byte_in_any_data_file_fails(make_cfg, tiny_model, corpus):
    cache = make_cache(make_cfg, tiny_model, corpus)
    for path in data_files(cache):
        size = path.stat().st_size
        # the stream's first message length, inside the schema, the middle (inside
        # the activations) and the last byte (the end-of-stream marker)
        for offset in (0, 5, 200, size // 2, size - 1):
            original = flip_byte(path, offset)
            report = verify_cache(cache)
            path.write_bytes(original)
            assert not report.ok, f"flip at {offset} of {path.name} went unnoticed"
            assert any(path.name in p for p in report.problems)
    assert verify_cache(cache).ok  # every file restored


def test_a_flipped_activation_byte_that_still_loads_fails_its_checksum(
    make_cfg, tiny_model, corpus
):
    cache = make_cache(make_cfg, tiny_model, corpus)
    acts, _ = columns(cache, HOOK)
    first = data_files(cache)[0]
    offset = first.read_bytes().find(acts[0].tobytes())  # row 0's activations
    assert offset > 0
    flip_byte(first, offset + 1)  # a mantissa byte of acts[0, 0, 0]
    changed, _ = columns(load_from_disk(str(cache)), HOOK)  # still loads...
    assert changed.shape == acts.shape and changed[0, 0, 0] != acts[0, 0, 0]
    report = verify_cache(cache)
    assert not report.ok
    # ...with the right row counts and schema: only the checksum notices
    (problem,) = report.problems
    assert first.name in problem and "sha256" in problem


def test_a_deleted_data_file_fails(make_cfg, tiny_model, corpus):
    cache = make_cache(make_cfg, tiny_model, corpus)
    gone = data_files(cache)[1]
    gone.unlink()
    report = verify_cache(cache, model=tiny_model)
    assert not report.ok
    assert any(
        p.startswith(f"data file {gone.name} is missing") for p in report.problems
    )
    assert any(p.startswith("load_from_disk") for p in report.problems)
    assert any(s.startswith(CHECK_RERUN) for s in report.skipped)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.update(rows=m["rows"] + 1), "records 25"),
        (lambda m: m["shards"][0].update(rows=7), "holds 8 rows; "),
        (lambda m: m.update(state="staging"), "never finished"),
    ],
    ids=["total_rows", "shard_rows", "unfinished"],
)
def test_a_changed_manifest_fails(make_cfg, tiny_model, corpus, edit, expected):
    cache = make_cache(make_cfg, tiny_model, corpus)
    edit_manifest(cache, edit)
    report = verify_cache(cache)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


# -- describe -------------------------------------------------------------------------


def test_describe_our_cache(make_cfg, tiny_model, corpus):
    cache = make_cache(make_cfg, tiny_model, corpus)
    desc = describe_cache(cache)
    assert desc["made_by"] == "sae-cache-ext"
    assert desc["schema"] == {
        HOOK: f"Array2D(shape=({CONTEXT}, {D_IN}), dtype=float32)",
        "token_ids": f"Sequence(int32, length={CONTEXT})",
    }
    assert (desc["hook_name"], desc["dtype"]) == (HOOK, "float32")
    assert (desc["rows"], desc["context_size"], desc["d_in"]) == (ROWS, CONTEXT, D_IN)
    assert desc["tokens"] == ROWS * CONTEXT == 384
    assert desc["size_bytes"] == sum(p.stat().st_size for p in cache.iterdir())
    assert desc["data_bytes"] == sum(p.stat().st_size for p in data_files(cache))
    assert desc["config"]["hook_name"] == HOOK and desc["config_source"] == MARKER
    facts = desc["manifest"]
    assert facts["versions"]["sae-lens"] and "caching_seconds" in facts["timings"]
    json.dumps(desc)  # JSON-ready
    text = format_description(desc)
    assert HOOK in text and "24 rows x 16 tokens = 384 tokens, d_in 32" in text
    assert "caching_seconds" in text and "shuffle_across_sequences" in text


def test_describe_and_verify_a_plain_sae_lens_cache(
    tmp_path, tiny_model, corpus, monkeypatch
):
    kwargs = default_cfg_kwargs(tmp_path)
    run_upstream(kwargs, tiny_model, corpus, monkeypatch)
    cache = Path(kwargs["new_cached_activations_path"])
    desc = describe_cache(cache)
    assert desc["made_by"] == "sae-lens (no manifest)"
    assert desc["manifest"] is None and desc["config"] is None
    assert (desc["hook_name"], desc["dtype"]) == (HOOK, "float32")
    assert (desc["rows"], desc["context_size"], desc["d_in"]) == (ROWS, CONTEXT, D_IN)
    assert "config: unknown" in format_description(desc)
    # no manifest: fewer checks, no checksums, no re-run, and no failure
    report = verify_cache(cache, model=tiny_model)
    assert report.ok, report.format()
    assert CHECK_CHECKSUMS not in report.checks and CHECK_ROWS in report.checks
    assert any(s.startswith(CHECK_CHECKSUMS) for s in report.skipped)
    assert any(s.startswith(CHECK_RERUN) for s in report.skipped)

"""What the manifest says about the activations: statistics, non-finite values, the
numeric envelope.

Every statistic is checked against a recomputation from the cached rows as
`load_from_disk` reads them (numpy, float64), for one hook, several hooks, a
shuffled cache and a resumed one. The non-finite guard runs on real models whose
activations overflow float16 (the embedding scaled up) or are NaN.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sae_cache_ext import CacheActivationsRunner, envelope, shuffle
from sae_cache_ext.hub import card_text
from sae_cache_ext.staging import MARKER, Layout
from sae_cache_ext.statistics import (
    BINS_PER_OCTAVE,
    CacheStatistics,
    HookStatistics,
    NonFiniteActivationsError,
    merge_statistics,
)
from sae_cache_ext.verify import describe_cache, format_description, verify_cache
from tests.fixtures import build_model
from tests.helpers import before_nth_call, columns

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
BIN = 2 ** (1 / BINS_PER_OCTAVE) - 1  # a histogram bin's relative width (1.1%)


def recomputed(acts: np.ndarray) -> dict[str, Any]:
    """The statistics of cached rows `(rows, T, D)`, computed directly in float64."""
    x = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    return {
        "count": x.shape[0],
        "mean": x.mean(0),
        "var": x.var(0),
        "norm_mean": norms.mean(),
        "norms": norms,
        "max_abs": np.abs(x).max(),
    }


def assert_statistics_match(stats: dict[str, Any], acts: np.ndarray) -> None:
    expected = recomputed(acts)
    assert stats["count"] == expected["count"]
    assert stats["non_finite"] == 0
    np.testing.assert_allclose(stats["mean"], expected["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["var"], expected["var"], rtol=1e-9, atol=1e-12)
    assert stats["norm_mean"] == pytest.approx(expected["norm_mean"], rel=1e-12)
    assert stats["max_abs"] == expected["max_abs"]
    for q, value in stats["norm_quantiles"].items():
        exact = np.quantile(expected["norms"], float(q), method="inverted_cdf")
        # the histogram reads a quantile to within one log2 bin
        assert value == pytest.approx(exact, rel=BIN)


def run(cfg, model, corpus) -> Path:
    CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    ).run()
    return Path(str(cfg.new_cached_activations_path))


def manifest_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text())


# -- the arithmetic -------------------------------------------------------------


def test_merged_chunks_give_the_moments_of_the_whole():
    # three unequal chunks with a large common offset: Chan's update must not lose
    # the variance to cancellation
    generator = torch.Generator().manual_seed(0)
    x_ND = torch.randn(1000, 5, generator=generator, dtype=torch.float64) * 0.01 + 1e4
    merged = HookStatistics.empty(5)
    for chunk in (x_ND[:1], x_ND[1:300], x_ND[300:]):
        merged = merged.merge(HookStatistics.of_chunk(chunk))
    x = x_ND.numpy()
    np.testing.assert_allclose(merged.mean_D, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(merged.var_D, x.var(0), rtol=1e-9)
    assert merged.count == merged.finite_tokens == 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_pass_over_a_buffer_gives_what_the_careful_chunks_give(dtype):
    # more tokens than a chunk, an uneven last chunk, offsets of 1000 standard
    # deviations: the one-pass sums must keep the variance
    generator = torch.Generator().manual_seed(3)
    x_ND = torch.randn(1000, 7, generator=generator) + torch.linspace(-1e3, 1e3, 7)
    fast = HookStatistics.of_buffer(x_ND, dtype)
    careful = HookStatistics.of_values(x_ND, dtype)
    stored = x_ND.to(dtype).double().numpy()
    np.testing.assert_allclose(fast.mean_D, stored.mean(0), rtol=1e-12)
    # the module's bound: about 1e-15 x mean^2 / var = 1e-9 here
    np.testing.assert_allclose(fast.var_D, stored.var(0), rtol=1e-8)
    np.testing.assert_allclose(fast.var_D, careful.var_D, rtol=1e-8)
    assert fast.max_abs == careful.max_abs == np.abs(stored).max()
    assert fast.norm_sum == pytest.approx(careful.norm_sum, rel=1e-13)
    np.testing.assert_array_equal(fast.norm_hist, careful.norm_hist)
    assert fast.count == fast.finite_tokens == 1000 and fast.non_finite == 0


def test_a_buffer_holding_nan_is_counted_the_careful_way_and_named():
    x_ND = torch.ones(300, 4)
    x_ND[200, 1] = float("nan")
    stats = CacheStatistics.empty((("a", 2), ("b", 2)))
    assert stats.add(x_ND, "float32") == ["a"]
    a, b = stats.hooks["a"], stats.hooks["b"]
    assert (a.non_finite, a.finite_tokens, b.non_finite, b.finite_tokens) == (
        1,
        299,
        0,
        300,
    )


def test_norm_quantiles_are_within_one_histogram_bin():
    generator = torch.Generator().manual_seed(1)
    scale_N = torch.exp(torch.randn(5000, generator=generator) * 2)
    x_ND = torch.randn(5000, 16, generator=generator) * scale_N[:, None]
    stats = HookStatistics.of_chunk(x_ND)
    norms = torch.linalg.vector_norm(x_ND.double(), dim=1).numpy()
    for q in (0.01, 0.5, 0.99):
        exact = np.quantile(norms, q, method="inverted_cdf")
        assert stats.norm_quantile(q) == pytest.approx(exact, rel=BIN)


def test_tokens_with_nan_or_inf_are_counted_and_left_out_of_the_moments():
    x_ND = torch.tensor(
        [[1.0, 2.0], [float("nan"), 3.0], [3.0, float("inf")], [5.0, 6.0]]
    )
    stats = HookStatistics.of_chunk(x_ND)
    # two of eight values; the moments are over tokens 0 and 3
    assert (stats.count, stats.non_finite, stats.finite_tokens) == (4, 2, 2)
    np.testing.assert_array_equal(stats.mean_D, [3.0, 4.0])
    np.testing.assert_array_equal(stats.var_D, [4.0, 4.0])
    assert stats.max_abs == 6.0  # over the finite values, in any token


def test_statistics_survive_their_json_and_merge_across_parts():
    hooks = (("a", 3), ("b", 2))
    generator = torch.Generator().manual_seed(2)
    x_ND = torch.randn(50, 5, generator=generator)
    one = CacheStatistics.empty(hooks)
    one.add(x_ND, "float32")
    first, second = CacheStatistics.empty(hooks), CacheStatistics.empty(hooks)
    first.add(x_ND[:20], "float32")
    second.add(x_ND[20:], "float32")
    merged = merge_statistics([first.to_json(), second.to_json()])
    assert merged is not None
    for name in ("a", "b"):
        a = CacheStatistics.from_json(merged).hooks[name].summary()
        b = one.hooks[name].summary()
        np.testing.assert_allclose(a["var"], b["var"], rtol=1e-12)
        assert a["count"] == b["count"] == 50
        assert a["norm_quantiles"] == b["norm_quantiles"]
    assert merge_statistics([first.to_json(), None]) is None


# -- in the manifest ------------------------------------------------------------


def test_statistics_of_a_shuffled_cache_match_its_rows(make_cfg, tiny_model, corpus):
    cfg = make_cfg(shuffle=True, shuffle_across_sequences=True)
    out = run(cfg, tiny_model, corpus)
    manifest = manifest_of(out)
    acts, _ = columns(out)
    assert list(manifest["statistics"]) == [cfg.hook_name]
    assert_statistics_match(manifest["statistics"][cfg.hook_name], acts)
    assert manifest["timings"]["statistics_seconds"] > 0

    text = format_description(describe_cache(out))
    assert f"{cfg.hook_name}  384 tokens; L2 norm mean" in text
    card = card_text(manifest)
    assert "L2 norm mean (1% / 50% / 99%)" in card and "numeric envelope" in card


def test_statistics_of_several_hooks_match_each_hooks_rows(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(
        hook_names=HOOKS,
        shuffle=True,
        buffer_size_gb=(2 * 4 * 16 * 32 * 4 + 0.5) / 1e9,
    )
    out = run(cfg, tiny_model, corpus)
    top = manifest_of(out)
    assert sorted(top["statistics"]) == sorted(HOOKS)
    for hook in HOOKS:
        acts, _ = columns(out / hook, hook)
        assert_statistics_match(top["statistics"][hook], acts)
        own = manifest_of(out / hook)
        assert own["statistics"] == {hook: top["statistics"][hook]}
        assert (
            own["envelope"]["max_abs_error"]
            == (top["envelope"]["per_hook"][hook]["max_abs_error"])
        )
    assert len(top["statistics"]["blocks.0.mlp.hook_post"]["mean"]) == 64


class Interrupt(Exception):
    pass


def test_a_resumed_run_records_the_statistics_of_an_uninterrupted_one(
    tmp_path, make_cfg, tiny_model, corpus, monkeypatch
):
    whole = run(
        make_cfg(new_cached_activations_path=str(tmp_path / "whole")),
        tiny_model,
        corpus,
    )
    cfg = make_cfg(resume=True)

    def interrupt() -> None:
        raise Interrupt

    with monkeypatch.context() as m:
        write = shuffle.OrderedSink.write_buffer
        m.setattr(
            shuffle.OrderedSink, "write_buffer", before_nth_call(write, 3, interrupt)
        )
        with pytest.raises(Interrupt):
            run(cfg, tiny_model, corpus)
    out = run(cfg, tiny_model, corpus)
    resumed = manifest_of(out)
    assert resumed["resumed"] is True
    # the same buffers folded in the same order: the same numbers, bit for bit
    assert resumed["statistics"] == manifest_of(whole)["statistics"]
    assert resumed["envelope"] == manifest_of(whole)["envelope"]
    acts, _ = columns(out)
    assert_statistics_match(resumed["statistics"][cfg.hook_name], acts)


# -- non-finite values ----------------------------------------------------------


@pytest.fixture(scope="module")
def loud_model(tokenizer_dir):
    """The tiny model with its embedding scaled so that the residual stream reaches
    about 3e5, beyond float16's largest value (65504)."""
    model = build_model(tokenizer_dir)
    with torch.no_grad():
        model.embed.W_E.mul_(1e6 / model.embed.W_E.abs().max())
    return model


def test_a_float16_overflow_is_refused_and_nothing_is_written(
    make_cfg, loud_model, corpus
):
    cfg = make_cfg(dtype="float16")
    with pytest.raises(NonFiniteActivationsError) as error:
        run(cfg, loud_model, corpus)
    message = str(error.value)
    assert cfg.hook_name in message and "buffer 0" in message
    assert "float16" in message and "65504" in message and "dtype='float32'" in message
    out = Path(str(cfg.new_cached_activations_path))
    assert not out.exists() and not Layout.for_output(out).staging.exists()


def test_a_float16_overflow_is_kept_and_counted_with_warn(
    make_cfg, loud_model, corpus, caplog
):
    cfg = make_cfg(dtype="float16", on_non_finite="warn")
    with caplog.at_level(logging.WARNING, logger="sae_cache_ext.pipeline"):
        out = run(cfg, loud_model, corpus)
    assert sum("on_non_finite='warn'" in r.message for r in caplog.records) == 1
    acts, _ = columns(out)
    stored_inf = int(np.isinf(acts).sum())
    stats = manifest_of(out)["statistics"][cfg.hook_name]
    assert stored_inf > 0 and stats["non_finite"] == stored_inf
    assert stats["count"] == 384
    finite_rows = np.isfinite(acts.reshape(-1, acts.shape[-1])).all(1)
    assert stats["finite_tokens"] == int(finite_rows.sum())
    assert stats["max_abs"] <= 65504


def test_a_model_producing_nan_is_refused_naming_the_model(
    make_cfg, tokenizer_dir, corpus
):
    model = build_model(tokenizer_dir)
    with torch.no_grad():
        model.blocks[0].mlp.W_out[3, 5] = float("nan")  # NaN in one MLP neuron
    cfg = make_cfg()
    with pytest.raises(NonFiniteActivationsError, match="model itself produced"):
        run(cfg, model, corpus)
    assert not Path(str(cfg.new_cached_activations_path)).exists()


# -- the envelope ---------------------------------------------------------------


def test_the_envelope_is_small_on_cpu_float32_and_verify_reports_it(
    make_cfg, tiny_model, corpus
):
    cfg = make_cfg(shuffle=True, shuffle_across_sequences=True)
    out = run(cfg, tiny_model, corpus)
    measured = manifest_of(out)["envelope"]
    # 8 rows a buffer, cached in batches of 4: rows 0, 4 and 7 re-run together
    assert (measured["rows"], measured["batch_size"]) == (3, 3)
    assert measured["original_batch_size"] == 4
    scale = manifest_of(out)["statistics"][cfg.hook_name]["max_abs"]
    assert measured["max_abs_error"] <= 1e-5 * scale
    assert measured["max_rel_error"] <= 1e-4
    assert measured["min_cosine"] >= 1 - 1e-9
    report = verify_cache(out, model=tiny_model)
    assert report.envelope == measured
    assert "envelope recorded at caching: 3 cached rows" in report.format()


def test_the_envelope_records_why_it_was_skipped(make_cfg, tiny_model, corpus):
    out = run(make_cfg(exclude_special_tokens=True), tiny_model, corpus)
    assert "exclude_special_tokens" in manifest_of(out)["envelope"]["skipped"]


def test_the_rows_re_run_come_from_different_batches_in_another_batch_size():
    assert envelope.pick_rows(8, 4) == [0, 4, 7]  # 3 rows: not 4, the batch size
    assert envelope.pick_rows(16, 2) == [0, 5, 10, 15]
    assert envelope.pick_rows(1, 4) == [0]

"""`sae-cache-ext bench`: the report's arithmetic by hand, and one quick real run.

No timing is asserted: the targets are for the benchmark a person runs, not for CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sae_cache_ext import bench


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-cache-ext")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def _run(model: str, arm: str, wall: float, rss_mb: float = 10.0) -> dict:
    # 1000 tokens in `wall` seconds; 1 MB output and 2 MB of disk writes per run.
    return {
        "model": model,
        "arm": arm,
        "tokens": 1000,
        "tokens_per_second": 1000 / wall,
        "wall_seconds": wall,
        "cpu_seconds": wall,
        "peak_rss_above_model_mb": rss_mb,
        "output_mb": 0.0 if arm == bench.FORWARD else 1.0,
        "disk_write_mb": 2.0,
        "peak_disk_mb": 1.0,
    }


def test_report_takes_medians_and_divides_ours_by_each_upstream_arm():
    runs = [
        *(_run("tiny", bench.UPSTREAM, w) for w in (2.0, 4.0, 3.0)),  # median 3 s
        *(_run("tiny", bench.OURS, w, rss_mb=20.0) for w in (2.5, 2.0, 9.0)),  # 2.5 s
        *(_run("tiny", bench.PERSIST, w) for w in (5.0, 5.0, 1.0)),  # 5 s
        *(_run("tiny", bench.FORWARD, w) for w in (2.0, 2.4, 2.2)),  # 2.2 s
    ]
    report = bench.build_report(runs, list(bench.ARMS))

    ours = report["summary"]["tiny"][bench.OURS]
    assert ours["wall_seconds"] == 2.5
    assert ours["tokens_per_second"] == 400  # median of 400, 500, 111.1
    ratios = report["ratios"]["tiny"]
    # tokens/s: 400 / (1000/3) = 1.2; against persist: 400 / 200 = 2.0
    assert ratios["ours/upstream"]["tokens_per_second"] == pytest.approx(1.2)
    assert ratios["ours/upstream+persist"]["tokens_per_second"] == pytest.approx(2.0)
    assert ratios["ours/upstream"]["wall_seconds"] == pytest.approx(2.5 / 3)
    assert ratios["ours/upstream"]["peak_rss_above_model_mb"] == pytest.approx(2.0)
    # efficiency = forward-only time / the arm's time: 2.2 / 2.5 and 2.2 / 3
    assert report["efficiency"]["tiny"][bench.OURS] == pytest.approx(0.88)
    assert report["efficiency"]["tiny"][bench.UPSTREAM] == pytest.approx(2.2 / 3)

    # forward-only takes 2.2 s of upstream's 3 s and of upstream+persist's 5 s
    facts = bench.regime(report["summary"]["tiny"])
    assert facts["upstream_non_forward_share"] == pytest.approx(0.8 / 3)
    assert facts["ceiling_vs_upstream"] == pytest.approx(3 / 2.2)
    assert facts["ceiling_vs_upstream+persist"] == pytest.approx(5 / 2.2)
    assert "26.7% of upstream's wall time is neither its forward pass" in (
        bench.format_report(report)
    )

    verdicts = {t["label"]: t for t in report["targets"]}
    vs_upstream = verdicts["tiny: ours tokens/s vs upstream"]
    assert (vs_upstream["verdict"], vs_upstream["stretch_verdict"]) == ("MET", "MET")
    assert verdicts["tiny: ours tokens/s vs upstream+persist"]["verdict"] == "MET"
    assert verdicts["smollm2: our pipeline efficiency"]["verdict"] == "not measured"
    assert report["warnings"] == []


def test_four_hooks_target_is_a_ceiling_on_the_wall_time_ratio():
    runs = [
        *(_run("tiny", bench.HOOKS_ONE_PASS, w) for w in (3.0, 2.0, 9.0)),  # 3 s
        *(_run("tiny", bench.HOOKS_EACH, w) for w in (10.0, 8.0, 12.0)),  # 10 s
        *(
            _run("smollm2", bench.HOOKS_ONE_PASS, 5.0),
            _run("smollm2", bench.HOOKS_EACH, 10.0),
        ),
    ]
    report = bench.build_report(runs, list(bench.ALL_ARMS))
    ratio = report["ratios"]["tiny"]["ours-4-hooks/ours-each-hook"]
    assert ratio["wall_seconds"] == pytest.approx(0.3)
    verdicts = {t["label"]: t for t in report["targets"]}
    assert verdicts["tiny: 4 hooks in one pass / 4 runs, wall time"]["verdict"] == "MET"
    # 5 / 10 = 0.5 is above the 0.4 ceiling
    assert (
        verdicts["smollm2: 4 hooks in one pass / 4 runs, wall time"]["verdict"]
        == "NOT MET"
    )
    assert "<= 0.4" in bench.format_report(report)
    plan = bench.plan_from_args(_parse("--arms", "ours", "--hooks"))
    assert plan.arms == ["ours", *bench.HOOK_ARMS]


def test_report_warns_when_arms_cached_different_token_counts():
    short = {**_run("tiny", bench.OURS, 1.0), "tokens": 500}
    report = bench.build_report(
        [_run("tiny", bench.UPSTREAM, 1.0), short], list(bench.ARMS)
    )
    assert (
        len(report["warnings"]) == 1
        and "different numbers of tokens" in report["warnings"][0]
    )
    assert "WARNING: tiny: the runs cached different" in bench.format_report(report)


def test_setup_rounds_tokens_down_to_whole_batches_in_buffers():
    # 16_384 tokens / (8 x 128 per batch) = 16 batches = 4 buffers of 4 batches
    setup = bench.smollm2_setup(16_384)
    assert (setup.n_buffers, setup.batches_per_buffer, setup.tokens) == (4, 4, 16_384)
    # 20_000 tokens is 19.5 batches: 19 batches, 4 buffers of 4 -> 16 batches
    assert bench.smollm2_setup(20_000).tokens == 16_384
    with pytest.raises(ValueError, match="less than one batch"):
        bench.smollm2_setup(1000)
    with pytest.raises(ValueError, match="--arms"):
        bench.plan_from_args(_parse("--arms", "ours,theirs"))


def test_quick_bench_prints_the_table_and_writes_every_run(tmp_path: Path, capsys):
    json_path = tmp_path / "bench.json"
    args = _parse("--quick", "--json", str(json_path), "--workdir", str(tmp_path))
    assert bench.run_bench_command(args) == 0

    out = capsys.readouterr().out
    for title in ("tokens/s", "wall s", "peak RSS above model MB", "peak disk MB"):
        assert title in out
    for arm in bench.ARMS:
        assert any(line.startswith(arm + " ") for line in out.splitlines())

    report = json.loads(json_path.read_text())
    assert report["warnings"] == []
    runs = {r["arm"]: r for r in report["runs"]}
    assert sorted(runs) == sorted(bench.ARMS) and len(report["runs"]) == 4
    for arm, run in runs.items():
        assert run["model"] == "tiny"
        assert run["tokens"] == bench.QUICK_TINY_TOKENS
        assert run["wall_seconds"] > 0
        assert run["tokens_per_second"] == pytest.approx(
            run["tokens"] / run["wall_seconds"]
        )
        assert run["peak_rss_above_model"] >= 0
        if arm != bench.FORWARD:
            assert run["output_bytes"] > 0
            assert run["peak_disk"] >= run["output_bytes"]
    # Persisting the shuffle writes the dataset a second time.
    assert runs[bench.PERSIST]["output_bytes"] > runs[bench.UPSTREAM]["output_bytes"]

    # One repeat: every median is that run's number.
    ratio = (
        runs[bench.OURS]["tokens_per_second"]
        / runs[bench.UPSTREAM]["tokens_per_second"]
    )
    measured = report["ratios"]["tiny"]["ours/upstream"]["tokens_per_second"]
    assert measured == pytest.approx(ratio)
    assert f"{measured:.3f}" in out
    efficiency = runs[bench.FORWARD]["wall_seconds"] / runs[bench.OURS]["wall_seconds"]
    assert report["efficiency"]["tiny"][bench.OURS] == pytest.approx(efficiency)
    for target in report["targets"]:
        if target["model"] == "tiny" and target["compare"].startswith("ours/"):
            expected = "MET" if target["measured"] >= target["threshold"] else "NOT MET"
            assert target["verdict"] == expected
            assert f"{target['measured']:.3f}  {expected}" in out
        else:
            assert target["verdict"] == "not measured"

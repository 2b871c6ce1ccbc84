"""`sae-cache-ext bench --model wide` and `--scale`: the options and plan, each
arm against its limit, the scale curve's verdicts (by hand), one quick real run of
the wide arms and one of the scale curve, and the GPU check's CPU fallback.

No timing is asserted: the targets are for the benchmark a person runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_cache_ext import bench
from sae_cache_ext.bench import arms, wide

ROOT = Path(__file__).resolve().parent.parent


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-cache-ext")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def _run(model: str, arm: str, wall: float, rss_mb: float = 100.0, **extra) -> dict:
    # 1 GB of activations (1000 tokens here) in `wall` seconds; 250 MB buffers
    return {
        "model": model,
        "arm": arm,
        "tokens": 1000,
        "tokens_per_second": 1000 / wall,
        "wall_seconds": wall,
        "cpu_seconds": wall,
        "peak_rss_above_model": rss_mb * 1e6,
        "peak_rss_above_model_mb": rss_mb,
        "output_mb": 1.0,
        "disk_write_mb": 1.0,
        "peak_disk_mb": 2.0,
        "activation_bytes": 1e9,
        "buffer_bytes": 250e6,
        "gb_per_second": 1 / wall,
        "seconds_per_gb": wall,
        **extra,
    }


def test_wide_plan_is_four_buffers_of_sixteen_batches_and_the_seven_arms():
    plan = bench.plan_from_args(_parse("--model", "wide"))
    (setup,) = plan.setups
    # 1.074 GB / (32 x 128 tokens x 1024 x 4 bytes = 16.8 MB a batch) = 64 batches
    assert (setup.n_buffers, setup.batches_per_buffer, setup.tokens) == (4, 16, 262_144)
    assert setup.hook_name == "blocks.0.hook_resid_pre" and setup.family == "wide"
    assert setup.buffer_bytes == 16 * 4096 * 4096  # 268 MB
    assert plan.arms == list(arms.WIDE_ARMS) and plan.repeats == 3
    half = bench.plan_from_args(_parse("--model", "wide", "--dtype", "float16"))
    assert half.setups[0].bytes_per_token == 2048  # 1024 values x 2 bytes
    cuda = bench.plan_from_args(_parse("--model", "wide", "--device", "cuda"))
    assert cuda.setups[0].device == "cuda"
    with pytest.raises(ValueError, match="--device"):
        bench.plan_from_args(_parse("--model", "wide", "--device", "tpu"))
    with pytest.raises(ValueError, match="--gb"):
        bench.plan_from_args(_parse("--model", "wide", "--gb", "0.001"))


def test_scale_plan_keeps_the_buffer_and_multiplies_the_buffers():
    plan = bench.plan_from_args(_parse("--scale", "--scale-base-gb", "0.5"))
    # 0.5 GB = 29 batches of 16.8 MB: 4 buffers of 7 batches at 1x, then 16, 64
    assert [s.name for s in plan.setups] == ["wide@1x", "wide@4x", "wide@16x"]
    assert [s.n_buffers for s in plan.setups] == [4, 16, 64]
    assert {s.batches_per_buffer for s in plan.setups} == {7}
    assert {s.family for s in plan.setups} == {"wide"}
    assert plan.arms == [bench.OURS] and plan.repeats == 1 and plan.scale
    both = bench.plan_from_args(_parse("--scale", "--arms", "ours,ours-plain"))
    assert both.arms == ["ours", "ours-plain"]


def test_each_arm_is_measured_against_the_floor_plus_its_flushed_writes():
    runs = [
        *(_run("wide", arms.FORWARD, w) for w in (4.0, 5.0, 3.0)),  # median 4 s
        *(_run("wide", arms.DD, w) for w in (1.0, 1.5, 0.5)),  # median 1 s
        _run("wide", arms.OURS_PLAIN, 4.0),  # limit 4 + 1 = 5 s
        _run("wide", arms.UPSTREAM_PLAIN, 10.0),
        _run("wide", arms.OURS, 8.0, rss_mb=500.0),  # limit 4 + 2 x 1 = 6 s
        _run("wide", arms.UPSTREAM, 12.0),
    ]
    report = bench.build_report(runs, list(arms.WIDE_ARMS))
    limits = report["limits"]["wide"]
    assert limits[arms.OURS_PLAIN] == {
        "writes": 1,
        "limit_seconds": 5.0,
        "vs_limit": pytest.approx(5 / 4),
    }
    assert limits[arms.OURS]["vs_limit"] == pytest.approx(6 / 8)
    assert limits[arms.UPSTREAM]["limit_seconds"] == 6.0
    # 500 MB peak over 250 MB buffers
    assert report["rss_per_buffer"]["wide"][arms.OURS] == pytest.approx(2.0)

    verdicts = {t["label"]: t for t in report["targets"] if t["model"] == "wide"}
    shuffled = verdicts["wide: ours shuffled vs its limit (floor + 2 dd)"]
    assert (shuffled["measured"], shuffled["verdict"]) == (0.75, "NOT MET")
    # tokens/s: (1000 / 8) / (1000 / 12) = 1.5
    vs_upstream = verdicts["wide: ours shuffled tokens/s vs upstream shuffle=True"]
    assert vs_upstream["measured"] == pytest.approx(1.5)
    assert vs_upstream["verdict"] == "MET"
    plain = verdicts["wide: ours plain vs its limit (floor + 1 dd)"]
    assert (plain["verdict"], plain["stretch_verdict"]) == ("MET", "NOT MET")
    rss = verdicts["wide: ours shuffled peak RSS above model / buffer"]
    assert rss["verdict"] == "MET"

    text = bench.format_report(report)
    assert "floor + 2 dd" in text and "GB/s (activations)" in text
    # ours plain: 1 GB in 4 s = 0.250 GB/s, 1.250 of its limit
    assert any(
        line.split()[:2] == ["ours-plain", "0.250"] and line.endswith("1.250")
        for line in text.splitlines()
    )


def test_scale_verdicts_compare_the_largest_size_with_the_smallest():
    runs = [
        _run("wide@1x", arms.OURS, 10.0, rss_mb=400.0),
        _run("wide@4x", arms.OURS, 10.5, rss_mb=410.0),
        _run("wide@16x", arms.OURS, 12.0, rss_mb=480.0),
    ]
    report = bench.build_report(runs, [arms.OURS])
    curve = report["scale"][arms.OURS]
    assert [p["factor"] for p in curve["points"]] == [1, 4, 16]
    # 12 / 10 - 1 = 20% more seconds per GB; 480 / 400 - 1 = 20% more RSS
    assert curve["seconds_per_gb_spread"] == pytest.approx(0.2)
    assert curve["rss_spread"] == pytest.approx(0.2)
    verdicts = {t["metric"]: t for t in report["targets"] if t["model"] == "scale"}
    assert verdicts["seconds_per_gb_spread"]["verdict"] == "NOT MET"  # > 15%
    assert verdicts["rss_spread"]["verdict"] == "NOT MET"  # > 10%
    flat = wide.scale_curve([*runs[:2], {**runs[2], "seconds_per_gb": 11.0}])
    assert flat[arms.OURS]["seconds_per_gb_spread"] == pytest.approx(0.1)
    text = bench.format_report(report)
    assert "== scale curve" in text and "wide@16x" in text


@pytest.mark.slow
def test_quick_wide_bench_runs_every_arm_and_prints_limits(tmp_path: Path, capsys):
    json_path = tmp_path / "wide.json"
    args = _parse(
        "--model", "wide", "--quick", "--width", "64",
        "--json", str(json_path), "--workdir", str(tmp_path),
    )  # fmt: skip
    assert bench.run_bench_command(args) == 0
    report = json.loads(json_path.read_text())
    assert report["warnings"] == []
    runs = {r["arm"]: r for r in report["runs"]}
    assert sorted(runs) == sorted(arms.WIDE_ARMS)
    # 4 batches of 32 x 128 tokens, every arm the same tokens
    assert {r["tokens"] for r in runs.values()} == {4 * 4096}
    # dd writes the cache's bytes: 16,384 tokens x (64 x 4 + 4) bytes, in MiB
    assert runs[arms.DD]["dd_bytes"] == 5 * 2**20
    assert runs[arms.DD]["output_bytes"] == 5 * 2**20
    # a shuffled cache is written twice, a plain one once
    writes = {arm: runs[arm]["output_bytes"] for arm in (arms.OURS, arms.OURS_PLAIN)}
    assert runs[arms.OURS]["io_write_bytes"] > 1.5 * writes[arms.OURS]
    assert set(report["limits"]["wide"]) == set(wide.WRITES)
    out = capsys.readouterr().out
    for label in ("floor + 1 dd", "floor + 2 dd", "ours shuffled vs its limit"):
        assert label in out


@pytest.mark.slow
def test_tiny_scale_curve_prints_seconds_per_gb_rss_and_disk(tmp_path: Path, capsys):
    json_path = tmp_path / "scale.json"
    args = _parse(
        "--scale", "--quick", "--width", "32",
        "--json", str(json_path), "--workdir", str(tmp_path),
    )  # fmt: skip
    assert bench.run_bench_command(args) == 0
    report = json.loads(json_path.read_text())
    points = report["scale"][arms.OURS]["points"]
    assert [p["factor"] for p in points] == [1, 4, 16]
    # 4, 16 and 64 buffers of one batch (4096 tokens x 32 float32 = 0.52 MB)
    assert [round(p["gb"] * 1e9) for p in points] == [
        n * 4096 * 32 * 4 for n in (4, 16, 64)
    ]
    assert all(p["peak_disk_mb"] > 0 for p in points)
    out = capsys.readouterr().out
    assert "== scale curve" in out and "seconds per GB change 1x to 16x" in out


@pytest.mark.slow
def test_gpu_check_says_there_is_no_gpu_and_runs_on_cpu(tmp_path: Path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the fallback path is not taken")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        "GPU_CHECK_WORKDIR": str(tmp_path / "runs"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NO CUDA DEVICE here" in done.stdout
    assert "ours shuffled vs its limit" in done.stdout
    assert "pipeline overhead over the forward pass alone, smollm2 ours" in done.stdout
    assert (tmp_path / "out" / "wide.json").is_file()


def test_the_statistics_cost_is_ours_plain_against_ours_plain_without_them():
    timings = {"statistics_seconds": 0.5, "caching_seconds": 10.0}
    runs = [
        *(
            _run("wide", arms.OURS_PLAIN, w, ours_timings=timings)
            for w in (10.0, 10.2, 10.4)
        ),
        *(_run("wide", arms.OURS_PLAIN_BARE, w) for w in (9.8, 10.0, 10.1)),
    ]
    report = bench.build_report(runs, [arms.OURS_PLAIN, arms.OURS_PLAIN_BARE])
    (cost,) = [t for t in report["targets"] if "statistics" in t["label"]]
    # medians 10.2 / 10.0
    assert cost["measured"] == pytest.approx(1.02)
    assert cost["verdict"] == "MET"
    slower = [*runs[:3], *(_run("wide", arms.OURS_PLAIN_BARE, 9.0) for _ in range(3))]
    report = bench.build_report(slower, [arms.OURS_PLAIN, arms.OURS_PLAIN_BARE])
    (cost,) = [t for t in report["targets"] if "statistics" in t["label"]]
    assert cost["verdict"] == "NOT MET"
    text = bench.format_report(report)
    assert "statistics: 0.50 s per run on the writer thread" in text
    assert "(5.0% of caching time, median of 3 runs)" in text

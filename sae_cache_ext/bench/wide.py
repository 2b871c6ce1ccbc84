"""The accelerator regime's arithmetic: each arm of the wide model against its
limit, the scale curve's flatness, and their text tables.

An arm's limit is the floor (forward-only: the store's batches, nothing kept)
plus the flushed writes it cannot avoid, timed by `dd` of the same bytes on the
same filesystem: one write for a plain cache, two for a shuffled one (written
once scattered, once gathered). `vs limit` = limit / the arm's wall time: 1.0 is
the serial limit, above it the arm overlaps its writes with its forward pass.
"""

from __future__ import annotations

import statistics
from typing import Any

from sae_cache_ext.bench.arms import (
    DD,
    FORWARD,
    OURS,
    OURS_PLAIN,
    UPSTREAM,
    UPSTREAM_PLAIN,
)

WRITES = {UPSTREAM_PLAIN: 1, OURS_PLAIN: 1, UPSTREAM: 2, OURS: 2}
"""Flushed writes in each arm's limit (upstream's shuffle persists nothing, but a
shuffled cache that survives the process costs two)."""
SCALE_SECONDS_PER_GB_SPREAD = 0.15
SCALE_RSS_SPREAD = 0.10


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _medians(runs: list[dict[str, Any]], model: str, key: str) -> dict[str, float]:
    arms = dict.fromkeys(r["arm"] for r in runs if r["model"] == model)
    out = {}
    for arm in arms:
        value = _median(
            [
                r[key]
                for r in runs
                if r["model"] == model and r["arm"] == arm and r.get(key) is not None
            ]
        )
        if value is not None:
            out[arm] = value
    return out


def limits(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model with a floor and a dd arm: each arm's limit in seconds and its
    `vs_limit` (limit / median wall time)."""
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        wall = _medians(runs, model, "wall_seconds")
        if FORWARD not in wall or DD not in wall:
            continue
        out[model] = {
            arm: {
                "writes": writes,
                "limit_seconds": wall[FORWARD] + writes * wall[DD],
                "vs_limit": (wall[FORWARD] + writes * wall[DD]) / wall[arm],
            }
            for arm, writes in WRITES.items()
            if arm in wall and wall[arm] > 0
        }
    return out


def rss_per_buffer(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model and arm: median peak RSS above the model / the buffer's bytes."""
    out: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model and r.get("buffer_bytes")]
        if not mine:
            continue
        rss = _medians(mine, model, "peak_rss_above_model")
        out[model] = {arm: v / mine[0]["buffer_bytes"] for arm, v in rss.items()}
    return out


def scale_curve(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The scale runs (models named `<family>@<n>x`): per arm, one point per size
    (GB, seconds per GB, peak RSS above the model, peak disk), and the spreads:
    the largest point over the smallest one, minus 1."""
    points: dict[str, list[dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        if "@" not in model:
            continue
        factor = int(model.split("@")[1].rstrip("x"))
        for arm in dict.fromkeys(r["arm"] for r in runs if r["model"] == model):
            mine = [r for r in runs if r["model"] == model and r["arm"] == arm]
            points.setdefault(arm, []).append(
                {
                    "model": model,
                    "factor": factor,
                    "gb": mine[0]["activation_bytes"] / 1e9,
                    "runs": len(mine),
                    "seconds_per_gb": _median([r["seconds_per_gb"] for r in mine]),
                    "peak_rss_above_model_mb": _median(
                        [r["peak_rss_above_model_mb"] for r in mine]
                    ),
                    "peak_disk_mb": _median([r["peak_disk_mb"] for r in mine]),
                }
            )
    curve: dict[str, Any] = {}
    for arm, arm_points in points.items():
        arm_points.sort(key=lambda p: p["factor"])
        first, last = arm_points[0], arm_points[-1]
        curve[arm] = {
            "points": arm_points,
            "seconds_per_gb_spread": _spread(
                first["seconds_per_gb"], last["seconds_per_gb"]
            ),
            "rss_spread": _spread(
                first["peak_rss_above_model_mb"], last["peak_rss_above_model_mb"]
            ),
        }
    return curve


def _spread(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or not first:
        return None
    return abs(last / first - 1)


def scale_targets(curve: dict[str, Any]) -> list[dict[str, Any]]:
    """The scale curve's verdicts, in the shape of the report's targets."""
    targets = []
    for arm, facts in curve.items():
        if len(facts["points"]) < 2:
            continue
        span = f"{facts['points'][0]['factor']}x to {facts['points'][-1]['factor']}x"
        for key, what, ceiling in (
            ("seconds_per_gb_spread", "seconds per GB", SCALE_SECONDS_PER_GB_SPREAD),
            ("rss_spread", "peak RSS", SCALE_RSS_SPREAD),
        ):
            value = facts[key]
            targets.append(
                {
                    "model": "scale",
                    "label": f"scale, {arm}: {what} change {span}",
                    "compare": "scale",
                    "metric": key,
                    "threshold": ceiling,
                    "stretch": None,
                    "at_most": True,
                    "measured": value,
                    "verdict": "not measured"
                    if value is None
                    else ("MET" if value <= ceiling else "NOT MET"),
                    "stretch_verdict": None,
                }
            )
    return targets


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def limit_lines(model: str, report: dict[str, Any], table: Any) -> list[str]:
    """GB/s of every arm, and each arm against its limit."""
    runs = [r for r in report["runs"] if r["model"] == model]
    gbps = _medians(runs, model, "gb_per_second")
    if not gbps:
        return []
    arm_limits = report.get("limits", {}).get(model, {})
    rows = []
    for arm, value in gbps.items():
        facts = arm_limits.get(arm)
        rows.append(
            [
                arm,
                _cell(value, 3),
                "-" if facts is None else f"floor + {facts['writes']} dd",
                "-" if facts is None else _cell(facts["limit_seconds"]),
                "-" if facts is None else _cell(facts["vs_limit"], 3),
            ]
        )
    return [
        "",
        *table(["arm", "GB/s (activations)", "limit", "limit s", "vs limit"], rows),
    ]


def scale_lines(report: dict[str, Any], table: Any) -> list[str]:
    curve = report.get("scale", {})
    if not curve:
        return []
    rows = [
        [
            arm,
            point["model"],
            _cell(point["gb"]),
            _cell(point["seconds_per_gb"]),
            _cell(point["peak_rss_above_model_mb"], 1),
            _cell(point["peak_disk_mb"], 1),
        ]
        for arm, facts in curve.items()
        for point in facts["points"]
    ]
    header = ["arm", "size", "GB", "s per GB", "peak RSS above model MB"]
    return ["", "== scale curve", *table([*header, "peak disk MB"], rows)]

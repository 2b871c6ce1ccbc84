"""The report: medians per model and arm, ratios of ours to each upstream arm,
pipeline efficiencies, the regime line, the targets and their verdicts, and all of
it as text tables."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from sae_cache_ext.bench import wide
from sae_cache_ext.bench.arms import (
    FORWARD,
    HOOKS_EACH,
    HOOKS_ONE_PASS,
    OURS,
    OURS_PLAIN,
    OURS_PLAIN_BARE,
    PERSIST,
    UPSTREAM,
    UPSTREAM_PLAIN,
)
from sae_cache_ext.bench.setups import ModelSetup

# Medians reported per arm: (key in a run record, table header).
METRICS = (
    ("tokens_per_second", "tokens/s"),
    ("wall_seconds", "wall s"),
    ("cpu_seconds", "CPU s"),
    ("peak_rss_above_model_mb", "peak RSS above model MB"),
    ("output_mb", "output MB"),
    ("disk_write_mb", "disk writes MB"),
    ("peak_disk_mb", "peak disk MB"),
)
RATIO_BASES = (UPSTREAM, PERSIST)
PAIRS = (
    (OURS_PLAIN, UPSTREAM_PLAIN),
    (HOOKS_ONE_PASS, HOOKS_EACH),
    (OURS_PLAIN, OURS_PLAIN_BARE),
)
"""Further `"<arm>/<base arm>"` ratios reported when both arms ran."""


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Target:
    model: str
    label: str
    compare: str
    """`"<arm>/<base arm>"` (a ratio of medians), `"efficiency"` (of ours),
    `"limit"` (the arm against its limit) or `"rss/buffer"` (the arm's peak RSS
    above the model / the buffer's bytes)."""
    metric: str
    threshold: float
    stretch: float | None = None
    at_most: bool = False
    """The target is a ceiling (a time ratio), not a floor."""
    arm: str = OURS
    """The arm a `limit` or `rss/buffer` target is about."""

    def measured(self, report: dict[str, Any]) -> float | None:
        if self.compare == "efficiency":
            return report["efficiency"].get(self.model, {}).get(OURS)
        if self.compare == "limit":
            facts = report.get("limits", {}).get(self.model, {}).get(self.arm)
            return None if facts is None else facts["vs_limit"]
        if self.compare == "rss/buffer":
            return report.get("rss_per_buffer", {}).get(self.model, {}).get(self.arm)
        return (
            report["ratios"].get(self.model, {}).get(self.compare, {}).get(self.metric)
        )


TARGETS = (
    Target("tiny", "tiny: ours tokens/s vs upstream", f"{OURS}/{UPSTREAM}",
           "tokens_per_second", 1.05, stretch=1.15),
    Target("tiny", "tiny: ours tokens/s vs upstream+persist", f"{OURS}/{PERSIST}",
           "tokens_per_second", 1.3),
    Target("smollm2", "smollm2: our pipeline efficiency", "efficiency",
           "wall_seconds", 0.97),
    Target("tiny", "tiny: 4 hooks in one pass / 4 runs, wall time",
           f"{HOOKS_ONE_PASS}/{HOOKS_EACH}", "wall_seconds", 0.4, at_most=True),
    Target("smollm2", "smollm2: 4 hooks in one pass / 4 runs, wall time",
           f"{HOOKS_ONE_PASS}/{HOOKS_EACH}", "wall_seconds", 0.4, at_most=True),
    Target("wide", "wide: ours shuffled vs its limit (floor + 2 dd)", "limit",
           "wall_seconds", 0.85),
    Target("wide", "wide: ours shuffled tokens/s vs upstream shuffle=True",
           f"{OURS}/{UPSTREAM}", "tokens_per_second", 1.3),
    Target("wide", "wide: ours plain vs its limit (floor + 1 dd)", "limit",
           "wall_seconds", 1.0, stretch=1.3, arm=OURS_PLAIN),
    Target("wide", "wide: ours shuffled peak RSS above model / buffer",
           "rss/buffer", "peak_rss_above_model", 2.5, at_most=True),
    Target("wide", "wide: ours plain wall time with / without statistics",
           f"{OURS_PLAIN}/{OURS_PLAIN_BARE}", "wall_seconds", 1.03, at_most=True),
)  # fmt: skip


def _verdict(value: float | None, threshold: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= threshold if at_most else value >= threshold
    return "MET" if met else "NOT MET"


def build_report(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Medians per model and arm, ratios of ours to each upstream arm, pipeline
    efficiencies (forward-only wall time / the arm's) and the target verdicts."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        summary[model] = {}
        for arm in arms:
            mine = [r for r in runs if r["model"] == model and r["arm"] == arm]
            if mine:
                summary[model][arm] = {
                    "runs": len(mine),
                    **{key: _median([r[key] for r in mine]) for key, _ in METRICS},
                }
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    efficiency: dict[str, dict[str, float | None]] = {}
    for model, arms_of in summary.items():
        ratios[model] = {
            f"{OURS}/{base}": {
                key: _ratio(arms_of[OURS][key], arms_of[base][key])
                for key, _ in METRICS
            }
            for base in RATIO_BASES
            if OURS in arms_of and base in arms_of
        }
        for arm, base in PAIRS:
            if arm in arms_of and base in arms_of:
                ratios[model][f"{arm}/{base}"] = {
                    key: _ratio(arms_of[arm][key], arms_of[base][key])
                    for key, _ in METRICS
                }
        if FORWARD in arms_of:
            forward = arms_of[FORWARD]["wall_seconds"]
            efficiency[model] = {
                arm: _ratio(forward, arms_of[arm]["wall_seconds"])
                for arm in (UPSTREAM, OURS, PERSIST, UPSTREAM_PLAIN, OURS_PLAIN)
                if arm in arms_of
            }
    report: dict[str, Any] = {
        "warnings": _token_mismatches(runs),
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "efficiency": efficiency,
        "limits": wide.limits(runs),
        "rss_per_buffer": wide.rss_per_buffer(runs),
        "scale": wide.scale_curve(runs),
    }
    report["targets"] = [_evaluate(target, report) for target in TARGETS]
    report["targets"] += wide.scale_targets(report["scale"])
    return report


def _token_mismatches(runs: list[dict[str, Any]]) -> list[str]:
    """One message per model whose arms did not all cache the same tokens (then
    their times do not compare)."""
    messages = []
    for model in dict.fromkeys(r["model"] for r in runs):
        counts = {r["arm"]: r["tokens"] for r in runs if r["model"] == model}
        tokens_by_run = {r["tokens"] for r in runs if r["model"] == model}
        if len(tokens_by_run) > 1:
            messages.append(
                f"{model}: the runs cached different numbers of tokens "
                f"({counts}); their times do not compare."
            )
    return messages


def _evaluate(target: Target, report: dict[str, Any]) -> dict[str, Any]:
    value = target.measured(report)
    return {
        **asdict(target),
        "measured": value,
        "verdict": _verdict(value, target.threshold, target.at_most),
        "stretch_verdict": None
        if target.stretch is None
        else _verdict(value, target.stretch),
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def _model_section(model: str, report: dict[str, Any]) -> list[str]:
    summary, efficiency = report["summary"][model], report["efficiency"].get(model, {})
    setup = report.get("plan", {}).get("setups", {}).get(model)
    out = [
        f"== {model}"
        + (f": {ModelSetup(**_setup_fields(setup)).describe()}" if setup else "")
    ]
    header = ["arm", *(title for _, title in METRICS), "efficiency"]
    rows = [
        [
            arm,
            _cell(medians["tokens_per_second"], 0),
            _cell(medians["wall_seconds"], 2),
            _cell(medians["cpu_seconds"], 2),
            *(_cell(medians[key]) for key, _ in METRICS[3:]),
            _cell(efficiency.get(arm), 3),
        ]
        for arm, medians in summary.items()
    ]
    out += _table(header, rows)
    ratio_rows = [
        [name, *(_cell(values[key], 3) for key, _ in METRICS)]
        for name, values in report["ratios"].get(model, {}).items()
    ]
    if ratio_rows:
        out += [
            "",
            *_table(["ratio (of medians)", *(t for _, t in METRICS)], ratio_rows),
        ]
    out += wide.limit_lines(model, report, _table)
    out += _statistics_lines(model, report)
    out += _regime_lines(summary)
    out += ["", "per-run wall s / CPU s (in run order):"]
    for arm in summary:
        times = [
            f"{r['wall_seconds']:.2f}/{r['cpu_seconds']:.2f}"
            for r in report["runs"]
            if r["model"] == model and r["arm"] == arm
        ]
        out.append(f"  {arm:<18} " + "  ".join(times))
    return out


def _statistics_lines(model: str, report: dict[str, Any]) -> list[str]:
    """The statistics' own time in our runs (writer thread), against caching time."""
    shares = [
        (timings["statistics_seconds"], timings["caching_seconds"])
        for r in report["runs"]
        if r["model"] == model
        and r["arm"] != OURS_PLAIN_BARE
        and (timings := r.get("ours_timings"))
        and timings.get("statistics_seconds") is not None
        and timings.get("caching_seconds")
    ]
    if not shares:
        return []
    seconds = statistics.median(s for s, _ in shares)
    share = statistics.median(s / c for s, c in shares)
    return [
        "",
        f"statistics: {seconds:.2f} s per run on the writer thread, beside the "
        f"model ({100 * share:.1f}% of caching time, median of {len(shares)} runs); "
        f"their cost in wall time is {OURS_PLAIN}/{OURS_PLAIN_BARE} above.",
    ]


def regime(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """How much of upstream's time is not the forward pass, and so the most any
    runner that must run the same forward could gain: an arm's wall time over
    forward-only's is the ceiling of ours' tokens/s ratio against that arm."""
    if FORWARD not in summary:
        return {}
    forward = summary[FORWARD]["wall_seconds"]
    out: dict[str, float | None] = {}
    if UPSTREAM in summary:
        upstream = summary[UPSTREAM]["wall_seconds"]
        out["upstream_non_forward_share"] = (
            None if not upstream else 1 - forward / upstream
        )
    for arm in (UPSTREAM, PERSIST):
        if arm in summary:
            out[f"ceiling_vs_{arm}"] = _ratio(summary[arm]["wall_seconds"], forward)
    return out


def _regime_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    facts = regime(summary)
    if "upstream_non_forward_share" not in facts:
        return []
    share = facts["upstream_non_forward_share"]
    ceilings = ", ".join(
        f"vs {arm} {_cell(facts.get(f'ceiling_vs_{arm}'), 3)}"
        for arm in (UPSTREAM, PERSIST)
        if f"ceiling_vs_{arm}" in facts
    )
    return [
        "",
        f"regime: {_cell(None if share is None else 100 * share)}% of upstream's wall "
        "time is neither its forward pass nor its reading of rows; hiding all of it "
        "would give (arm time / forward-only time): "
        f"{ceilings}. Ours also reads rows faster (a batch at a time), so it can pass "
        "these.",
    ]


def _setup_fields(setup: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setup.items() if k != "tokens"}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one table of medians per model, the ratios, the targets."""
    lines: list[str] = []
    plan, env = report.get("plan", {}), report.get("environment", {})
    if plan:
        lines.append(
            f"sae-cache-ext bench: {plan['repeats']} repeat(s), {plan['threads']} "
            f"torch thread(s); medians over repeats. Load average before/after: "
            f"{_cell(env.get('loadavg_before', [None])[0], 2)} / "
            f"{_cell(env.get('loadavg_after', [None])[0], 2)} "
            f"on {env.get('cpu_count')} CPUs."
        )
    if git := env.get("git"):
        dirty = f", {len(git['modified'])} modified file(s)" if git["modified"] else ""
        lines.append(f"Code: commit {git['commit'][:10]}{dirty}.")
    for model in report["summary"]:
        lines += ["", *_model_section(model, report)]
    lines += wide.scale_lines(report, _table)
    lines += [f"WARNING: {message}" for message in report.get("warnings", [])]
    lines += ["", "targets:"]
    width = max(len(t["label"]) for t in report["targets"])
    for t in report["targets"]:
        goal = f"{'<=' if t.get('at_most') else '>='} {t['threshold']:g}" + (
            f" (stretch {t['stretch']:g})" if t["stretch"] else ""
        )
        verdict = t["verdict"]
        if t["stretch_verdict"] is not None and t["measured"] is not None:
            verdict += f", stretch {t['stretch_verdict']}"
        lines.append(
            f"  {t['label']:<{width}}  {goal:<24} {_cell(t['measured'], 3):>7}  {verdict}"
        )
    return "\n".join(lines)

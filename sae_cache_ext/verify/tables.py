"""The manifest's accounting as readable tables, for `sae-cache-ext info`.

`format_accounting(facts)` turns the manifest's `accounting`, `dataset_exhaustion`
and `excluded_tokens` into aligned lines: counts with thousands separators, tokens
dropped by reason, and each excluded token id with its string and count. The
length buckets are `accounting.format_coverage`'s table (in numeric order).
"""

from __future__ import annotations

from typing import Any

# the manifest keys these tables show (`format_description` leaves them out)
SHOWN = ("accounting", "dataset_exhaustion", "excluded_tokens", "excluded_token_ids")

_COUNTS = (
    ("documents_read", "documents read"),
    ("documents_kept", "documents kept"),
    ("documents_dropped_short", "documents dropped (too short)"),
    ("documents_in_use_at_end", "documents in use at the end"),
    ("source_tokens_read", "source tokens read"),
    ("rows_from_store", "rows taken from the store"),
    ("dataset_passes", "passes over the dataset"),
)


def _table(rows: list[tuple[str, ...]], indent: str, right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def format_accounting(facts: dict[str, Any]) -> list[str]:
    """The accounting lines of a manifest's facts (empty without accounting)."""
    lines: list[str] = []
    exhaustion = facts.get("dataset_exhaustion")
    if isinstance(exhaustion, dict):
        ran_out = bool(exhaustion.get("exhausted"))
        repeats = exhaustion.get("repeats") or 0
        text = (
            "YES: the cache is shorter than training_tokens"
            if ran_out
            else "no"
            + (f" (read {repeats + 1} times: documents repeat)" if repeats else "")
        )
        lines.append(f"  dataset ran out  {text}")
    accounting = facts.get("accounting")
    if isinstance(accounting, dict):
        rows = [
            (label, f"{accounting[key]:,}")
            for key, label in _COUNTS
            if key in accounting
        ]
        dropped = accounting.get("tokens_dropped") or {}
        rows += [
            (f"tokens dropped: {reason.replace('_', ' ')}", f"{count:,}")
            for reason, count in sorted(dropped.items())
        ]
        if rows:
            lines += ["  accounting", *_table(rows, "    ", right={1})]
    excluded = facts.get("excluded_tokens")
    ids = facts.get("excluded_token_ids") or []
    if ids or excluded:
        counts = (accounting or {}).get("excluded_special_tokens_by_id", {})
        strings = excluded or {}
        rows = [("id", "token", "removed")]
        rows += [
            (str(i), strings.get(str(i), "?"), f"{counts.get(str(i), 0):,}")
            for i in (ids or [int(k) for k in strings])
        ]
        lines += ["  excluded token ids", *_table(rows, "    ", right={0, 2})]
    return lines

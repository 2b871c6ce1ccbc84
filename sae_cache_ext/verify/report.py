"""What `verify_cache` found (`VerifyReport`), the names of its checks, and the
schema a cache should have (`Expected`): the types the integrity and re-run checks
fill in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHECK_MANIFEST = "manifest"
CHECK_FILES = "data files"
CHECK_ROWS = "row counts"
CHECK_CHECKSUMS = "checksums"
CHECK_LOAD = "load_from_disk"
CHECK_SCHEMA = "schema"
CHECK_RERUN = "re-run"


@dataclass
class VerifyReport:
    """What `verify_cache` found. `ok` is False when there is any problem."""

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    """Names of the checks that ran (the `CHECK_*` constants), in order."""
    skipped: list[str] = field(default_factory=list)
    """Checks that did not run, each with the reason (not failures)."""
    rerun_rows: list[int] = field(default_factory=list)
    rerun_tokens: int | None = None
    """With `store_token_positions`: the tokens re-run from their rebuilt contexts,"""
    rerun_sequences: int | None = None
    """and the dataset's sequences replayed to rebuild them."""
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    activation_scale: float | None = None
    atol: float | None = None
    rtol: float | None = None
    envelope: dict[str, Any] | None = None
    """The numeric envelope the manifest recorded at caching (with a model)."""

    def format(self) -> str:
        n = len(self.problems)
        verdict = "OK" if self.ok else f"FAILED ({n} problem{'s' * (n != 1)})"
        lines = [
            f"Verified {self.path}: {verdict}",
            f"  checks: {', '.join(self.checks)}",
        ]
        if self.max_abs_error is not None:
            lines.append(
                f"  re-run of {len(self.rerun_rows)} rows {self.rerun_rows}"
                f"{self._from_positions()}: "
                f"max abs error {self.max_abs_error:.3g}, max rel error "
                f"{self.max_rel_error:.3g} (activation scale "
                f"{self.activation_scale:.3g}; tolerance atol {self.atol:g} x scale, "
                f"rtol {self.rtol:g})"
            )
        envelope = envelope_text(self.envelope)
        if envelope is not None:
            lines.append(f"  envelope recorded at caching: {envelope}")
        lines += [f"  skipped: {reason}" for reason in self.skipped]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return "\n".join(lines)

    def _from_positions(self) -> str:
        if self.rerun_tokens is None:
            return ""
        return (
            f" ({self.rerun_tokens} tokens, each from its token_positions in "
            f"{self.rerun_sequences} replayed sequences)"
        )


def envelope_text(envelope: dict[str, Any] | None) -> str | None:
    """The envelope in words (None when the manifest has none)."""
    if not envelope:
        return None
    if "skipped" in envelope:
        return f"not measured: {envelope['skipped']}"
    return (
        f"{envelope['rows']} cached rows re-run in one batch of "
        f"{envelope['batch_size']} (cached in batches of "
        f"{envelope['original_batch_size']}): max abs error "
        f"{envelope['max_abs_error']:.3g}, max rel error "
        f"{envelope['max_rel_error']:.3g}, min cosine {envelope['min_cosine']:.9f}"
    )


@dataclass
class Expected:
    """What the schema should be: from the manifest's config, else from the files."""

    hook_name: str | None
    context_size: int | None
    d_in: int | None
    dtype: str | None

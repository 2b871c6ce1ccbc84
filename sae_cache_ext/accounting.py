"""Counting what does not reach the cache, and why.

Data lost in a pipeline is rarely lost at random: skipping short documents or
truncating long ones changes which activations an SAE sees. The `Ledger` watches the
documents going into sae-lens's store and the rows coming out, and `coverage_table`
compares the kept document-length distribution with the source's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Why tokens did not reach the cache.
SHORT_DOCUMENT = "short_document"  # disable_concat_sequences skipped the document
TRUNCATED_DOCUMENT = "truncated_document"  # only the first row of it was kept
EXCLUDED_SPECIAL = "excluded_special_token"  # exclude_special_tokens
OUTSIDE_SEQPOS_SLICE = "outside_seqpos_slice"  # positions seqpos_slice cuts off
LEFTOVER_AT_END = "leftover_at_end"  # computed, but less than one row remained
UNUSED_AT_EXHAUSTION = "unused_at_exhaustion"  # the dataset ran out mid-batch

COVERAGE_WARNING_POINTS = 10.0


def length_bucket(n_tokens: int) -> str:
    """Power-of-two buckets: '1', '2', '3-4', '5-8', '9-16', ..."""
    if n_tokens <= 2:
        return str(max(n_tokens, 0))
    upper = 1 << math.ceil(math.log2(n_tokens))
    return f"{upper // 2 + 1}-{upper}"


def _bucket_key(bucket: str) -> int:
    return int(bucket.split("-")[0])


@dataclass
class Ledger:
    """Per-document and per-reason token counts for one caching run."""

    context_size: int
    disable_concat_sequences: bool = False
    bos_token_id: int | None = None
    documents_read: int = 0
    source_tokens: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    excluded_by_id: Counter[int] = field(default_factory=Counter)
    source_lengths: Counter[str] = field(default_factory=Counter)
    source_bucket_tokens: Counter[str] = field(default_factory=Counter)
    kept_lengths: Counter[str] = field(default_factory=Counter)
    kept_bucket_tokens: Counter[str] = field(default_factory=Counter)
    documents_dropped: int = 0
    sequences: int = 0
    passes: int = 0
    _last_length: int | None = None
    _last_kept: int = 0

    def watch_documents(
        self, documents: Iterator[torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """Wrap the store's per-document token iterator."""
        for tokens in documents:
            self._settle_last_document()
            length = int(tokens.shape[0])
            self.documents_read += 1
            self.source_tokens += length
            self._last_length = length
            self._last_kept = 0
            yield tokens

    def watch_sequences(
        self, sequences: Iterator[torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """Wrap the store's row iterator (rows of `context_size` tokens). Each call
        is one pass over the dataset."""
        self.passes += 1
        for sequence in sequences:
            self.sequences += 1
            if self.disable_concat_sequences and self._last_length is not None:
                # one row per kept document: its first tokens, maybe after a BOS
                self._last_kept = min(self._last_length, self.context_size)
                if (
                    self.bos_token_id is not None
                    and int(sequence[0]) == self.bos_token_id
                ):
                    self._last_kept = min(self._last_length, self.context_size - 1)
            yield sequence

    def _settle_last_document(self) -> None:
        """Book the previous document once the store has moved past it."""
        if self._last_length is None:
            return
        length = self._last_length
        kept = self._last_kept if self.disable_concat_sequences else length
        bucket = length_bucket(length)
        self.source_lengths[bucket] += 1
        self.source_bucket_tokens[bucket] += length
        if kept == 0:
            self.documents_dropped += 1
            self.dropped[SHORT_DOCUMENT] += length
        else:
            self.kept_lengths[bucket] += 1
            self.kept_bucket_tokens[bucket] += kept
            if kept < length:
                self.dropped[TRUNCATED_DOCUMENT] += length - kept
        self._last_length = None

    def exclude(self, toks_N: torch.Tensor, exclude_ids: torch.Tensor | None) -> None:
        """Count the special tokens about to be removed, by id."""
        if exclude_ids is None:
            return
        removed = toks_N[torch.isin(toks_N, exclude_ids)]
        if removed.numel():
            ids, counts = torch.unique(removed, return_counts=True)
            for token_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
                self.excluded_by_id[int(token_id)] += int(count)
            self.dropped[EXCLUDED_SPECIAL] += int(removed.numel())

    def batch_counts(self) -> dict[str, Any]:
        """The counts kept per batch (not per document), for a checkpoint."""
        return {
            "dropped": {
                reason: self.dropped[reason]
                for reason in (EXCLUDED_SPECIAL, OUTSIDE_SEQPOS_SLICE)
                if reason in self.dropped
            },
            "excluded_by_id": {str(k): v for k, v in self.excluded_by_id.items()},
        }

    def restore_batch_counts(self, counts: dict[str, Any]) -> None:
        """Restore `batch_counts()`; document counts come back by re-reading."""
        for reason in (EXCLUDED_SPECIAL, OUTSIDE_SEQPOS_SLICE):
            self.dropped.pop(reason, None)
        self.dropped.update(counts["dropped"])
        self.excluded_by_id = Counter(
            {int(k): v for k, v in counts["excluded_by_id"].items()}
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts for the manifest. The histograms cover the settled
        documents; the last one read may still have been in use by the store."""
        return {
            "documents_read": self.documents_read,
            "documents_in_use_at_end": int(self._last_length is not None),
            "documents_kept": sum(self.kept_lengths.values()),
            "documents_dropped_short": self.documents_dropped,
            "source_tokens_read": self.source_tokens,
            "rows_from_store": self.sequences,
            "dataset_passes": self.passes,
            "tokens_dropped": dict(sorted(self.dropped.items())),
            "excluded_special_tokens_by_id": {
                str(k): v for k, v in sorted(self.excluded_by_id.items())
            },
            "source_length_histogram": _sorted(self.source_lengths),
            "kept_length_histogram": _sorted(self.kept_lengths),
            "source_tokens_by_length": _sorted(self.source_bucket_tokens),
            "kept_tokens_by_length": _sorted(self.kept_bucket_tokens),
        }


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' `Ledger.summary()`s (the ranks of a data-parallel run) as one:
    counts add up, `dataset_passes` is the most any run made."""
    merged: dict[str, Any] = {}
    for summary in summaries:
        for key, value in summary.items():
            if isinstance(value, dict):
                counts = merged.setdefault(key, {})
                for k, v in value.items():
                    counts[k] = counts.get(k, 0) + v
            elif key == "dataset_passes":
                merged[key] = max(merged.get(key, 0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    for key, value in merged.items():
        if key.endswith(("_histogram", "_by_length")):
            merged[key] = {k: value[k] for k in sorted(value, key=_bucket_key)}
        elif isinstance(value, dict):
            merged[key] = dict(sorted(value.items()))
    return merged


def _sorted(counter: Counter[str]) -> dict[str, int]:
    return {k: counter[k] for k in sorted(counter, key=_bucket_key)}


@dataclass
class CoverageRow:
    bucket: str
    source_documents: int
    kept_documents: int
    source_tokens: int
    kept_tokens: int

    @property
    def kept_token_fraction(self) -> float:
        return self.kept_tokens / self.source_tokens if self.source_tokens else 0.0


def coverage_table(accounting: dict[str, Any]) -> list[CoverageRow]:
    """Per length bucket: documents and tokens in the source versus kept."""
    source = accounting.get("source_length_histogram", {})
    return [
        CoverageRow(
            bucket=bucket,
            source_documents=count,
            kept_documents=accounting.get("kept_length_histogram", {}).get(bucket, 0),
            source_tokens=accounting.get("source_tokens_by_length", {}).get(bucket, 0),
            kept_tokens=accounting.get("kept_tokens_by_length", {}).get(bucket, 0),
        )
        for bucket, count in sorted(source.items(), key=lambda kv: _bucket_key(kv[0]))
    ]


def coverage_spread(rows: list[CoverageRow]) -> float:
    """Largest minus smallest kept-token percentage across buckets."""
    fractions = [r.kept_token_fraction for r in rows if r.source_tokens]
    return 100.0 * (max(fractions) - min(fractions)) if fractions else 0.0


def format_coverage(rows: list[CoverageRow]) -> str:
    lines = [
        f"{'doc length':>10} {'source docs':>11} {'kept docs':>9} {'kept tokens':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r.bucket:>10} {r.source_documents:>11} {r.kept_documents:>9} "
            f"{100 * r.kept_token_fraction:>10.1f}%"
        )
    spread = coverage_spread(rows)
    if spread > COVERAGE_WARNING_POINTS:
        lines.append(
            f"WARNING: the kept fraction differs by {spread:.1f} points across length "
            "buckets: the cache over-represents some document lengths."
        )
    return "\n".join(lines)


def plot_coverage(rows: list[CoverageRow], path: str) -> None:
    """Draw source vs kept documents per length bucket, and the kept fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [r.bucket for r in rows]
    x = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.bar(
        [i - 0.2 for i in x], [r.source_documents for r in rows], 0.4, label="source"
    )
    top.bar([i + 0.2 for i in x], [r.kept_documents for r in rows], 0.4, label="kept")
    top.set_ylabel("documents")
    top.legend()
    bottom.plot(list(x), [100 * r.kept_token_fraction for r in rows], marker="o")
    bottom.set_ylabel("tokens kept (%)")
    bottom.set_ylim(0, 105)
    bottom.set_xticks(list(x), buckets, rotation=45)
    bottom.set_xlabel("document length (tokens)")
    fig.suptitle("Coverage: source vs kept document lengths")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

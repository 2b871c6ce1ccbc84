"""What the cached activations are: per-hook statistics, streamed and mergeable, and
the guard against non-finite values.

`CacheStatistics` holds one `HookStatistics` per hook. Each buffer is added as the
values the dataset stores (after the cast to the storage dtype), in float64: the
count, the mean and the sum of squared deviations of every dimension (merged
exactly across buffers with Chan et al.'s parallel formula), the sum of the tokens'
L2 norms, the largest magnitude and the number of non-finite values. Norm
quantiles come from a histogram of log2 norms with 64 bins per octave (2^-64 to
2^64): counts add up exactly, so buffers, resumed runs and ranks merge in any order,
and a quantile read from it is within one bin (1.1% of the norm) of the exact one.

A buffer takes one pass (`HookStatistics.of_buffer`): chunks of `CHUNK_TOKENS`
tokens, small enough that their float64 copy stays in the processor's cache, add
to float64 sums of values and squares per dimension and per token. The buffer's
squared deviations are then sum(x^2) - n mean^2, whose rounding error relative to
the variance is about 1e-15 x (1 + mean^2 / var): 1e-9 for a dimension whose mean
is 1,000 standard deviations from zero (measured), far less for real activations. A buffer whose sums are not finite holds
NaN or inf: it is added again the careful way (`of_chunk`), which counts them and
leaves the tokens holding them out of the moments and norms.

`check_finite` says what is wrong with such a buffer (and raises by default): the
largest magnitude of each hook, cast to the storage dtype, says whether any value
is (or becomes) NaN or inf. Shapes: N tokens, D values per token (every hook's side
by side), C tokens of a chunk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

BINS_PER_OCTAVE = 64
OCTAVES = 64  # log2 norms from -64 to 64; smaller and larger ones go to the ends
N_NORM_BINS = 2 * OCTAVES * BINS_PER_OCTAVE
QUANTILES = (0.01, 0.5, 0.99)
CHUNK_TOKENS = 128  # float64 copies of this many tokens at a time (in cache)
CAREFUL_CHUNK_TOKENS = 2048  # the same for a buffer holding NaN or inf
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504

OnNonFinite = Literal["error", "warn"]


def storage_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of the stored values (`"float16"` -> `torch.float16`)."""
    return getattr(torch, dtype)


@dataclass
class HookStatistics:
    """Running statistics of one hook's activations (float64 moments)."""

    count: int  # tokens seen
    mean_D: np.ndarray  # over the tokens with every value finite
    m2_D: np.ndarray  # their summed squared deviations from `mean_D`
    finite_tokens: int = 0  # the tokens the moments and norms are over
    norm_sum: float = 0.0
    norm_hist: np.ndarray = field(
        default_factory=lambda: np.zeros(N_NORM_BINS, dtype=np.int64)
    )
    max_abs: float = 0.0  # over the finite values
    non_finite: int = 0  # values that are NaN or inf

    @classmethod
    def empty(cls, d: int) -> HookStatistics:
        return cls(count=0, mean_D=np.zeros(d), m2_D=np.zeros(d))

    def merge(self, other: HookStatistics) -> HookStatistics:
        """Both together (Chan et al.'s pairwise update; exact up to rounding)."""
        n_a, n_b = self.finite_tokens, other.finite_tokens
        n = n_a + n_b
        if n_b == 0:
            mean_D, m2_D = self.mean_D, self.m2_D
        elif n_a == 0:
            mean_D, m2_D = other.mean_D, other.m2_D
        else:
            delta_D = other.mean_D - self.mean_D
            mean_D = self.mean_D + delta_D * (n_b / n)
            m2_D = self.m2_D + other.m2_D + delta_D**2 * (n_a * n_b / n)
        return HookStatistics(
            count=self.count + other.count,
            mean_D=mean_D,
            m2_D=m2_D,
            finite_tokens=n,
            norm_sum=self.norm_sum + other.norm_sum,
            norm_hist=self.norm_hist + other.norm_hist,
            max_abs=max(self.max_abs, other.max_abs),
            non_finite=self.non_finite + other.non_finite,
        )

    # -- from values ------------------------------------------------------------------

    @classmethod
    def of_chunk(
        cls, x_CD: torch.Tensor, scratch_CD: torch.Tensor | None = None
    ) -> HookStatistics:
        """The statistics of one chunk of stored values (any float dtype).

        `scratch_CD`, float64 with at least as many rows, takes the float64 copy
        (centred in place below): reusing it spares a fresh allocation per chunk,
        whose page faults cost more than the arithmetic on many machines."""
        if scratch_CD is None:
            x_CD = x_CD.to(torch.float64, copy=True)
        else:
            x_CD = scratch_CD[: x_CD.shape[0]].copy_(x_CD)
        n_tokens = x_CD.shape[0]
        total_D = x_CD.sum(0)
        stats = cls.empty(x_CD.shape[1])
        stats.count = n_tokens
        if bool(torch.isfinite(total_D).all()):
            stats.max_abs = float(torch.maximum(x_CD.amax(), -x_CD.amin()))
        else:  # NaN or inf somewhere: leave out the tokens holding them
            finite_CD = torch.isfinite(x_CD)
            stats.non_finite = int((~finite_CD).sum())
            finite = x_CD[finite_CD]
            stats.max_abs = float(finite.abs().max()) if finite.numel() else 0.0
            x_CD = x_CD[finite_CD.all(1)]
        if x_CD.shape[0] == 0:
            return stats
        norms_C = torch.linalg.vector_norm(x_CD, dim=1)
        mean_D = x_CD.mean(0)
        x_CD -= mean_D
        stats.finite_tokens = x_CD.shape[0]
        stats.mean_D = mean_D.numpy()
        stats.m2_D = x_CD.square_().sum(0).numpy()
        stats.norm_sum = float(norms_C.sum())
        stats.norm_hist = norm_histogram(norms_C)
        return stats

    @classmethod
    def of_buffer(cls, x_ND: torch.Tensor, target: torch.dtype) -> HookStatistics:
        """The statistics of one buffer of one hook's values, as stored in the
        `target` dtype, in one cache-sized pass (see the module's docstring)."""
        n, d = x_ND.shape
        if n == 0:
            return cls.empty(d)
        chunk = min(CHUNK_TOKENS, n)
        scratch_CD = torch.empty((chunk, d), dtype=torch.float64)
        square_CD = torch.empty((chunk, d), dtype=torch.float64)
        ones_C = torch.ones(chunk, dtype=torch.float64)
        sum_D = torch.zeros(d, dtype=torch.float64)
        squares_D = torch.zeros(d, dtype=torch.float64)
        squares_N = torch.empty(n, dtype=torch.float64)
        peak = 0.0  # the largest square
        for start in range(0, n, chunk):
            stored_CD = x_ND[start : start + chunk].to(target)
            rows = stored_CD.shape[0]
            x_CD = scratch_CD[:rows].copy_(stored_CD)
            sum_D.addmv_(x_CD.T, ones_C[:rows])  # column sums: a BLAS gemv
            sq_CD = torch.mul(x_CD, x_CD, out=square_CD[:rows])
            squares_D.addmv_(sq_CD.T, ones_C[:rows])
            torch.sum(sq_CD, 1, out=squares_N[start : start + rows])
            peak = max(peak, float(sq_CD.max()))
        if not (math.isfinite(peak) and bool(torch.isfinite(sum_D).all())):
            return cls.of_values(x_ND, target)  # NaN or inf: count and leave out
        mean_D = sum_D / n
        m2_D = torch.clamp_min(squares_D - mean_D.square() * n, 0.0)
        norms_N = squares_N.sqrt_()
        return cls(
            count=n,
            mean_D=mean_D.numpy(),
            m2_D=m2_D.numpy(),
            finite_tokens=n,
            norm_sum=float(norms_N.sum()),
            norm_hist=norm_histogram(norms_N),
            # exact: float64 holds the square of a float32 (or narrower) exactly
            max_abs=math.sqrt(peak),
        )

    @classmethod
    def of_values(cls, x_ND: torch.Tensor, target: torch.dtype) -> HookStatistics:
        """The careful way, for values holding NaN or inf: chunk by chunk
        (`of_chunk`), merged."""
        stats = cls.empty(x_ND.shape[1])
        scratch_CD = torch.empty(
            (min(CAREFUL_CHUNK_TOKENS, x_ND.shape[0]), x_ND.shape[1]),
            dtype=torch.float64,
        )
        for chunk_CD in x_ND.split(CAREFUL_CHUNK_TOKENS):
            stats = stats.merge(cls.of_chunk(chunk_CD.to(target), scratch_CD))
        return stats

    # -- reading ------------------------------------------------------------------

    @property
    def var_D(self) -> np.ndarray:
        """Population variance of every dimension."""
        return self.m2_D / max(self.finite_tokens, 1)

    def norm_quantile(self, q: float) -> float | None:
        """The `q` quantile of the tokens' L2 norms, read from the histogram:
        interpolated log-linearly inside the bin it falls in."""
        total = int(self.norm_hist.sum())
        if total == 0:
            return None
        rank = q * total
        cumulative = np.cumsum(self.norm_hist)
        k = int(np.searchsorted(cumulative, rank, side="left"))
        k = min(k, N_NORM_BINS - 1)
        below = int(cumulative[k - 1]) if k else 0
        fraction = (rank - below) / max(int(self.norm_hist[k]), 1)
        log2 = (k + min(max(fraction, 0.0), 1.0)) / BINS_PER_OCTAVE - OCTAVES
        return float(2.0**log2)

    def summary(self) -> dict[str, Any]:
        """What the manifest records under `statistics[<hook>]`."""
        n = self.finite_tokens
        return {
            "count": self.count,
            "mean": self.mean_D.tolist(),
            "var": self.var_D.tolist(),
            "norm_mean": self.norm_sum / n if n else None,
            "norm_quantiles": {str(q): self.norm_quantile(q) for q in QUANTILES},
            "max_abs": self.max_abs,
            "non_finite": self.non_finite,
            "finite_tokens": n,
        }

    # -- saving -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        bins = np.flatnonzero(self.norm_hist)
        return {
            "count": self.count,
            "finite_tokens": self.finite_tokens,
            "mean": self.mean_D.tolist(),
            "m2": self.m2_D.tolist(),
            "norm_sum": self.norm_sum,
            "norm_hist": {str(k): int(self.norm_hist[k]) for k in bins},
            "max_abs": self.max_abs,
            "non_finite": self.non_finite,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> HookStatistics:
        hist = np.zeros(N_NORM_BINS, dtype=np.int64)
        for k, n in value["norm_hist"].items():
            hist[int(k)] = n
        return cls(
            count=value["count"],
            mean_D=np.asarray(value["mean"], dtype=np.float64),
            m2_D=np.asarray(value["m2"], dtype=np.float64),
            finite_tokens=value["finite_tokens"],
            norm_sum=value["norm_sum"],
            norm_hist=hist,
            max_abs=value["max_abs"],
            non_finite=value["non_finite"],
        )


def norm_histogram(norms_C: torch.Tensor) -> np.ndarray:
    """Counts of `norms_C` in the log2 bins (zero norms go to the first bin)."""
    scaled_C = torch.log2(norms_C) * BINS_PER_OCTAVE + OCTAVES * BINS_PER_OCTAVE
    bins_C = torch.nan_to_num(scaled_C, neginf=0.0).floor().clamp(0, N_NORM_BINS - 1)
    return torch.bincount(bins_C.long(), minlength=N_NORM_BINS).numpy()


@dataclass
class CacheStatistics:
    """Every hook's statistics, in the hooks' order; a typed, mergeable state."""

    hooks: dict[str, HookStatistics]
    seconds: float = 0.0  # spent computing them

    @classmethod
    def empty(cls, hooks: tuple[tuple[str, int], ...]) -> CacheStatistics:
        return cls({name: HookStatistics.empty(width) for name, width in hooks})

    def add(self, acts_ND: torch.Tensor, dtype: str) -> list[str]:
        """Add a buffer's activations (every hook side by side, `(..., D)`), as
        stored: cast to `dtype` first. Returns the hooks whose values in this
        buffer hold NaN or inf."""
        acts_ND = acts_ND.reshape(-1, acts_ND.shape[-1])
        target = storage_dtype(dtype)
        start, broken = 0, []
        for name, stats in self.hooks.items():
            width = stats.mean_D.shape[0]
            part = HookStatistics.of_buffer(acts_ND[:, start : start + width], target)
            if part.non_finite:
                broken.append(name)
            self.hooks[name] = stats.merge(part)
            start += width
        return broken

    def merge(self, other: CacheStatistics) -> CacheStatistics:
        return CacheStatistics(
            {name: s.merge(other.hooks[name]) for name, s in self.hooks.items()},
            self.seconds + other.seconds,
        )

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: s.summary() for name, s in self.hooks.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "hooks": {name: s.to_json() for name, s in self.hooks.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> CacheStatistics:
        return cls(
            {n: HookStatistics.from_json(s) for n, s in value["hooks"].items()},
            value["seconds"],
        )


def merge_statistics(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several ranks' `CacheStatistics.to_json()` as one, merged in order (None if
    any is missing)."""
    known = [part for part in parts if part is not None]
    if not known or len(known) < len(parts):
        return None
    merged = CacheStatistics.from_json(known[0])
    for part in known[1:]:
        merged = merged.merge(CacheStatistics.from_json(part))
    return merged.to_json()


# -- the guard ------------------------------------------------------------------------


class NonFiniteActivationsError(ValueError):
    """Activations held NaN or inf (after the cast to the storage dtype)."""


def largest_magnitudes(
    acts_ND: torch.Tensor, hooks: tuple[tuple[str, int], ...]
) -> dict[str, float]:
    """Each hook's largest |value| in this buffer, as computed (NaN if any is NaN)."""
    acts_ND = acts_ND.reshape(-1, acts_ND.shape[-1])
    if acts_ND.shape[0] == 0:
        return {name: 0.0 for name, _ in hooks}
    if len(hooks) == 1:
        return {hooks[0][0]: float(torch.maximum(acts_ND.amax(), -acts_ND.amin()))}
    high_D, low_D = acts_ND.amax(0), acts_ND.amin(0)
    largest, start = {}, 0
    for name, width in hooks:
        part = slice(start, start + width)
        largest[name] = float(torch.maximum(high_D[part].amax(), -low_D[part].amin()))
        start += width
    return largest


def check_finite(
    acts_ND: torch.Tensor,
    hooks: tuple[tuple[str, int], ...],
    dtype: str,
    on_non_finite: OnNonFinite,
    buffer_number: int,
) -> list[str]:
    """Raise `NonFiniteActivationsError` (`"error"`) when a hook's values in this
    buffer hold NaN or inf once cast to the storage `dtype` (float16 overflows above
    65504); with `"warn"`, return what is wrong, one message per hook."""
    target = storage_dtype(dtype)
    largest = largest_magnitudes(acts_ND, hooks)
    broken = [
        name
        for name, value in largest.items()
        if not bool(torch.isfinite(torch.tensor(value).to(target)))
    ]
    acts_ND = acts_ND.reshape(-1, acts_ND.shape[-1])
    spans, start = {}, 0
    for name, width in hooks:
        spans[name], start = slice(start, start + width), start + width
    messages = []
    for name in broken:
        part_ND = acts_ND[:, spans[name]]
        message = _non_finite_message(
            name, part_ND, part_ND.to(target), dtype, buffer_number
        )
        if on_non_finite == "error":
            raise NonFiniteActivationsError(message)
        messages.append(message)
    return messages


def _non_finite_message(
    hook: str,
    computed_ND: torch.Tensor,
    stored_ND: torch.Tensor,
    dtype: str,
    buffer_number: int,
) -> str:
    bad = int((~torch.isfinite(stored_ND)).sum())
    nan = int(torch.isnan(computed_ND).sum())
    finite = computed_ND[torch.isfinite(computed_ND)]
    largest = float(finite.abs().max()) if finite.numel() else float("nan")
    message = (
        f"{hook}: {bad} of {stored_ND.numel()} activation values of buffer "
        f"{buffer_number} are NaN or inf as stored in dtype={dtype!r} "
        f"({nan} NaN as computed by the model; the largest finite magnitude is "
        f"{largest:.6g})."
    )
    if nan == 0 and dtype == "float16":
        return (
            f"{message} They overflow float16, whose largest value is "
            f"{FLOAT16_MAX:.0f}: set dtype='float32' to store them, or "
            "on_non_finite='warn' to keep them as inf."
        )
    return (
        f"{message} The model itself produced them: check the model and its "
        "dtype (autocast_lm, model_from_pretrained_kwargs), or set "
        "on_non_finite='warn' to keep them (counted in the manifest's statistics)."
    )

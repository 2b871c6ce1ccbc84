"""The numeric envelope: how far the cached activations move when the same rows are
computed in another batch.

Inference changes activations by execution path (batch size and composition pick
other kernels and tilings; reduced precision rounds differently). When a process
builds its first buffer, and before any token shuffle, a few of its rows, taken
from different model batches, are run through the model again together, in one
batch of another size, exactly as the source computes them, and compared with the
values as stored. The manifest records the worst differences (`Envelope`). This
needs rows that are the model's whole input windows: with `exclude_special_tokens`
(rows re-packed) or a `seqpos_slice` (part of each window stored) it is skipped, with
the reason recorded. Cost: one forward pass of `ENVELOPE_ROWS` rows.

Shapes: R rows of the buffer, B rows re-run, T tokens per row, D values per token
(every hook's side by side).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from sae_lens.training.activations_store import _get_input_token_device
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from transformer_lens.hook_points import HookedRootModule

ENVELOPE_ROWS = 4
REL_FLOOR = 1e-3
"""`max_rel_error` is over stored values larger than this fraction of their RMS, so
values near zero do not blow it up."""


@dataclass
class Envelope:
    """The worst differences between re-run and stored activations."""

    rows: int  # rows re-run
    batch_size: int  # the re-run's batch size
    original_batch_size: int  # the batch size they were cached with
    buffer: int  # the run-wide number of the buffer they come from
    max_abs_error: float
    max_rel_error: float
    min_cosine: float  # of each token's vector, re-run against stored
    seconds: float = 0.0  # the re-run and comparison took
    per_hook: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        if len(self.per_hook) < 2:
            del value["per_hook"]
        return value


def skip_reason(excluding: bool, sliced: bool) -> str | None:
    """Why the rows of this run cannot be re-run as they are (None: they can)."""
    if excluding:
        return (
            "exclude_special_tokens removed tokens and re-packed the rest, so rows "
            "are not the model's input windows"
        )
    if sliced:
        return (
            "seqpos_slice stored only part of each window, so the stored tokens "
            "are not the model's input"
        )
    return None


def pick_rows(n_rows: int, batch_size: int) -> list[int]:
    """Up to `ENVELOPE_ROWS` rows spread evenly over the buffer (so over different
    model batches), fewer if the re-run batch would otherwise be the original's
    size."""
    n = min(ENVELOPE_ROWS, n_rows)
    if n == batch_size and n > 1:
        n -= 1
    if n == 0:
        return []
    if n == 1:
        return [0]
    return sorted({round(i * (n_rows - 1) / (n - 1)) for i in range(n)})


@torch.no_grad()
def forward(
    model: HookedRootModule,
    toks_BT: torch.Tensor,
    hooks: tuple[tuple[str, int], ...],
    model_kwargs: dict[str, Any],
    autocast: bool,
) -> torch.Tensor:
    """Every hook's activations for `toks_BT`, side by side, as the source computes
    them (sae-lens's `get_activations`: no BOS added, float32 on the CPU)."""
    device = _get_input_token_device(model)
    names = [name for name, _ in hooks]
    stops = [extract_stop_at_layer_from_tlens_hook_name(h) for h in names]
    stop = None if None in stops else max(s for s in stops if s is not None)
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=autocast
    ):
        cache = model.run_with_cache(
            toks_BT.to(device),
            names_filter=names,
            stop_at_layer=stop,
            prepend_bos=False,
            **model_kwargs,
        )[1]
    parts = [
        cache[name].reshape(toks_BT.shape[0], toks_BT.shape[1], -1).to("cpu")
        for name in names
    ]
    return torch.cat(parts, dim=-1).to(torch.float32)


def compare(rerun_BTD: torch.Tensor, stored_BTD: torch.Tensor) -> dict[str, float]:
    """Max |difference|, max relative difference (over `REL_FLOOR`) and the lowest
    cosine similarity of a token's vectors, over the finite stored values."""
    rerun, stored = rerun_BTD.double(), stored_BTD.double()
    finite = torch.isfinite(stored) & torch.isfinite(rerun)
    rerun, stored = rerun.where(finite, 0.0), stored.where(finite, 0.0)
    error = (rerun - stored).abs()
    scale = stored.square().mean().sqrt()
    large = stored.abs() > REL_FLOOR * scale
    rel = error[large] / stored.abs()[large]
    cosine = torch.nn.functional.cosine_similarity(rerun, stored, dim=-1, eps=1e-30)
    both_zero = (rerun.abs().amax(-1) == 0) & (stored.abs().amax(-1) == 0)
    cosine = cosine.where(~both_zero, 1.0).clamp(max=1.0)  # rounding can pass 1
    return {
        "max_abs_error": float(error.max()) if error.numel() else 0.0,
        "max_rel_error": float(rel.max()) if rel.numel() else 0.0,
        "min_cosine": float(cosine.min()) if cosine.numel() else 1.0,
    }


def measure(
    model: HookedRootModule,
    acts_RTD: torch.Tensor,
    toks_RT: torch.Tensor,
    hooks: tuple[tuple[str, int], ...],
    dtype: str,
    batch_size: int,
    buffer_number: int,
    model_kwargs: dict[str, Any] | None = None,
    autocast: bool = False,
) -> Envelope | None:
    """Re-run a few rows of a buffer (in generation order, before any token
    shuffle) in one batch and compare with their values as stored in `dtype`."""
    started = time.perf_counter()
    rows = pick_rows(acts_RTD.shape[0], batch_size)
    if not rows:
        return None
    index = torch.tensor(rows)
    stored_BTD = acts_RTD[index].to(getattr(torch, dtype))
    rerun_BTD = forward(model, toks_RT[index], hooks, model_kwargs or {}, autocast).to(
        getattr(torch, dtype)
    )
    per_hook, start = {}, 0
    for name, width in hooks:
        part = slice(start, start + width)
        per_hook[name] = compare(rerun_BTD[..., part], stored_BTD[..., part])
        start += width
    worst = merge_errors(list(per_hook.values()))
    return Envelope(
        rows=len(rows),
        batch_size=len(rows),
        original_batch_size=batch_size,
        buffer=buffer_number,
        per_hook=per_hook,
        seconds=time.perf_counter() - started,
        **worst,
    )


def merge_errors(parts: list[dict[str, float]]) -> dict[str, float]:
    return {
        "max_abs_error": max(p["max_abs_error"] for p in parts),
        "max_rel_error": max(p["max_rel_error"] for p in parts),
        "min_cosine": min(p["min_cosine"] for p in parts),
    }


def merge_envelopes(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several ranks' envelopes (`Envelope.to_json()` or `{"skipped": reason}`) as
    one: every rank's rows, the worst differences."""
    measured = [p for p in parts if p is not None and "skipped" not in p]
    if not measured:
        return next((p for p in parts if p is not None), None)
    merged: dict[str, Any] = {
        "rows": sum(p["rows"] for p in measured),
        "batch_size": max(p["batch_size"] for p in measured),
        "original_batch_size": measured[0]["original_batch_size"],
        "buffer": measured[0]["buffer"],  # the first rank's
        "seconds": max(p.get("seconds", 0.0) for p in measured),
        **merge_errors(measured),
    }
    if "per_hook" in measured[0]:
        merged["per_hook"] = {
            hook: merge_errors([p["per_hook"][hook] for p in measured])
            for hook in measured[0]["per_hook"]
        }
    return merged


def for_hook(envelope: dict[str, Any] | None, hook: str) -> dict[str, Any] | None:
    """One hook's part of a several-hook envelope (for that hook's own manifest)."""
    if envelope is None or "per_hook" not in envelope:
        return envelope
    rest = {k: v for k, v in envelope.items() if k != "per_hook"}
    return {**rest, **envelope["per_hook"][hook]}

"""The model re-run check (`verify --model`): a seeded sample of rows is run through
the model again and compared with the stored activations, within tolerances scaled
by the activations' size.

Shapes: B rows re-run (b: one model batch of them), T tokens per row (the stored
context size), D d_in, N rows in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import numpy as np
import torch
from datasets import Dataset
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.staging import MARKER
from sae_cache_ext.verify.folder import sliced_context_size
from sae_cache_ext.verify.report import CHECK_RERUN, Expected, VerifyReport
from sae_cache_ext.writer import TOKEN_IDS

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-4, 1e-4),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
"""Re-run tolerances `(atol, rtol)` by precision. `atol` is a fraction of the
activation scale (the RMS of the stored values compared), `rtol` of each value. The
default for a cache is the looser of its stored dtype's and the model's compute
dtype's (bfloat16 when the cache was made with `autocast_lm=True`)."""


@dataclass(frozen=True)
class ErrorStats:
    """How a re-run differs from the stored activations.

    `max_rel_error` is the largest `|rerun - stored| / |stored|` over the values with
    `|stored| > atol * activation_scale`: smaller values are judged by `atol` alone,
    so values near zero do not blow it up.
    """

    max_abs_error: float
    max_rel_error: float
    activation_scale: float
    n_values: int
    n_outside: int


def compare_activations(
    rerun_BTD: torch.Tensor, stored_BTD: torch.Tensor, atol: float, rtol: float
) -> ErrorStats:
    """Compare like `torch.allclose`, with `atol` scaled by the activation scale: a
    value is outside when `|rerun - stored| > atol * scale + rtol * |stored|`, where
    scale is the RMS of `stored`. NaN or infinite differences are always outside."""
    if rerun_BTD.shape != stored_BTD.shape:
        raise ValueError(
            f"rerun_BTD has shape {tuple(rerun_BTD.shape)} but stored_BTD has "
            f"{tuple(stored_BTD.shape)}: compare activations of the same rows."
        )
    rerun, stored = rerun_BTD.double(), stored_BTD.double()
    finite = stored[torch.isfinite(stored)]
    scale = finite.square().mean().sqrt().item() if finite.numel() else 0.0
    error = torch.nan_to_num((rerun - stored).abs(), nan=torch.inf)
    floor = atol * scale
    outside = error > floor + rtol * stored.abs()
    large = stored.abs() > floor
    rel = error[large] / stored.abs()[large]
    return ErrorStats(
        max_abs_error=error.max().item() if error.numel() else 0.0,
        max_rel_error=rel.max().item() if rel.numel() else 0.0,
        activation_scale=scale,
        n_values=error.numel(),
        n_outside=int(outside.sum().item()),
    )


def default_tolerances(stored_dtype: str, compute_dtype: str) -> tuple[float, float]:
    """The looser of `DEFAULT_TOLERANCES` for the two dtypes (float32's if unknown)."""
    fallback = DEFAULT_TOLERANCES["float32"]
    a = DEFAULT_TOLERANCES.get(stored_dtype, fallback)
    b = DEFAULT_TOLERANCES.get(compute_dtype, fallback)
    return max(a[0], b[0]), max(a[1], b[1])


def model_device(model: HookedRootModule) -> torch.device:
    embed = getattr(model, "W_E", None)
    if isinstance(embed, torch.Tensor):
        return embed.device
    return next(iter(model.parameters()), torch.empty(0)).device


def _compute_dtype(model: HookedRootModule, autocast: bool) -> str:
    if autocast:
        return "bfloat16"
    dtype = getattr(getattr(model, "cfg", None), "dtype", torch.float32)
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def rerun_activations(
    model: HookedRootModule,
    toks_BT: torch.Tensor,
    hook_name: str,
    model_kwargs: dict[str, Any] | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    """The model's activations at `hook_name` for `toks_BT`, exactly as sae-lens's
    `ActivationsStore.get_activations` computes them (no BOS added), as `acts_BTD`
    on the CPU."""
    device = model_device(model)
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=autocast
    ):
        _, cache = model.run_with_cache(
            toks_BT.to(device),
            names_filter=[hook_name],
            stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name),
            prepend_bos=False,
            **(model_kwargs or {}),
        )
    return einops.rearrange(cache[hook_name], "b t ... -> b t (...)").cpu()


@torch.no_grad()
def rerun_tokens(
    model: HookedRootModule,
    sequences_ST: torch.Tensor,
    positions_N2: torch.Tensor,
    hook_name: str,
    model_kwargs: dict[str, Any] | None = None,
    autocast: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Each token's activation at `hook_name`, `(N, D)`, from its rebuilt context:
    the token's sequence (`positions_N2[:, 0]` indexes `sequences_ST`) run as the
    store ran it (no BOS added), read at the token's position. A causal model's
    activation there depends only on the sequence up to the token. The sequences
    needed run `batch_size` at a time (default: all at once)."""
    wanted, inverse_N = torch.unique(positions_N2[:, 0], return_inverse=True)
    toks_ST = sequences_ST[wanted]
    acts_STD = torch.cat(
        [
            rerun_activations(model, toks_bT, hook_name, model_kwargs, autocast)
            for toks_bT in toks_ST.split(max(1, batch_size or len(toks_ST)))
        ]
    )
    return acts_STD[inverse_N, positions_N2[:, 1]]


def manifest_skip_reason(
    manifest: dict[str, Any] | None, config: dict[str, Any] | None = None
) -> str | None:
    """Why this cache's rows cannot be re-run, known from its manifest alone (so
    before any model is loaded), or None when they can."""
    if config is None:
        config = None if manifest is None else manifest.get("config")
    if config is None:
        return (
            f"no {MARKER}, so it is unknown whether rows are whole original sequences"
        )
    if config.get("store_token_positions"):
        # every token re-runs from its token_positions (`verify.positions`)
        return data_parallel_reason(manifest)
    fix = " (store_token_positions=True would make every token re-runnable)"
    if config.get("shuffle_across_sequences"):
        return (
            "shuffle_across_sequences=True permuted tokens across rows, so rows are "
            "not original sequences" + fix
        )
    if config.get("exclude_special_tokens") not in (False, None, []):
        return (
            "exclude_special_tokens removed tokens and re-packed the rest, so rows "
            "are not original sequences" + fix
        )
    if manifest is not None and manifest.get("rows_are_sequences") is False:
        return "the manifest says rows are not original sequences" + fix
    ctx = config["context_size"]
    if sliced_context_size(ctx, config.get("seqpos_slice")) != ctx:
        return (
            f"seqpos_slice={config.get('seqpos_slice')} stored only part of each "
            "sequence, so the stored tokens are not the model's input" + fix
        )
    return None


def data_parallel_reason(manifest: dict[str, Any] | None) -> str | None:
    """Why token_positions cannot be replayed: a cache made by several processes."""
    world_size = ((manifest or {}).get("data_parallel") or {}).get("world_size", 1)
    if world_size > 1:
        return (
            f"the cache was made by {world_size} data-parallel processes, whose "
            "token_positions count sequences per process"
        )
    return None


def _rerun_skip_reason(
    config: dict[str, Any] | None, report: VerifyReport
) -> str | None:
    if report.problems:
        return "the checks above found problems; fix those first"
    return manifest_skip_reason(None, config)


def sample_rows(n_rows: int, rows: int, seed: int) -> list[int]:
    """`rows` distinct row indices (all when there are fewer), seeded, sorted."""
    perm_N = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return sorted(perm_N[:rows].tolist())


def check_rerun(
    dataset: Dataset | None,
    model: HookedRootModule,
    config: dict[str, Any] | None,
    expected: Expected,
    rows: int,
    seed: int,
    tolerances: tuple[float | None, float | None],
    report: VerifyReport,
) -> None:
    reason = _rerun_skip_reason(config, report)
    if reason is None and (rows == 0 or dataset is None or dataset.num_rows == 0):
        reason = "no rows to re-run"
    if (
        reason is not None
        or config is None
        or dataset is None
        or expected.hook_name is None
    ):
        report.skipped.append(f"{CHECK_RERUN}: {reason or 'no hook column'}")
        return
    report.checks.append(CHECK_RERUN)
    hook, autocast = expected.hook_name, bool(config.get("autocast_lm"))
    indices = sample_rows(dataset.num_rows, rows, seed)
    sample = dataset.with_format("numpy")[indices]
    toks_BT = torch.from_numpy(np.asarray(sample[TOKEN_IDS]).astype(np.int64))
    stored_BTD = torch.from_numpy(np.asarray(sample[hook]))
    batch_size = int(config.get("model_batch_size") or len(indices))
    rerun_BTD = torch.cat(
        [
            rerun_activations(
                model, toks_bT, hook, config.get("model_kwargs"), autocast
            )
            for toks_bT in toks_BT.split(max(1, batch_size))
        ]
    )
    report.rerun_rows = indices
    report_comparison(
        rerun_BTD, stored_BTD, model, config, expected, tolerances, report
    )


def report_comparison(
    rerun_BTD: torch.Tensor,
    stored_BTD: torch.Tensor,
    model: HookedRootModule,
    config: dict[str, Any],
    expected: Expected,
    tolerances: tuple[float | None, float | None],
    report: VerifyReport,
) -> None:
    """Compare a re-run with the stored activations within the tolerances (given,
    else the defaults for the dtypes) and put the result in `report`."""
    hook, autocast = expected.hook_name, bool(config.get("autocast_lm"))
    default = default_tolerances(str(expected.dtype), _compute_dtype(model, autocast))
    atol = default[0] if tolerances[0] is None else tolerances[0]
    rtol = default[1] if tolerances[1] is None else tolerances[1]
    report.atol, report.rtol = atol, rtol
    if rerun_BTD.shape != stored_BTD.shape:
        report.problems.append(
            f"re-run: the model gives activations of shape {tuple(rerun_BTD.shape)} "
            f"at {hook!r}, the cache stores {tuple(stored_BTD.shape)}: this is not "
            "the model (or hook) the cache was made with."
        )
        return
    stats = compare_activations(rerun_BTD, stored_BTD, atol, rtol)
    report.max_abs_error = stats.max_abs_error
    report.max_rel_error = stats.max_rel_error
    report.activation_scale = stats.activation_scale
    if stats.n_outside:
        report.problems.append(
            f"re-run: {stats.n_outside} of {stats.n_values} values differ from the "
            f"stored activations by more than atol x scale + rtol x |stored| "
            f"(atol={atol:g}, rtol={rtol:g}, scale={stats.activation_scale:.3g}); "
            f"max abs error {stats.max_abs_error:.3g}, max rel error "
            f"{stats.max_rel_error:.3g}. Check that this is the model the cache was "
            f"made with (model_name={config.get('model_name')!r}), or pass larger "
            "atol/rtol if a difference is expected (another device or dtype)."
        )

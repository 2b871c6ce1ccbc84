"""The model against the config: its device, the hooks (they exist, fire, and give one
vector per token), its context window and the hook's width (`hook_width`)."""

from __future__ import annotations

import difflib
import re

import torch
from sae_lens.training.activations_store import _get_input_token_device
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.config import CacheActivationsRunnerConfig

# HookedTransformer hooks that exist in `hook_dict` but only fire with a flag set.
_FLAGGED_HOOKS = (
    (r"blocks\.\d+\.attn\.hook_result", "use_attn_result"),
    (r"blocks\.\d+\.hook_[qkv]_input", "use_split_qkv_input"),
    (r"blocks\.\d+\.hook_attn_in", "use_attn_in"),
    (r"blocks\.\d+\.hook_mlp_in", "use_hook_mlp_in"),
)
_NOT_PER_TOKEN_HOOKS = r"blocks\.\d+\.attn\.hook_(attn_scores|pattern)"


def check_device(cfg: CacheActivationsRunnerConfig, model: HookedRootModule) -> None:
    want = torch.device(cfg.device)
    if not _device_available(want):
        raise ValueError(
            f"device={cfg.device!r} does not exist on this machine (no such "
            f"{want.type} device is available): set device='cpu' or to a device "
            "torch can see."
        )
    have = torch.device(_get_input_token_device(model))
    if have.type != want.type or (
        want.index is not None and have.index is not None and want.index != have.index
    ):
        raise ValueError(
            f"device={cfg.device!r} but the model is on {str(have)!r}: set "
            f"device={str(have)!r}, or move the model with model.to({cfg.device!r})."
        )


def _device_available(device: torch.device) -> bool:
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < (
            torch.cuda.device_count()
        )
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else True


def check_hook(cfg: CacheActivationsRunnerConfig, model: HookedRootModule) -> None:
    for hook in cfg.all_hook_names:
        field = (
            f"hook_name={hook!r}"
            if cfg.hook_names is None
            else f"hook_names entry {hook!r}"
        )
        _check_one_hook(field, hook, model)
    if not isinstance(model, HookedTransformer):
        return  # widths and n_ctx are only known for HookedTransformer
    mcfg = model.cfg
    if cfg.context_size > mcfg.n_ctx:
        raise ValueError(
            f"context_size={cfg.context_size} is longer than the model's context "
            f"window (model.cfg.n_ctx={mcfg.n_ctx}): set context_size to at most "
            f"{mcfg.n_ctx}."
        )
    hook = cfg.hook_name
    width = hook_width(model, hook)
    if width is not None and width[0] != cfg.d_in:
        raise ValueError(
            f"d_in={cfg.d_in} does not match hook_name={hook!r}, whose activations "
            f"have {width[0]} values per token ({width[1]}): set d_in={width[0]}."
        )


def _check_one_hook(field: str, hook: str, model: HookedRootModule) -> None:
    hook_names = list(getattr(model, "hook_dict", {}))
    if hook not in hook_names:
        close = difflib.get_close_matches(hook, hook_names, n=3)
        hint = f"Did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"{field} is not a hook of this model. {hint}The model has "
            f"{len(hook_names)} hooks (see model.hook_dict), e.g. "
            f"{', '.join(map(repr, hook_names[:3]))}."
        )
    if re.fullmatch(_NOT_PER_TOKEN_HOOKS, hook):
        raise ValueError(
            f"{field} is an attention pattern, shaped (batch, head, "
            "query_pos, key_pos), not one vector per token: pick a per-token hook "
            "such as 'blocks.0.attn.hook_z' or 'blocks.0.hook_resid_post'."
        )
    if not isinstance(model, HookedTransformer):
        return
    for pattern, flag in _FLAGGED_HOOKS:
        if re.fullmatch(pattern, hook) and not getattr(model.cfg, flag):
            raise ValueError(
                f"{field} only fires when model.cfg.{flag} is True, and it "
                f"is False: call model.set_{flag}(True) before caching, or pick "
                "another hook."
            )


def hook_width(model: HookedTransformer, hook: str) -> tuple[int, str] | None:
    """`(values per token, how it is computed)` at `hook`, from `model.cfg` alone,
    or None where the width is not known without running the model."""
    c = model.cfg
    split = c.use_split_qkv_input or c.use_attn_in  # ln1 then runs per head
    n_kv = (
        c.n_key_value_heads
        if c.n_key_value_heads and not c.ungroup_grouped_query_attention
        else c.n_heads
    )
    block = r"blocks\.\d+\."
    rules: list[tuple[str, int | None, str]] = [
        (
            r"hook_embed|hook_pos_embed|unembed\.hook_in|ln_final\.hook_normalized|"
            rf"{block}hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|mlp_in)|"
            rf"{block}ln2\.hook_normalized",
            c.d_model,
            "d_model",
        ),
        (rf"{block}ln1\.hook_normalized", None if split else c.d_model, "d_model"),
        (rf"{block}ln1\.hook_scale", None if split else 1, "one scale"),
        (rf"({block}ln2|ln_final)\.hook_scale", 1, "one scale"),
        (rf"{block}attn\.hook_(q|z|rot_q)", c.n_heads * c.d_head, "n_heads * d_head"),
        (rf"{block}attn\.hook_(k|v|rot_k)", n_kv * c.d_head, "kv heads * d_head"),
        (rf"{block}attn\.hook_result", c.n_heads * c.d_model, "n_heads * d_model"),
        (rf"{block}hook_(q_input|attn_in)", c.n_heads * c.d_model, "n_heads * d_model"),
        (rf"{block}hook_[kv]_input", n_kv * c.d_model, "kv heads * d_model"),
        (rf"{block}mlp\.hook_(pre|pre_linear|post)", c.d_mlp, "d_mlp"),
        (r"unembed\.hook_out", c.d_vocab_out, "d_vocab_out"),
    ]
    for pattern, width, how in rules:
        if re.fullmatch(pattern, hook):
            return None if width is None else (int(width), how)
    return None

"""The config's fields alone, no model, dataset or disk: `validate_config`.

These belong in the config's `__post_init__`; they are re-checked here because a
dataclass can be changed after it is built.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.utils import validate_repo_id

from sae_cache_ext.config import CacheActivationsRunnerConfig


def validate_config(cfg: CacheActivationsRunnerConfig) -> None:
    """Check the fields alone (no model, dataset or disk). Raises `ValueError`."""
    cfg._check_new_fields()  # our own fields' rules, again: cfg may have changed
    for name in ("model_batch_size", "d_in", "context_size", "training_tokens"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive whole number.")
    _check_seqpos_slice(cfg)
    if cfg.training_tokens < cfg.sliced_context_size:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one row of "
            f"{cfg.sliced_context_size} tokens (context_size={cfg.context_size} after "
            f"seqpos_slice={cfg.seqpos_slice}): raise training_tokens to at least "
            f"{cfg.sliced_context_size}."
        )
    _check_buffer_size(cfg)
    if cfg.hf_repo_id is not None:
        _check_repo_id(cfg.hf_repo_id)
        if cfg.hook_names is not None:
            raise ValueError(
                f"hf_repo_id={cfg.hf_repo_id!r} with hook_names: a push uploads one "
                "dataset, and hook_names makes one per hook. Set hf_repo_id=None and "
                "push each <new_cached_activations_path>/<hook> folder with "
                "sae_cache_ext.hub.push_cache, one repo per hook."
            )
    shards = cfg.hf_num_shards
    if shards is not None and (
        isinstance(shards, bool) or not isinstance(shards, int) or shards < 1
    ):
        raise ValueError(
            f"hf_num_shards={shards!r} must be at least 1, or None to let `datasets` "
            "choose."
        )
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={cfg.device!r} is not a torch device ({error}): use e.g. 'cpu', "
            "'cuda' or 'cuda:1'."
        ) from None


def _check_seqpos_slice(cfg: CacheActivationsRunnerConfig) -> None:
    seqpos = cfg.seqpos_slice
    if (
        not isinstance(seqpos, tuple | list)
        or not 1 <= len(seqpos) <= 3
        or not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool))
            for v in seqpos
        )
    ):
        raise ValueError(
            f"seqpos_slice={seqpos!r} must be a tuple (start, stop, step) of 1 to 3 "
            "ints or None, as for slice(); use (None,) to keep every position."
        )
    if len(seqpos) == 3 and seqpos[2] is not None and seqpos[2] < 1:
        raise ValueError(
            f"seqpos_slice={tuple(seqpos)} has step {seqpos[2]}: the step must be at "
            "least 1 (or None)."
        )
    if cfg.sliced_context_size == 0:
        raise ValueError(
            f"seqpos_slice={tuple(seqpos)} keeps no position of a row of "
            f"context_size={cfg.context_size} tokens: widen the slice or raise "
            "context_size."
        )


def _check_buffer_size(cfg: CacheActivationsRunnerConfig) -> None:
    size = cfg.buffer_size_gb
    if not isinstance(size, int | float) or not math.isfinite(size) or size <= 0:
        raise ValueError(f"buffer_size_gb={size!r} must be a positive number of GB.")
    # sae-lens rounds the buffer down to whole model batches: below one, 0 batches
    need = cfg.n_tokens_in_batch * cfg.bytes_per_token
    if cfg.n_tokens_in_buffer < cfg.n_tokens_in_batch:
        raise ValueError(
            f"buffer_size_gb={size} does not hold one model batch: "
            f"model_batch_size={cfg.model_batch_size} rows x {cfg.sliced_context_size} "
            f"tokens x d_in={cfg.d_in} x {cfg.dtype} = {need} bytes. Raise "
            f"buffer_size_gb to at least {need / 1e9:.3g}, or lower model_batch_size."
        )


def _check_repo_id(repo_id: object) -> None:
    fix = "use the form 'owner/name', e.g. 'my-user/gpt2-activations'"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"hf_repo_id={repo_id!r} is not a Hub repo id: {fix}.")
    try:
        validate_repo_id(repo_id)
    except ValueError as error:  # huggingface_hub's HFValidationError
        raise ValueError(
            f"hf_repo_id={repo_id!r} is not valid ({error}): {fix}."
        ) from None

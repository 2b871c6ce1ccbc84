"""Checks that refuse a bad run before any forward pass and before anything is written.

Three layers, cheapest first, each raising an error that names the field and the fix:

- `validate_config(cfg)`: the config's fields alone, no I/O (these belong in the
  config's `__post_init__`; they are re-checked here because a dataclass can be
  changed after it is built);
- `validate_output_path(cfg)`: the output path, read-only look at the disk;
- `validate_run(cfg, model, dataset)`: both of the above, then the model (device, hook,
  widths) and the dataset (columns, and a bounded sample tokenized as the store
  would, to prove it yields at least one row). Tokenizer calls only, no forward pass.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from huggingface_hub.utils import validate_repo_id
from sae_lens.pretokenize_runner import get_special_token_from_cfg
from sae_lens.tokenization_and_batching import (
    concat_and_batch_sequences,
    tokenize_with_chat_template,
)
from sae_lens.training.activations_store import _get_input_token_device
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import staging
from sae_cache_ext.config import CacheActivationsRunnerConfig

logger = logging.getLogger(__name__)

SAMPLE_DOCS = 1000
"""Documents (or pretokenized rows) read from the dataset at most, to check it."""

# Folders the cache, its staging folder and its backup must never be written into.
_SYSTEM_FOLDERS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lock",
    "/var/run",
)
# sae-lens's store picks the first of these columns that a row has.
_TOKEN_COLUMNS = ("tokens", "input_ids")
_TEXT_COLUMNS = ("text", "problem")
_CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")
# HookedTransformer hooks that exist in `hook_dict` but only fire with a flag set.
_FLAGGED_HOOKS = (
    (r"blocks\.\d+\.attn\.hook_result", "use_attn_result"),
    (r"blocks\.\d+\.hook_[qkv]_input", "use_split_qkv_input"),
    (r"blocks\.\d+\.hook_attn_in", "use_attn_in"),
    (r"blocks\.\d+\.hook_mlp_in", "use_hook_mlp_in"),
)
_NOT_PER_TOKEN_HOOKS = r"blocks\.\d+\.attn\.hook_(attn_scores|pattern)"


# -- the config's fields ------------------------------------------------------------


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


# -- the output path ------------------------------------------------------------------


def _finished_by_this_config(
    cfg: CacheActivationsRunnerConfig, layout: staging.Layout
) -> bool:
    """With `resume=True`, the finished cache of this very config may stand at the
    output path (a run killed after its swap): the run then returns it."""
    if not cfg.resume or not staging.is_our_finished_cache(layout.final):
        return False
    marker = staging.read_marker(layout.final) or {}
    # of any world size (a data-parallel run's fingerprint names it)
    return (
        cfg.data_fingerprint_of(str(marker.get("fingerprint"))) == cfg.data_fingerprint
    )


def validate_output_path(cfg: CacheActivationsRunnerConfig) -> None:
    """Refuse an output path the run could not write, or must not write, read-only.

    Raises `ValueError` (a system folder, a mount point), `FileExistsError` (a file,
    or a folder that is not empty, at or above the path) or `PermissionError`.
    """
    path = cfg.new_cached_activations_path
    if not path:
        raise ValueError("new_cached_activations_path must be set to a folder path.")
    layout = staging.Layout.for_output(path)
    _check_not_system_folder(path, layout.final)
    # After a crashed swap the output path may hold our half-moved cache: the
    # runner's `run` sorts that out, so the emptiness check waits for it.
    if not layout.backup.exists() and not _finished_by_this_config(cfg, layout):
        staging.check_output_free(layout)
    if os.path.ismount(layout.final):
        raise ValueError(
            f"new_cached_activations_path={path!r} is a mount point, which the finished "
            "cache cannot be renamed onto: use a folder inside it, e.g. "
            f"{str(layout.final / 'cache')!r}."
        )
    ancestor = layout.final.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(
            f"new_cached_activations_path={path!r} cannot be created: {ancestor} is a "
            "file. Choose a path whose parent folders are folders."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"new_cached_activations_path={path!r} cannot be written: {ancestor} is "
            "not writable by this user. Choose a path you can write to."
        )


def _check_not_system_folder(path: str, final: Path) -> None:
    if os.name != "posix":
        return
    resolved = final.resolve()
    for folder in _SYSTEM_FOLDERS:
        for form in {Path(folder), Path(folder).resolve()}:
            if resolved == form or form in resolved.parents:
                raise ValueError(
                    f"new_cached_activations_path={path!r} is inside the system folder "
                    f"{form}, where sae-cache-ext never writes: choose a folder on a "
                    "data disk or under your home, e.g. '~/activations/<name>'."
                )
    if resolved.parent == resolved or resolved.parent == Path("/"):
        raise ValueError(
            f"new_cached_activations_path={path!r} would put the cache and its staging "
            "folder in the root folder /: choose a path at least two levels deep, "
            "e.g. '/data/activations/<name>'."
        )


# -- the model ----------------------------------------------------------------------


def _check_device(cfg: CacheActivationsRunnerConfig, model: HookedRootModule) -> None:
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


def _check_hook(cfg: CacheActivationsRunnerConfig, model: HookedRootModule) -> None:
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


# -- tokens and the dataset ----------------------------------------------------------


@dataclass
class _DatasetKind:
    column: str
    pretokenized: bool


def _check_dataset_shape(
    cfg: CacheActivationsRunnerConfig, dataset: object
) -> _DatasetKind | None:
    """The column the store will read, or None when the dataset is loaded later."""
    if dataset is None:
        if not cfg.dataset_path:
            raise ValueError(
                "dataset_path is empty and no override_dataset was given: set "
                "dataset_path, or pass the dataset as override_dataset."
            )
        logger.debug(
            "dataset_path=%r is loaded by the store; not checked here.",
            cfg.dataset_path,
        )
        return None
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        raise ValueError(
            f"override_dataset is a {type(dataset).__name__} with splits "
            f"{list(dataset)}: pass one split, e.g. override_dataset=dataset['train']."
        )
    if not isinstance(dataset, Dataset | IterableDataset):
        raise ValueError(
            f"override_dataset is a {type(dataset).__name__}: pass a datasets.Dataset "
            "or IterableDataset (e.g. Dataset.from_dict({'text': [...]}))."
        )
    first = next(iter(dataset), None)
    if first is None:
        why = (
            "sae-lens would take an empty Dataset for no dataset and download "
            f"dataset_path={cfg.dataset_path!r} instead"
            if isinstance(dataset, Dataset)
            else "sae-lens would stop with a bare StopIteration"
        )
        raise ValueError(
            f"override_dataset has no rows ({why}): pass a dataset with rows."
        )
    columns = list(first)
    candidates = (
        _CHAT_COLUMNS if cfg.use_chat_formatting else _TOKEN_COLUMNS + _TEXT_COLUMNS
    )
    column = next((c for c in candidates if c in columns), None)
    if column is None:
        raise ValueError(
            f"override_dataset has columns {columns}, none of which sae-lens reads: "
            f"name the text or token column one of {list(candidates)}, e.g. with "
            "dataset.rename_column('body', 'text')."
        )
    return _DatasetKind(
        column, column in _TOKEN_COLUMNS and not cfg.use_chat_formatting
    )


def _vocab_size(model: HookedRootModule) -> int | None:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if isinstance(d_vocab, int) and d_vocab > 0:
        return d_vocab
    tokenizer = getattr(model, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else None


def _check_token_options(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    kind: _DatasetKind | None,
) -> None:
    tokenizer = getattr(model, "tokenizer", None)
    vocab = _vocab_size(model)
    sep = cfg.sequence_separator_token
    if isinstance(sep, int) and vocab is not None and sep >= vocab:
        raise ValueError(
            f"sequence_separator_token={sep} is outside the vocabulary (ids 0 to "
            f"{vocab - 1}): use a token id below {vocab}, 'bos', 'eos', 'sep' or None."
        )
    separator_used = not cfg.disable_concat_sequences and (
        kind is None or not kind.pretokenized
    )
    if (
        isinstance(sep, str)
        and separator_used
        and tokenizer is not None
        and getattr(tokenizer, f"{sep}_token_id", None) is None
    ):
        message = (
            f"sequence_separator_token={sep!r} but the model's tokenizer has no "
            f"{sep} token ({sep}_token_id is None), so documents would be joined "
            "with no separator: use 'bos', 'eos', a token id, or None for no "
            "separator."
        )
        if kind is not None:
            raise ValueError(message)
        logger.warning("%s", message)  # the dataset may turn out pretokenized

    exclude = cfg.exclude_special_tokens
    if exclude is True:
        if tokenizer is None:
            raise ValueError(
                "exclude_special_tokens=True needs the model's tokenizer, but the "
                "model has none. Pass an explicit list of token ids instead."
            )
        if not get_special_token_ids(tokenizer):
            logger.warning(
                "exclude_special_tokens=True, but the tokenizer has no special tokens: "
                "nothing will be excluded."
            )
    elif isinstance(exclude, list) and vocab is not None:
        outside = sorted(t for t in set(exclude) if t >= vocab)
        if outside:
            raise ValueError(
                f"exclude_special_tokens holds ids outside the vocabulary (ids 0 to "
                f"{vocab - 1}): {outside[:10]}. Remove them, or use True for the "
                "tokenizer's special tokens."
            )
        if len(set(exclude)) >= vocab:
            raise ValueError(
                "exclude_special_tokens excludes every token of the vocabulary, so no "
                "row could ever be filled: list only the ids to drop."
            )


class _Sample:
    """The first `limit` values of `column`, read lazily; `exhausted` tells whether
    they were the whole dataset."""

    def __init__(self, dataset: Iterable[Any], column: str, limit: int) -> None:
        self._dataset, self.column, self._limit = dataset, column, limit
        self.read = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[Any]:
        rows = iter(self._dataset)
        for row in itertools.islice(rows, self._limit):
            self.read += 1
            yield row[self.column]
        self.exhausted = self.read < self._limit or next(rows, None) is None


def _check_pretokenized_rows(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule, sample: _Sample
) -> None:
    vocab = _vocab_size(model)
    top = vocab - 1 if vocab is not None else None
    # the run reads at least this many rows (more when tokens are excluded)
    rows_read = cfg.n_buffers * cfg.n_seq_in_buffer
    for index, row in enumerate(sample):
        ids = torch.as_tensor(row[: cfg.context_size])
        problem = None
        if len(row) < cfg.context_size:
            problem = (
                f"has {len(row)} tokens, fewer than context_size={cfg.context_size}: "
                "lower context_size or re-tokenize the dataset into longer rows"
            )
        elif ids.numel() and (ids.min() < 0 or (top is not None and ids.max() > top)):
            problem = (
                f"holds token ids outside the model's vocabulary (0 to {top}): "
                "tokenize the dataset with this model's tokenizer"
            )
        if problem is None:
            continue
        message = f"override_dataset row {index} (column {sample.column!r}) {problem}."
        if index < rows_read:
            raise ValueError(message)
        logger.warning("%s The run may stop with an error if it reaches it.", message)
        return


@dataclass
class _TokenStats:
    docs: int = 0
    tokens: int = 0
    longest: int = 0


def _document_tokens(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    sample: _Sample,
    stats: _TokenStats,
) -> Iterator[torch.Tensor]:
    """Tokenize documents as sae-lens's store does (`_iterate_raw_dataset_tokens`)."""
    tokenizer = getattr(model, "tokenizer", None)
    for index, value in enumerate(sample):
        if cfg.use_chat_formatting:
            messages = (
                [{"role": "user", "content": value}]
                if isinstance(value, str)
                else value
            )
            try:
                tokens = tokenize_with_chat_template(messages, tokenizer)  # type: ignore[arg-type]
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(
                    f"use_chat_formatting=True but override_dataset row {index} cannot "
                    f"be formatted with the tokenizer's chat template ({error}): set "
                    "use_chat_formatting=False or fix the row."
                ) from None
        elif not isinstance(value, str):
            raise ValueError(
                f"override_dataset row {index} (column {sample.column!r}) is a "
                f"{type(value).__name__}, not text: drop or fix such rows, e.g. with "
                "dataset.filter(lambda row: isinstance(row['text'], str))."
            )
        else:
            tokens = model.to_tokens(  # type: ignore[operator]
                value, truncate=False, move_to_device=False, prepend_bos=False
            ).squeeze(0)
        stats.docs += 1
        stats.tokens += len(tokens)
        stats.longest = max(stats.longest, len(tokens))
        yield tokens


def _check_text_yields_a_row(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule, sample: _Sample
) -> None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(getattr(model, "to_tokens", None)):
        raise ValueError(
            f"override_dataset's {sample.column!r} column is text, which needs the "
            "model's tokenizer, but the model has none: pass a pretokenized dataset "
            "(a 'tokens' or 'input_ids' column) or a model with a tokenizer."
        )
    stats = _TokenStats()
    rows = concat_and_batch_sequences(
        tokens_iterator=_document_tokens(cfg, model, sample, stats),
        context_size=cfg.context_size,
        begin_batch_token_id=tokenizer.bos_token_id if cfg.prepend_bos else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=get_special_token_from_cfg(
            cfg.sequence_separator_token, tokenizer
        ),
        disable_concat_sequences=cfg.disable_concat_sequences,
    )
    if next(rows, None) is not None:
        return
    if cfg.disable_concat_sequences:
        message = (
            f"disable_concat_sequences=True keeps only documents of at least "
            f"context_size={cfg.context_size} tokens (with BOS), and none of the "
            f"{'' if sample.exhausted else 'first '}{stats.docs} documents of "
            f"override_dataset is that long (the longest has {stats.longest} tokens): "
            "lower context_size, or set disable_concat_sequences=False."
        )
    else:
        message = (
            f"override_dataset holds too little text for one row: its "
            f"{'' if sample.exhausted else 'first '}{stats.docs} documents tokenize to "
            f"{stats.tokens} tokens, and a row needs context_size={cfg.context_size} "
            "(counting BOS and separators): add documents or lower context_size."
        )
    if sample.exhausted:
        raise ValueError(message)
    logger.warning("%s Later documents may still fill rows.", message)


# -- everything ---------------------------------------------------------------------


def validate_run(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    dataset: Dataset | IterableDataset | None,
    check_output: bool = True,
) -> None:
    """Check a whole run before it starts: no forward pass, nothing written.

    `dataset` is the `override_dataset` (None when the store loads
    `cfg.dataset_path`, which is then not checked). Raises `ValueError`,
    `FileExistsError` or `PermissionError` with the field to change.
    """
    validate_config(cfg)
    if check_output:
        validate_output_path(cfg)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    _check_device(cfg, model)
    _check_hook(cfg, model)
    kind = _check_dataset_shape(cfg, dataset)
    _check_token_options(cfg, model, kind)
    if kind is None or dataset is None:
        return
    sample = _Sample(dataset, kind.column, SAMPLE_DOCS)
    if kind.pretokenized:
        _check_pretokenized_rows(cfg, model, sample)
    else:
        _check_text_yields_a_row(cfg, model, sample)

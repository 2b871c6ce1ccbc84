"""The tokens a run would see, from tokenizer calls only (no forward pass): the token
options against the model's vocabulary and tokenizer, and a sample of the dataset
checked (pretokenized rows) or tokenized as sae-lens's store would, to prove it
yields at least one row."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sae_lens.pretokenize_runner import get_special_token_from_cfg
from sae_lens.tokenization_and_batching import (
    concat_and_batch_sequences,
    tokenize_with_chat_template,
)
from sae_lens.util import get_special_token_ids
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.validate.dataset import DatasetKind, Sample

logger = logging.getLogger(__name__)


def _vocab_size(model: HookedRootModule) -> int | None:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if isinstance(d_vocab, int) and d_vocab > 0:
        return d_vocab
    tokenizer = getattr(model, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else None


def check_token_options(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    kind: DatasetKind | None,
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


def check_pretokenized_rows(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule, sample: Sample
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
    sample: Sample,
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


def check_text_yields_a_row(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule, sample: Sample
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

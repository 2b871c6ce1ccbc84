"""The source of activations: sae-lens's `ActivationsStore`, adapted.

It reads the dataset a batch of rows at a time, runs one forward pass for every
hook, drops the excluded token ids (counting every drop in the ledger), skips rows
a resumed run has already cached, and says when the dataset has run out. Its state
is typed (`SourceState`) and restored in one call. Shape suffixes: N tokens
(flattened), D values per token (every hook's, side by side), B rows of a batch,
T tokens per row.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from sae_lens.cache_activations_runner import _mk_activations_store
from sae_lens.training.activations_store import (
    ActivationsStore,
    _get_input_token_device,
)
from sae_lens.util import (
    extract_stop_at_layer_from_tlens_hook_name,
    get_special_token_ids,
)
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import accounting
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.packing import drop_tokens, with_positions
from sae_cache_ext.validate import hook_width

logger = logging.getLogger(__name__)

READ_BATCH_ROWS = 1024


@dataclass
class SourceState:
    """How far the source has read, for a resumed run."""

    rows_used: int = 0  # rows taken from the store (before exclusion)
    exhausted: bool = False
    counts: dict[str, Any] | None = None  # the ledger's per-batch counts


def excluded_ids(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule
) -> torch.Tensor | None:
    """The token ids `exclude_special_tokens` removes, sorted (None: none)."""
    exclude = cfg.exclude_special_tokens
    if exclude is False:
        return None
    if exclude is True:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "exclude_special_tokens=True needs the model's tokenizer, but the "
                "model has none. Pass an explicit list of token ids instead."
            )
        exclude = get_special_token_ids(tokenizer)
    return torch.tensor(sorted(set(exclude)), dtype=torch.long)


def hook_widths(
    cfg: CacheActivationsRunnerConfig, model: HookedRootModule
) -> list[tuple[str, int]]:
    """`(hook, values per token)` for every hook cached: `d_in` for `hook_name`, the
    others from the model's config or, where that does not tell, from a forward pass
    over two tokens."""
    widths = {cfg.hook_name: cfg.d_in}
    bare = getattr(model, "_orig_mod", model)
    unknown = []
    for hook in cfg.all_hook_names:
        if hook in widths:
            continue
        known = hook_width(bare, hook) if hasattr(bare, "cfg") else None
        if known is None:
            unknown.append(hook)
        else:
            widths[hook] = known[0]
    if unknown:
        tokens = torch.zeros(
            (1, 2), dtype=torch.long, device=_get_input_token_device(model)
        )
        with torch.no_grad():
            cache = model.run_with_cache(
                tokens, names_filter=unknown, prepend_bos=False
            )[1]
        for hook in unknown:
            widths[hook] = int(cache[hook][0, 0].numel())
    return [(hook, widths[hook]) for hook in cfg.all_hook_names]


class ActivationSource:
    """Batches of `(acts_ND, toks_N)` from the store, excluded ids removed."""

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        model: HookedRootModule,
        dataset: Dataset | None,
        hooks: tuple[tuple[str, int], ...],
        context_size: int,
        exclude_ids: torch.Tensor | None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.hooks = hooks
        self.context_size = context_size  # after `seqpos_slice`
        self.exclude_ids = exclude_ids
        tokenizer = getattr(model, "tokenizer", None)
        self.ledger = accounting.Ledger(
            context_size=cfg.context_size,
            disable_concat_sequences=cfg.disable_concat_sequences,
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
        )
        self.rows_used = 0
        self.exhausted = False
        self.store = self._make_store(dataset)
        # Where `next_batch`'s activations are: a CUDA model's own GPU (the
        # producer copies them to host memory once, asynchronously), else the
        # store's device (the host). Token ids are always on the host.
        model_device = _get_input_token_device(model)
        self.activations_device: torch.device = (
            model_device if model_device.type == "cuda" else self.store.device
        )

    def _make_store(self, dataset: Dataset | None) -> ActivationsStore:
        with warnings.catch_warnings():
            # sae-lens compares the dataset's documents with training_tokens and
            # predicts "multiple training epochs": wrong here (documents hold many
            # tokens, and nothing repeats unless on_dataset_exhausted='repeat');
            # `exhaustion` says what really happened.
            warnings.filterwarnings(
                "ignore", message="The training dataset contains fewer samples"
            )
            store = _mk_activations_store(self.model, self.cfg, dataset)
        # sae-lens's factory does not pass these; the store reads them lazily, when
        # the first sequence is drawn, so setting them here is equivalent.
        store.disable_concat_sequences = self.cfg.disable_concat_sequences
        store.sequence_separator_token = self.cfg.sequence_separator_token
        if isinstance(store.dataset, Dataset):
            # the same rows, read a thousand at a time: `datasets` formats every
            # row on its own otherwise, which took a third of the caching loop
            # on a small model reading pretokenized rows
            store._iterate_raw_dataset = lambda: rows_in_batches(store)  # type: ignore[method-assign]
        # Watch documents going in and rows coming out, for the drop accounting.
        # Instance attributes shadow the methods, so the store's own restarts (a
        # new pass over the dataset) are watched too.
        ledger = self.ledger
        documents, sequences = (
            store._iterate_raw_dataset_tokens,
            store._iterate_tokenized_sequences,
        )
        store._iterate_raw_dataset_tokens = lambda: ledger.watch_documents(documents())  # type: ignore[method-assign]
        store._iterate_tokenized_sequences = lambda: ledger.watch_sequences(sequences())  # type: ignore[method-assign]
        store.iterable_sequences = store._iterate_tokenized_sequences()
        return store

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch, its dropped positions counted.

        Raises StopIteration when the dataset runs out (unless repeating is on),
        and remembers that it did."""
        repeat = self.cfg.on_dataset_exhausted == "repeat"
        try:
            acts_ND, toks_N = self._raw_batch(raise_on_epoch_end=not repeat)
        except StopIteration:
            self.exhausted = True
            raise
        if toks_N is None:
            raise ValueError("the activations store returned no token ids")
        n_rows = toks_N.numel() // self.context_size
        first_sequence = self.rows_used
        self.rows_used += n_rows
        sliced_off = n_rows * (self.cfg.context_size - self.context_size)
        if sliced_off:
            self.ledger.dropped[accounting.OUTSIDE_SEQPOS_SLICE] += sliced_off
        self.ledger.exclude(toks_N, self.exclude_ids)
        if self.cfg.store_token_positions:
            start = slice(*self.store.seqpos_slice).indices(self.cfg.context_size)[0]
            toks_N = with_positions(
                toks_N.view(n_rows, self.context_size), first_sequence, start
            )
        return drop_tokens(acts_ND, toks_N, self.exclude_ids)

    def _raw_batch(
        self, raise_on_epoch_end: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The store's next batch as `(acts_ND, toks_N)`: sae-lens's own for one
        hook on the host, or every hook's activations side by side from one
        forward pass (also for one hook on a GPU, where they stay: the same values
        as sae-lens's, float32, without its synchronous copy to pageable memory)."""
        store = self.store
        on_host = self.activations_device == store.device
        if self.cfg.hook_names is None and on_host:
            return store.get_raw_llm_batch(raise_on_epoch_end=raise_on_epoch_end)
        tokens_BT = store.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        hooks = [hook for hook, _ in self.hooks]
        stops = [extract_stop_at_layer_from_tlens_hook_name(h) for h in hooks]
        # the deepest hook's layer; None (run the whole model) if any hook has none
        stop = None if None in stops else max(s for s in stops if s is not None)
        # the same computation as sae-lens's `ActivationsStore.get_activations`,
        # for several hooks at once
        with torch.autocast(
            device_type=_get_input_token_device(self.model).type,
            dtype=torch.bfloat16,
            enabled=store.autocast_lm,
        ):
            cache = self.model.run_with_cache(
                tokens_BT,
                names_filter=hooks,
                stop_at_layer=stop,
                prepend_bos=False,
                **store.model_kwargs,
            )[1]
        seqpos = slice(*store.seqpos_slice)
        parts = []
        for hook in hooks:
            acts = cache[hook][:, seqpos]
            parts.append(
                acts.reshape(acts.shape[0], acts.shape[1], -1).to(
                    device=self.activations_device, dtype=torch.get_default_dtype()
                )
            )
        del cache
        width = sum(w for _, w in self.hooks)
        acts_ND = torch.cat(parts, dim=-1).reshape(-1, width)
        toks_N = tokens_BT[:, seqpos].reshape(-1).to(store.device)
        return acts_ND, toks_N

    # -- state --------------------------------------------------------------------

    def state(self) -> SourceState:
        return SourceState(
            rows_used=self.rows_used,
            exhausted=self.exhausted,
            counts=self.ledger.batch_counts(),
        )

    def restore(self, state: SourceState, quiet: bool = False) -> None:
        """Put the source where `state` was: skip the rows already used (without
        running the model) and take back the per-batch counts."""
        self._skip_rows(state.rows_used, quiet)
        if state.counts is not None:
            self.ledger.restore_batch_counts(state.counts)
        self.rows_used = state.rows_used
        self.exhausted = state.exhausted

    def _skip_rows(self, n_rows: int, quiet: bool) -> None:
        store = self.store
        for _ in tqdm(range(n_rows), desc="Skipping cached rows", disable=quiet):
            try:
                next(store.iterable_sequences)
            except StopIteration:  # a dataset read more than once ('repeat')
                store.iterable_sequences = store._iterate_tokenized_sequences()
                next(store.iterable_sequences)

    # -- the end ------------------------------------------------------------------

    def exhaustion(self) -> dict[str, Any]:
        """Apply `on_dataset_exhausted` and describe what happened."""
        cfg = self.cfg
        unused_rows = self.ledger.sequences - self.rows_used
        if unused_rows > 0 and self.exhausted:
            self.ledger.dropped[accounting.UNUSED_AT_EXHAUSTION] += (
                unused_rows * cfg.context_size
            )
        repeats = max(0, self.ledger.passes - 1)
        if self.exhausted:
            message = (
                f"The dataset ran out after {self.ledger.documents_read} documents, "
                f"before training_tokens={cfg.training_tokens} were cached."
            )
            if cfg.on_dataset_exhausted == "error":
                raise ValueError(
                    f"{message} Nothing was written. Use a larger dataset, lower "
                    "training_tokens, or set on_dataset_exhausted='warn' (keep what "
                    "was read) or 'repeat' (reuse documents)."
                )
            logger.warning(
                "%s The cache holds what was read; see the manifest.", message
            )
        elif repeats:
            logger.warning(
                "The dataset was read %d times (on_dataset_exhausted='repeat'): the "
                "cache repeats documents.",
                repeats + 1,
            )
        return {"exhausted": self.exhausted, "repeats": repeats}


def rows_in_batches(store: ActivationsStore) -> Iterator[Any]:
    """What sae-lens's `ActivationsStore._iterate_raw_dataset` yields (each row's
    tokens column, in order, counting `n_dataset_processed`), with rows formatted a
    batch at a time."""
    dataset = store.dataset
    if not isinstance(dataset, Dataset):
        raise TypeError("batched reading needs a map-style datasets.Dataset")
    column = store.tokens_column
    for batch in dataset.iter(batch_size=READ_BATCH_ROWS):
        for value in batch[column]:  # type: ignore[call-overload]
            yield value
            store.n_dataset_processed += 1

"""`CacheActivationsRunner`: sae-lens's runner, wired to the rooms of this package.

The data travels one way:
    ActivationsStore batch -> drop excluded tokens, re-pack rows (packing)
    -> permute tokens within the buffer (packing) -> writer thread -> shards in
    staging (shuffle, writer) -> manifest -> atomic swap into place (staging)
    -> optional Hub push (hub).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import CacheActivationsRunner as _UpstreamRunner
from sae_lens.cache_activations_runner import _mk_activations_store
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import accounting, checkpoints, hub, manifest, staging
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.packing import (
    RowPacker,
    Stream,
    drop_tokens,
    seeded_generator,
    token_order,
)
from sae_cache_ext.shuffle import (
    BucketShuffleSink,
    OrderedSink,
    Sink,
    choose_n_buckets,
)
from sae_cache_ext.validate import validate_output_path, validate_run
from sae_cache_ext.writer import BackgroundWriter, WriterStats, cache_features

logger = logging.getLogger(__name__)


class CacheActivationsRunner(_UpstreamRunner):
    """Caches activations like sae-lens's runner, and also:

    - passes `disable_concat_sequences` and `sequence_separator_token` to the store;
    - removes `exclude_special_tokens` positions and re-packs the rest into full rows;
    - with `shuffle=True`, writes the shuffle to disk (seeded, reproducible), and with
      `shuffle_across_sequences=True` also permutes tokens within each buffer;
    - builds the dataset in a staging folder and swaps it into place atomically, and
      cleans up after a crashed run at the same path.
    """

    cfg: CacheActivationsRunnerConfig

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        override_dataset: Dataset | None = None,
        override_model: HookedRootModule | None = None,
        quiet: bool = False,
    ) -> None:
        if not isinstance(cfg, CacheActivationsRunnerConfig):
            cfg = CacheActivationsRunnerConfig.from_upstream(cfg)
        self.cfg = cfg
        self.quiet = quiet
        self.layout = staging.Layout.for_output(_output_path(cfg))
        # Refuse a bad output path before the model is even loaded (a crashed swap's
        # backup is left for `run` to sort out).
        validate_output_path(cfg)
        if override_model is None:
            override_model = load_model(
                model_class_name=cfg.model_class_name,
                model_name=cfg.model_name,
                device=cfg.device,
                model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
            )
        if override_model is None:
            raise ValueError(f"could not load model_name={cfg.model_name!r}")
        self.model: HookedRootModule = override_model
        # Every check that needs the model or the data, before any forward pass.
        validate_run(cfg, self.model, override_dataset)
        if cfg.compile_llm:
            self.model = torch.compile(self.model, mode=cfg.llm_compilation_mode)  # type: ignore[assignment]
        self.exclude_ids = self._resolve_excluded_ids()
        tokenizer = getattr(self.model, "tokenizer", None)
        self.ledger = accounting.Ledger(
            context_size=cfg.context_size,
            disable_concat_sequences=cfg.disable_concat_sequences,
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
        )
        self.exhausted = False
        self._rows_used = 0
        self.activations_store = self._make_store(override_dataset)
        self.context_size = self._get_sliced_context_size(
            cfg.context_size, cfg.seqpos_slice
        )
        self.features = cache_features(
            cfg.hook_name, self.context_size, cfg.d_in, cfg.dtype
        )

    # -- set-up -----------------------------------------------------------------------

    def _resolve_excluded_ids(self) -> torch.Tensor | None:
        exclude = self.cfg.exclude_special_tokens
        if exclude is False:
            return None
        if exclude is True:
            tokenizer = getattr(self.model, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "exclude_special_tokens=True needs the model's tokenizer, but the "
                    "model has none. Pass an explicit list of token ids instead."
                )
            exclude = get_special_token_ids(tokenizer)
        return torch.tensor(sorted(set(exclude)), dtype=torch.long)

    def _make_store(self, override_dataset: Dataset | None) -> ActivationsStore:
        store = _mk_activations_store(self.model, self.cfg, override_dataset)
        # sae-lens's factory does not pass these; the store reads them lazily, when
        # the first sequence is drawn, so setting them here is equivalent.
        store.disable_concat_sequences = self.cfg.disable_concat_sequences
        store.sequence_separator_token = self.cfg.sequence_separator_token
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

    # -- the caching loop -------------------------------------------------------------

    @property
    def n_rows_to_cache(self) -> int:
        """`training_tokens` rounded down to whole rows: never more."""
        return self.cfg.training_tokens // self.context_size

    @property
    def n_tokens_to_cache(self) -> int:
        return self.n_rows_to_cache * self.context_size

    def rows_in_buffer(self, index: int) -> int:
        full = self.cfg.n_seq_in_buffer
        return max(0, min(full, self.n_rows_to_cache - index * full))

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from the store, its dropped positions counted.

        Raises StopIteration when the dataset runs out (unless repeating is on)."""
        repeat = self.cfg.on_dataset_exhausted == "repeat"
        acts_ND, toks_N = self.activations_store.get_raw_llm_batch(
            raise_on_epoch_end=not repeat
        )
        if toks_N is None:
            raise ValueError("the activations store returned no token ids")
        n_rows = toks_N.numel() // self.context_size
        self._rows_used += n_rows
        sliced_off = n_rows * (self.cfg.context_size - self.context_size)
        if sliced_off:
            self.ledger.dropped[accounting.OUTSIDE_SEQPOS_SLICE] += sliced_off
        self.ledger.exclude(toks_N, self.exclude_ids)
        return drop_tokens(acts_ND, toks_N, self.exclude_ids)

    def _buffer_rows(
        self, packer: RowPacker, index: int, progress: tqdm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Buffer `index` as `(acts_RTD, toks_RT, order_N)`: rows in generation
        order, and the seeded order to write its tokens in (None: as they are).

        Raises StopIteration when the dataset is exhausted with no row left."""

        def pull() -> tuple[torch.Tensor, torch.Tensor]:
            try:
                acts_ND, toks_N = self._next_batch()
            except StopIteration:
                self.exhausted = True
                raise
            if progress is not None and progress.total is not None:
                progress.update(min(toks_N.numel(), progress.total - progress.n))
            return acts_ND, toks_N

        acts_RTD, toks_RT = packer.fill(self.rows_in_buffer(index), pull)
        generator = (
            seeded_generator(self.cfg.seed, index, Stream.TOKEN_PERMUTATION)
            if self.cfg.shuffle_across_sequences
            else None
        )
        n_rows, context_size = toks_RT.shape
        return acts_RTD, toks_RT, token_order(n_rows, context_size, generator)

    def _make_sink(self, folder: Path) -> OrderedSink | BucketShuffleSink:
        args = (folder, self.features, self.cfg.hook_name, self.cfg.dtype)
        if self.cfg.shuffle:
            return BucketShuffleSink(
                *args,
                seed=self.cfg.seed,
                n_buckets=choose_n_buckets(self.cfg.n_buffers),
            )
        return OrderedSink(*args)

    def _cache_buffers(
        self, sink: Sink, packer: RowPacker, folder: Path, first: int = 0
    ) -> WriterStats:
        """The caching loop from buffer `first`: model forwards here, writes (and a
        checkpoint after each buffer) on the writer thread, at most two buffers
        alive at once."""
        with (
            BackgroundWriter(max_buffers=2) as writer,
            tqdm(
                total=self.n_tokens_to_cache,
                initial=min(first * self.cfg.n_seq_in_buffer, self.n_rows_to_cache)
                * self.context_size,
                desc="Caching activations",
                unit="tok",
                unit_scale=True,
                disable=self.quiet,
            ) as progress,
        ):
            for index in range(first, self.cfg.n_buffers):
                if self.exhausted:
                    break
                writer.reserve()
                try:
                    acts_RTD, toks_RT, order_N = self._buffer_rows(
                        packer, index, progress
                    )
                except StopIteration:
                    writer.release()
                    break
                progress_now = self._progress_snapshot(index + 1, packer)

                def job(i=index, a=acts_RTD, t=toks_RT, o=order_N, p=progress_now):
                    sink.write_buffer(i, a, t, o)
                    checkpoints.save(folder, {**p, "sink": sink.state()})

                writer.submit(job)
                del acts_RTD, toks_RT, order_N, job
        if packer.n_tokens:
            self.ledger.dropped[accounting.LEFTOVER_AT_END] += packer.n_tokens
        return writer.stats

    def _progress_snapshot(
        self, buffers_done: int, packer: RowPacker
    ) -> dict[str, Any]:
        """What a resumed run needs, as of the buffer just built (taken on the
        producer thread, saved by the writer once that buffer is on disk)."""
        return {
            "phase": "caching",
            "buffers_done": buffers_done,
            "rows_used": self._rows_used,
            "exhausted": self.exhausted,
            "counts": self.ledger.batch_counts(),
            "carry": packer.carried(),
        }

    def _resume_caching(
        self, checkpoint: dict[str, Any], sink: Sink, packer: RowPacker
    ) -> int:
        """Put the run back where the checkpoint left it; the next buffer's index."""
        sink.restore(checkpoint["sink"])
        self._skip_rows(checkpoint["rows_used"])
        self.ledger.restore_batch_counts(checkpoint["counts"])
        self._rows_used = checkpoint["rows_used"]
        self.exhausted = checkpoint["exhausted"]
        if checkpoint["carry"] is not None:
            packer.add(*checkpoint["carry"])
        logger.info("Resuming at buffer %d", checkpoint["buffers_done"])
        return checkpoint["buffers_done"]

    def _skip_rows(self, n_rows: int) -> None:
        """Advance the store past rows already cached, without running the model."""
        store = self.activations_store
        for _ in tqdm(range(n_rows), desc="Skipping cached rows", disable=self.quiet):
            try:
                next(store.iterable_sequences)
            except StopIteration:  # a dataset read more than once ('repeat')
                store.iterable_sequences = store._iterate_tokenized_sequences()
                next(store.iterable_sequences)

    def _on_exhausted(self) -> dict[str, Any]:
        """Apply `on_dataset_exhausted` and describe what happened."""
        cfg = self.cfg
        unused_rows = self.ledger.sequences - self._rows_used
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

    @torch.no_grad()
    def run(self) -> Dataset:
        cfg = self.cfg
        fingerprint = cfg.data_fingerprint
        swap_finished, resumable = staging.recover(
            self.layout, resume_fingerprint=fingerprint if cfg.resume else None
        )
        if (swap_finished or cfg.resume) and staging.is_our_finished_cache(
            self.layout.final
        ):
            done = manifest.read_manifest(self.layout.final)
            if done.get("fingerprint") == fingerprint:
                logger.warning(
                    "%s already holds this config's finished cache; returning it.",
                    self.layout.final,
                )
                return self._publish(Dataset.load_from_disk(str(self.layout.final)))
        staging.check_output_free(self.layout)

        with staging.staging_area(
            self.layout, fingerprint, reuse=resumable, keep_on_error=cfg.resume
        ) as folder:
            if not staging.is_our_finished_cache(folder):
                self._build(folder, checkpoints.load(folder) if resumable else None)
            checkpoints.remove(folder)  # a crash may have kept them past the manifest
            staging.swap_into_place(self.layout)
        logger.info("Cached activations at %s", self.layout.final)
        return self._publish(Dataset.load_from_disk(str(self.layout.final)))

    def _build(self, folder: Path, checkpoint: dict[str, Any] | None) -> None:
        """Cache, shuffle and describe the dataset in the staging `folder`,
        continuing from `checkpoint` if given."""
        cfg = self.cfg
        started = time.perf_counter()
        # Hashing the weights takes a second for a small model: do it beside the
        # caching loop, not after it.
        hasher = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sae-cache-ext-hash"
        )
        run_facts = hasher.submit(manifest.run_facts, self.model, cfg)
        hasher.shutdown(wait=False)
        marker = staging.read_marker(folder) or {}
        sink = self._make_sink(folder)
        if checkpoint is None:
            # a run killed before its first checkpoint may have left files
            sink.restore(sink.state())
        if checkpoint is not None and checkpoint["phase"] == "gather":
            if not isinstance(sink, BucketShuffleSink):
                raise ValueError(f"{folder} holds a shuffle, but shuffle=False now.")
            sink.resume_gather(checkpoint["sink"])
            facts = {**checkpoint["facts"], "resumed": True}
        else:
            packer = RowPacker(self.context_size)
            first = 0
            if checkpoint is not None:
                first = self._resume_caching(checkpoint, sink, packer)
            stats = self._cache_buffers(sink, packer, folder, first)
            facts = {
                "dataset_exhaustion": self._on_exhausted(),
                "accounting": self.ledger.summary(),
                "writer": {
                    "overflow_policy": "block the producer; never drop",
                    "stall_seconds": stats.stall_seconds,
                    "stalls": stats.stalls,
                    "max_queue_depth": stats.max_queue_depth,
                    "write_seconds": stats.write_seconds,
                },
                "caching_seconds": time.perf_counter() - started,
                "resumed": checkpoint is not None,
            }
        cached = time.perf_counter()
        shards = sink.finish(
            quiet=self.quiet,
            checkpoint=lambda state: checkpoints.save(
                folder, {"phase": "gather", "sink": state, "facts": facts}
            ),
        )
        if not shards:
            raise ValueError(
                "The dataset did not yield a single row of context_size="
                f"{cfg.context_size} tokens: use a larger dataset or a smaller "
                "context_size."
            )
        manifest.write_dataset_metadata(folder, shards, self.features)
        facts = dict(facts)
        caching_seconds = facts.pop("caching_seconds")
        manifest.finish_manifest(
            folder,
            marker,
            cfg.to_dict(),
            shards=shards,
            tokens=sum(s.rows for s in shards) * self.context_size,
            row_length=self.context_size,
            rows_are_sequences=not (
                cfg.shuffle_across_sequences or self.exclude_ids is not None
            ),
            run=run_facts.result(),
            excluded_token_ids=(
                [] if self.exclude_ids is None else self.exclude_ids.tolist()
            ),
            timings={
                "caching_seconds": caching_seconds,
                "finishing_seconds": time.perf_counter() - cached,
            },
            **facts,
        )
        checkpoints.remove(folder)

    def _publish(self, dataset: Dataset) -> Dataset:
        if self.cfg.hf_repo_id:
            hub.push_cache(
                dataset,
                self.cfg.to_dict(),
                repo_id=self.cfg.hf_repo_id,
                num_shards=self.cfg.hf_num_shards,
                private=self.cfg.hf_is_private_repo,
                revision=self.cfg.hf_revision,
                manifest_path=self.layout.final / staging.MARKER,
            )
        return dataset


def _output_path(cfg: CacheActivationsRunnerConfig) -> str:
    if cfg.new_cached_activations_path is None:  # the config always sets a default
        raise ValueError("new_cached_activations_path must be set.")
    return cfg.new_cached_activations_path

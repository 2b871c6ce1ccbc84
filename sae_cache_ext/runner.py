"""`CacheActivationsRunner`: sae-lens's runner, wired to the rooms of this package.

The data travels one way:
    ActivationsStore batch -> drop excluded tokens, re-pack rows (packing)
    -> permute tokens within the buffer (packing) -> writer thread -> shards in
    staging (shuffle, writer) -> manifest -> atomic swap into place (staging)
    -> optional Hub push (hub).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from datasets.distributed import split_dataset_by_node
from sae_lens import CacheActivationsRunner as _UpstreamRunner
from sae_lens.cache_activations_runner import _mk_activations_store
from sae_lens.load_model import load_model
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

from sae_cache_ext import accounting, checkpoints, hub, manifest, staging
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.distributed import (
    merge_rank_facts,
    rank_device,
    rows_of_rank,
    world_from_env,
)
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
from sae_cache_ext.validate import hook_width, validate_output_path, validate_run
from sae_cache_ext.writer import (
    BackgroundWriter,
    CacheSchema,
    WriterStats,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

# In a data-parallel run, rank r caches into `<staging>/rank-0000r/` and writes
# `done.json` there when its part is complete.
RANK_FOLDER_PREFIX = "rank-"
RANK_DONE = "done.json"


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
        self.world = world_from_env(cfg.device)
        cfg.device = rank_device(cfg.device, self.world)
        self.quiet = quiet or not self.world.is_main
        self.layout = staging.Layout.for_output(_output_path(cfg))
        # Refuse a bad output path before the model is even loaded (a crashed swap's
        # backup is left for `run` to sort out).
        # (only rank 0 of a data-parallel run: it sorts out an earlier run's
        # leftovers, which the others must not trip over meanwhile)
        if self.world.is_main:
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
        if self.world.distributed:
            override_dataset = self._dataset_of_this_rank(override_dataset)
        # Every check that needs the model or the data, before any forward pass.
        validate_run(cfg, self.model, override_dataset, check_output=self.world.is_main)
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
        self._rows_cached = 0
        self._n_buckets = choose_n_buckets(cfg.n_buffers)
        self.activations_store = self._make_store(override_dataset)
        self.context_size = self._get_sliced_context_size(
            cfg.context_size, cfg.seqpos_slice
        )
        self.schema = CacheSchema(
            hooks=tuple(self._hook_widths()),
            context_size=self.context_size,
            dtype=cfg.dtype,
            per_hook_folders=cfg.hook_names is not None,
        )
        # with hook_names, every hook's dataset once the run is done
        self.datasets: dict[str, Dataset] = {}

    # -- set-up -----------------------------------------------------------------------

    def _dataset_of_this_rank(self, dataset: Dataset | None) -> Dataset:
        """This rank's disjoint part of the dataset (`split_dataset_by_node`)."""
        cfg = self.cfg
        if dataset is None:
            if cfg.dataset_path is None:
                raise ValueError(
                    "dataset_path must be set (or pass override_dataset) to cache."
                )
            # what sae-lens's store would load
            dataset = load_dataset(  # type: ignore[assignment]
                cfg.dataset_path, split="train", streaming=cfg.streaming
            )
        return split_dataset_by_node(  # type: ignore[return-value]
            dataset,  # type: ignore[arg-type]
            rank=self.world.rank,
            world_size=self.world.size,
        )

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

    def _hook_widths(self) -> list[tuple[str, int]]:
        """`(hook, values per token)` for every hook cached: `d_in` for
        `hook_name`, the others from the model's config or, where that does not
        tell, from a forward pass over two tokens."""
        cfg = self.cfg
        widths = {cfg.hook_name: cfg.d_in}
        model = getattr(self.model, "_orig_mod", self.model)
        unknown = []
        for hook in cfg.all_hook_names:
            if hook in widths:
                continue
            known = hook_width(model, hook) if hasattr(model, "cfg") else None
            if known is None:
                unknown.append(hook)
            else:
                widths[hook] = known[0]
        if unknown:
            tokens = torch.zeros(
                (1, 2), dtype=torch.long, device=_get_input_token_device(self.model)
            )
            with torch.no_grad():
                cache = self.model.run_with_cache(
                    tokens, names_filter=unknown, prepend_bos=False
                )[1]
            for hook in unknown:
                widths[hook] = int(cache[hook][0, 0].numel())
        return [(hook, widths[hook]) for hook in cfg.all_hook_names]

    def _make_store(self, override_dataset: Dataset | None) -> ActivationsStore:
        store = _mk_activations_store(self.model, self.cfg, override_dataset)
        # sae-lens's factory does not pass these; the store reads them lazily, when
        # the first sequence is drawn, so setting them here is equivalent.
        store.disable_concat_sequences = self.cfg.disable_concat_sequences
        store.sequence_separator_token = self.cfg.sequence_separator_token
        if isinstance(store.dataset, Dataset):
            # the same rows, read a thousand at a time: `datasets` formats every
            # row on its own otherwise, which took a third of the caching loop
            # on a small model reading pretokenized rows
            store._iterate_raw_dataset = lambda: _rows_in_batches(store)  # type: ignore[method-assign]
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
        """This rank's rows: its share of `training_tokens` rounded down to whole
        rows (never more); all of them in a single process."""
        return rows_of_rank(self.cfg.training_tokens // self.context_size, self.world)

    def _n_buffers_of_rank(self, rank: int) -> int:
        total = self.cfg.training_tokens // self.context_size
        return -(-rows_of_rank(total, self.world, rank) // self.cfg.n_seq_in_buffer)

    @property
    def n_buffers(self) -> int:
        """This rank's buffers (the last may be partial)."""
        return self._n_buffers_of_rank(self.world.rank)

    @property
    def first_buffer_number(self) -> int:
        """The run-wide number of this rank's first buffer: the buffers of all
        ranks are numbered in rank order, and each buffer's randomness is seeded
        by its number, so the result depends on the config and world size only."""
        return sum(self._n_buffers_of_rank(r) for r in range(self.world.rank))

    @property
    def fingerprint(self) -> str:
        """`data_fingerprint`, and the world size when there are several ranks (the
        split of the data, so the cache, depends on it)."""
        return self.cfg.run_fingerprint(self.world.size)

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
        acts_ND, toks_N = self._raw_batch(raise_on_epoch_end=not repeat)
        if toks_N is None:
            raise ValueError("the activations store returned no token ids")
        n_rows = toks_N.numel() // self.context_size
        self._rows_used += n_rows
        sliced_off = n_rows * (self.cfg.context_size - self.context_size)
        if sliced_off:
            self.ledger.dropped[accounting.OUTSIDE_SEQPOS_SLICE] += sliced_off
        self.ledger.exclude(toks_N, self.exclude_ids)
        return drop_tokens(acts_ND, toks_N, self.exclude_ids)

    def _raw_batch(
        self, raise_on_epoch_end: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The store's next batch as `(acts_ND, toks_N)`: sae-lens's own for one
        hook, or every hook's activations side by side from one forward pass."""
        store = self.activations_store
        if self.cfg.hook_names is None:
            return store.get_raw_llm_batch(raise_on_epoch_end=raise_on_epoch_end)
        tokens_BT = store.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        hooks = [hook for hook, _ in self.schema.hooks]
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
                    device=store.device, dtype=torch.get_default_dtype()
                )
            )
        del cache
        acts_ND = torch.cat(parts, dim=-1).reshape(-1, self.schema.width)
        toks_N = tokens_BT[:, seqpos].reshape(-1).to(store.device)
        return acts_ND, toks_N

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
            seeded_generator(
                self.cfg.seed,
                self.first_buffer_number + index,
                Stream.TOKEN_PERMUTATION,
            )
            if self.cfg.shuffle_across_sequences
            else None
        )
        n_rows, context_size = toks_RT.shape
        return acts_RTD, toks_RT, token_order(n_rows, context_size, generator)

    def _make_sink(self, folder: Path) -> OrderedSink | BucketShuffleSink:
        if self.cfg.shuffle:
            return BucketShuffleSink(
                folder,
                self.schema,
                seed=self.cfg.seed,
                n_buckets=self._n_buckets,
            )
        return OrderedSink(folder, self.schema)

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
            for index in range(first, self.n_buffers):
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
                self._rows_cached += toks_RT.shape[0]
                progress_now = self._progress_snapshot(index + 1, packer)

                def job(i=index, a=acts_RTD, t=toks_RT, o=order_N, p=progress_now):
                    sink.write_buffer(self.first_buffer_number + i, a, t, o)
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
            "rows_cached": self._rows_cached,
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
        self._rows_cached = checkpoint["rows_cached"]
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
        if self.world.distributed:
            return self._run_data_parallel()
        cfg = self.cfg
        resumable, finished = self._recover()
        if finished:
            return self._publish(self._load_result())
        with staging.staging_area(
            self.layout, self.fingerprint, reuse=resumable, keep_on_error=cfg.resume
        ) as folder:
            if not staging.is_our_finished_cache(folder):
                self._build(folder, checkpoints.load(folder) if resumable else None)
            checkpoints.remove(folder)  # a crash may have kept them past the manifest
            staging.swap_into_place(self.layout)
        logger.info("Cached activations at %s", self.layout.final)
        return self._publish(self._load_result())

    def _recover(self) -> tuple[bool, bool]:
        """Clean up after an earlier run at the output path. Returns `(resumable,
        finished)`: whether its staging folder can be continued, and whether the
        output path already holds this config's finished cache."""
        cfg = self.cfg
        swap_finished, resumable = staging.recover(
            self.layout, resume_fingerprint=self.fingerprint if cfg.resume else None
        )
        if (swap_finished or cfg.resume) and staging.is_our_finished_cache(
            self.layout.final
        ):
            done = manifest.read_manifest(self.layout.final)
            if done.get("fingerprint") == self.fingerprint:
                logger.warning(
                    "%s already holds this config's finished cache; returning it.",
                    self.layout.final,
                )
                return resumable, True
        staging.check_output_free(self.layout)
        return resumable, False

    def _start_run_facts(self) -> Future[dict[str, Any]]:
        """How the activations are computed, for the manifest. Hashing the weights
        takes a second for a small model: do it beside the caching loop."""
        hasher = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sae-cache-ext-hash"
        )
        facts = hasher.submit(manifest.run_facts, self.model, self.cfg)
        hasher.shutdown(wait=False)
        return facts

    def _build(self, folder: Path, checkpoint: dict[str, Any] | None) -> None:
        """Cache, shuffle and describe the dataset in the staging `folder`,
        continuing from `checkpoint` if given."""
        run_facts = self._start_run_facts()
        marker = staging.read_marker(folder) or {}
        if checkpoint is not None and checkpoint["phase"] == "gather":
            sink = self._sink_from_gather_checkpoint(folder, checkpoint)
            facts = {**checkpoint["facts"], "resumed": True}
        else:
            sink, facts = self._cache(folder, checkpoint)
        self._finish(folder, sink, facts, marker, run_facts)

    def _sink_from_gather_checkpoint(
        self, folder: Path, checkpoint: dict[str, Any]
    ) -> Sink:
        sink = self._make_sink(folder)
        if isinstance(sink, BucketShuffleSink):
            sink.resume_gather(checkpoint["sink"])
        else:
            sink.restore(checkpoint["sink"])
        return sink

    def _cache(
        self, folder: Path, checkpoint: dict[str, Any] | None
    ) -> tuple[Sink, dict[str, Any]]:
        """Run the model over this process's buffers into a sink in `folder`
        (continuing from a caching `checkpoint` if given); the sink and the facts."""
        started = time.perf_counter()
        sink = self._make_sink(folder)
        packer = RowPacker(self.context_size)
        first = 0
        if checkpoint is None:
            # a run killed before its first checkpoint may have left files
            sink.restore(sink.state())
        else:
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
        return sink, facts

    # -- data-parallel ----------------------------------------------------------------

    def _run_data_parallel(self) -> Dataset:
        """Every rank caches its part into its own folder of the shared staging
        area; rank 0 then merges, shuffles, describes and swaps the whole."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            plan_sent = False
            try:
                resumable, finished = self._recover()
                if finished:
                    plan_sent = True
                    world.broadcast({"finished": True})
                else:
                    run_facts = self._start_run_facts()
                    with staging.staging_area(
                        self.layout,
                        self.fingerprint,
                        reuse=resumable,
                        keep_on_error=cfg.resume,
                    ) as folder:
                        plan = {
                            "folder": str(folder),
                            "resumable": resumable,
                            "built": staging.is_our_finished_cache(folder),
                            "n_buckets": self._n_buckets,
                        }
                        plan_sent = True
                        world.broadcast(plan)
                        if not plan["built"]:
                            self._cache_rank(folder, resumable)
                            world.barrier()  # every rank has cached its part
                            self._merge_ranks(folder, resumable, run_facts)
                        checkpoints.remove(folder)
                        staging.swap_into_place(self.layout)
                    logger.info("Cached activations at %s", self.layout.final)
            except BaseException as error:
                if not plan_sent:  # the other ranks are waiting for the plan
                    world.broadcast({"error": f"{type(error).__name__}: {error}"})
                raise
        else:
            plan = world.broadcast(None)
            if "error" in plan:
                raise RuntimeError(f"Rank 0 could not start the run: {plan['error']}")
            if not plan.get("finished") and not plan["built"]:
                self._n_buckets = plan["n_buckets"]
                self._cache_rank(Path(plan["folder"]), plan["resumable"])
                world.barrier()
        world.barrier()  # the cache is in place
        return self._publish(self._load_result())

    def _rank_folder(self, folder: Path, rank: int) -> Path:
        return folder / f"{RANK_FOLDER_PREFIX}{rank:05d}"

    def _cache_rank(self, folder: Path, resumable: bool) -> None:
        """This rank's part, cached into its own folder of the staging area, with
        `done.json` (its sink's files and its facts) written when complete."""
        if resumable and checkpoints.load(folder) is not None:
            return  # rank 0 had started merging: every part is cached
        rank_folder = self._rank_folder(folder, self.world.rank)
        done = rank_folder / RANK_DONE
        if resumable and done.exists():
            return
        rank_folder.mkdir(exist_ok=True)
        checkpoint = checkpoints.load(rank_folder) if resumable else None
        sink, facts = self._cache(rank_folder, checkpoint)
        sink.close()
        facts["rows"] = self._rows_cached
        write_json_atomic(done, {"sink": sink.state(), "facts": facts})

    def _merge_ranks(
        self, folder: Path, resumable: bool, run_facts: Future[dict[str, Any]]
    ) -> None:
        """Rank 0: move every rank's files into one sink (recorded in a checkpoint
        before the rank folders go), then gather, describe and finish."""
        marker = staging.read_marker(folder) or {}
        checkpoint = checkpoints.load(folder) if resumable else None
        if checkpoint is not None:
            sink = self._sink_from_gather_checkpoint(folder, checkpoint)
            facts = {**checkpoint["facts"], "resumed": True}
        else:
            ranks = [
                json.loads((self._rank_folder(folder, r) / RANK_DONE).read_text())
                for r in range(self.world.size)
            ]
            sink = self._make_sink(folder)
            if isinstance(sink, BucketShuffleSink):
                sink.restore(self._move_bucket_parts(folder, ranks))
            else:
                sink.restore(self._move_buffer_files(folder, ranks))
            facts = merge_rank_facts([rank["facts"] for rank in ranks], self.world)
            facts["resumed"] = facts["resumed"] or resumable
            checkpoints.save(
                folder,
                {
                    "phase": "gather",
                    "sink": {**sink.state(), "gather": None},
                    "facts": facts,
                },
            )
        # every rank's files are in the sink now (a resumed merge may find some
        # rank folders left by a crash in this very loop)
        for rank in range(self.world.size):
            shutil.rmtree(self._rank_folder(folder, rank), ignore_errors=True)
        self._finish(folder, sink, facts, marker, run_facts)

    def _move_bucket_parts(
        self, folder: Path, ranks: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Every rank's bucket files, moved into rank 0's bucket folder; bucket k's
        parts in rank order. Returns the merged sink state."""
        buckets = folder / "buckets"
        parts: dict[str, list[list[Any]]] = {}
        for rank, done in enumerate(ranks):
            source = self._rank_folder(folder, rank) / "buckets"
            for k, rank_parts in done["sink"]["parts"].items():
                for name, size in rank_parts:
                    merged = f"{RANK_FOLDER_PREFIX}{rank:05d}.{name}"
                    if (source / name).exists():
                        os.replace(source / name, buckets / merged)
                    parts.setdefault(k, []).append([merged, size])
        return {"session": 0, "parts": parts}

    def _move_buffer_files(
        self, folder: Path, ranks: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Every rank's buffer files (named by run-wide buffer number), moved into
        the staging folder. Returns the merged sink state."""
        shards: dict[str, Any] = {}
        for rank, done in enumerate(ranks):
            source = self._rank_folder(folder, rank)
            for number, infos in done["sink"]["shards"].items():
                for (subdir, _), info in zip(self.schema.outputs, infos, strict=True):
                    if (source / subdir / info["filename"]).exists():
                        os.replace(
                            source / subdir / info["filename"],
                            folder / subdir / info["filename"],
                        )
                shards[number] = infos
        return {"shards": shards}

    def _finish(
        self,
        folder: Path,
        sink: Sink,
        facts: dict[str, Any],
        marker: dict[str, Any],
        run_facts: Future[dict[str, Any]],
    ) -> None:
        """Gather the shuffle (if any), then write the dataset files and manifest."""
        cfg = self.cfg
        cached = time.perf_counter()
        shards = sink.finish(
            quiet=self.quiet,
            checkpoint=lambda state: checkpoints.save(
                folder, {"phase": "gather", "sink": state, "facts": facts}
            ),
        )
        if not any(shards.values()):
            raise ValueError(
                "The dataset did not yield a single row of context_size="
                f"{cfg.context_size} tokens: use a larger dataset or a smaller "
                "context_size."
            )
        facts = dict(facts)
        caching_seconds = facts.pop("caching_seconds")
        rows = sum(s.rows for s in next(iter(shards.values())))
        common = {
            "tokens": rows * self.context_size,
            "row_length": self.context_size,
            "rows_are_sequences": not (
                cfg.shuffle_across_sequences or self.exclude_ids is not None
            ),
            "run": run_facts.result(),
            "excluded_token_ids": (
                [] if self.exclude_ids is None else self.exclude_ids.tolist()
            ),
            "timings": {
                "caching_seconds": caching_seconds,
                "finishing_seconds": time.perf_counter() - cached,
            },
            **facts,
        }
        config = cfg.to_dict()
        for subdir, features in self.schema.outputs:
            manifest.write_dataset_metadata(folder / subdir, shards[subdir], features)
        if self.schema.per_hook_folders:
            # each hook's folder is a cache of its own (its manifest says which hook
            # and width); the top-level manifest, written last, marks the whole done
            for hook, width in self.schema.hooks:
                manifest.finish_manifest(
                    folder / hook,
                    marker,
                    {**config, "hook_name": hook, "d_in": width},
                    shards=shards[hook],
                    **{
                        **common,
                        "run": {**common["run"], "hook_name": hook, "d_in": width},
                    },
                )
            common["hook_datasets"] = {
                hook: {"folder": hook, "d_in": width, "rows": rows}
                for hook, width in self.schema.hooks
            }
            common["rows"] = rows
        manifest.finish_manifest(
            folder, marker, config, shards=shards.get("", []), **common
        )
        checkpoints.remove(folder)

    def _load_result(self) -> Dataset:
        """The finished dataset (`hook_name`'s, with `hook_names`; every hook's is
        then in `self.datasets`)."""
        final = self.layout.final
        if not self.schema.per_hook_folders:
            return Dataset.load_from_disk(str(final))
        self.datasets = {
            hook: Dataset.load_from_disk(str(final / hook))
            for hook, _ in self.schema.hooks
        }
        return self.datasets[self.cfg.hook_name]

    def _publish(self, dataset: Dataset) -> Dataset:
        if self.cfg.hf_repo_id and self.world.is_main:
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


READ_BATCH_ROWS = 1024


def _rows_in_batches(store: ActivationsStore) -> Iterator[Any]:
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


def _output_path(cfg: CacheActivationsRunnerConfig) -> str:
    if cfg.new_cached_activations_path is None:  # the config always sets a default
        raise ValueError("new_cached_activations_path must be set.")
    return cfg.new_cached_activations_path

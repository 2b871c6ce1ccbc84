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
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import CacheActivationsRunner as _UpstreamRunner
from sae_lens.cache_activations_runner import _mk_activations_store
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import hub, manifest, staging
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.packing import (
    RowPacker,
    Stream,
    drop_tokens,
    permute_tokens,
    seeded_generator,
)
from sae_cache_ext.shuffle import BucketShuffleSink, OrderedSink, choose_n_buckets
from sae_cache_ext.writer import BackgroundWriter, cache_features

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
        # Refuse a bad output path before the model is even loaded (unless a crashed
        # swap left a backup: `run` sorts that out first).
        if not self.layout.backup.exists():
            staging.check_output_free(self.layout)
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
        if cfg.compile_llm:
            self.model = torch.compile(self.model, mode=cfg.llm_compilation_mode)  # type: ignore[assignment]
        self.exclude_ids = self._resolve_excluded_ids()
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
        store.iterable_sequences = store._iterate_tokenized_sequences()
        return store

    # -- the caching loop -------------------------------------------------------------

    @property
    def n_tokens_to_cache(self) -> int:
        return self.cfg.n_buffers * self.cfg.n_seq_in_buffer * self.context_size

    def _buffer_rows(
        self, packer: RowPacker, index: int, progress: tqdm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer `index` as `(acts_RTD, toks_RT)`: pull batches until a buffer's
        worth of kept tokens is packed, then permute tokens if asked to."""
        need = self.cfg.n_seq_in_buffer * self.context_size
        while packer.n_tokens < need:
            acts_ND, toks_N = self.activations_store.get_raw_llm_batch()
            if toks_N is None:
                raise ValueError("the activations store returned no token ids")
            before = packer.n_tokens
            packer.add(*drop_tokens(acts_ND, toks_N, self.exclude_ids))
            if progress is not None:
                progress.update(min(packer.n_tokens, need) - min(before, need))
        acts_RTD, toks_RT = packer.take_rows(self.cfg.n_seq_in_buffer)
        if self.cfg.shuffle_across_sequences:
            generator = seeded_generator(self.cfg.seed, index, Stream.TOKEN_PERMUTATION)
            acts_RTD, toks_RT = permute_tokens(acts_RTD, toks_RT, generator)
        return acts_RTD, toks_RT

    def _make_sink(self, folder: Path) -> OrderedSink | BucketShuffleSink:
        args = (folder, self.features, self.cfg.hook_name, self.cfg.dtype)
        if self.cfg.shuffle:
            return BucketShuffleSink(
                *args,
                seed=self.cfg.seed,
                n_buckets=choose_n_buckets(self.cfg.n_buffers),
            )
        return OrderedSink(*args)

    @torch.no_grad()
    def run(self) -> Dataset:
        cfg = self.cfg
        swap_finished = staging.recover(self.layout)
        if swap_finished and staging.is_our_finished_cache(self.layout.final):
            done = manifest.read_manifest(self.layout.final)
            if done.get("fingerprint") == cfg.data_fingerprint:
                logger.warning(
                    "%s already holds this config's finished cache; returning it.",
                    self.layout.final,
                )
                return self._publish(Dataset.load_from_disk(str(self.layout.final)))
        staging.check_output_free(self.layout)

        started = time.perf_counter()
        with staging.staging_area(self.layout, cfg.data_fingerprint) as folder:
            marker = staging.read_marker(folder) or {}
            sink = self._make_sink(folder)
            packer = RowPacker(self.context_size)
            with (
                BackgroundWriter(max_pending=1) as writer,
                tqdm(
                    total=self.n_tokens_to_cache,
                    desc="Caching activations",
                    unit="tok",
                    unit_scale=True,
                    disable=self.quiet,
                ) as progress,
            ):
                for index in range(cfg.n_buffers):
                    acts_RTD, toks_RT = self._buffer_rows(packer, index, progress)
                    writer.submit(
                        lambda i=index, a=acts_RTD, t=toks_RT: sink.write_buffer(
                            i, a, t
                        )
                    )
                    del acts_RTD, toks_RT
            cached = time.perf_counter()
            shards = sink.finish(quiet=self.quiet)
            manifest.write_dataset_metadata(folder, shards, self.features)
            manifest.finish_manifest(
                folder,
                marker,
                cfg.to_dict(),
                shards=shards,
                tokens=sum(s.rows for s in shards) * self.context_size,
                excluded_token_ids=(
                    [] if self.exclude_ids is None else self.exclude_ids.tolist()
                ),
                writer={
                    "stall_seconds": writer.stats.stall_seconds,
                    "stalls": writer.stats.stalls,
                    "max_queue_depth": writer.stats.max_queue_depth,
                },
                timings={
                    "caching_seconds": cached - started,
                    "finishing_seconds": time.perf_counter() - cached,
                },
            )
            staging.swap_into_place(self.layout)
        logger.info("Cached activations at %s", self.layout.final)
        return self._publish(Dataset.load_from_disk(str(self.layout.final)))

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

"""`CacheActivationsRunner`: sae-lens's runner, a thin shell wiring the rooms.

The data travels one way:
    source (sae-lens's store, one forward for every hook, exclusions)
    -> producer (buffers of whole rows, seeded token order)
    -> pipeline (background writer -> sink, checkpointed; gather; manifest)
    -> lifecycle (staging folder -> atomic swap into place) -> Hub push (hub).
Data-parallel runs go through `parallel`, which runs the same pipeline per rank.
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset, load_dataset
from datasets.distributed import split_dataset_by_node
from sae_lens import CacheActivationsRunner as _UpstreamRunner
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import checkpoints, hub, lifecycle, staging
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.distributed import World, rank_device, world_from_env
from sae_cache_ext.inputs import Inputs, dataset_fingerprint, device_kind
from sae_cache_ext.parallel import run_data_parallel
from sae_cache_ext.pipeline import Pipeline
from sae_cache_ext.plan import BufferPlan
from sae_cache_ext.producer import Producer
from sae_cache_ext.shuffle import choose_n_buckets
from sae_cache_ext.source import ActivationSource, excluded_ids, hook_widths
from sae_cache_ext.validate import validate_output_path, validate_run
from sae_cache_ext.writer import CacheSchema

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
        self.world = world_from_env(cfg.device, cfg.distributed_timeout_minutes)
        cfg.device = rank_device(cfg.device, self.world)
        self.quiet = quiet or not self.world.is_main
        self.layout = staging.Layout.for_output(_output_path(cfg))
        # Refuse a bad output path before the model is even loaded (a crashed swap's
        # backup is left for `run` to sort out); only rank 0 of a data-parallel run:
        # it sorts out an earlier run's leftovers, which the others must not trip
        # over meanwhile.
        if self.world.is_main:
            validate_output_path(cfg, self.world.size)
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
            override_dataset = _dataset_of_rank(cfg, override_dataset, self.world)
        # Every check that needs the model or the data, before any forward pass.
        validate_run(
            cfg,
            self.model,
            override_dataset,
            check_output=self.world.is_main,
            world_size=self.world.size,
        )
        if cfg.compile_llm:
            self.model = torch.compile(self.model, mode=cfg.llm_compilation_mode)  # type: ignore[assignment]
        self.context_size = self._get_sliced_context_size(
            cfg.context_size, cfg.seqpos_slice
        )
        self.schema = CacheSchema(
            hooks=tuple(hook_widths(cfg, self.model)),
            context_size=self.context_size,
            dtype=cfg.dtype,
            per_hook_folders=cfg.hook_names is not None,
            token_positions=cfg.store_token_positions,
        )
        self.source = ActivationSource(
            cfg,
            self.model,
            override_dataset,
            self.schema.hooks,
            self.context_size,
            excluded_ids(cfg, self.model),
        )
        self.plan = BufferPlan(
            total_rows=cfg.training_tokens // self.context_size,
            rows_per_buffer=cfg.n_seq_in_buffer,
            context_size=self.context_size,
            world=self.world,
        )
        self.producer = Producer(
            self.source, self.plan, cfg.seed, cfg.shuffle_across_sequences
        )
        self.pipeline = Pipeline(
            cfg,
            self.model,
            self.schema,
            self.plan,
            self.producer,
            n_buckets=choose_n_buckets(
                cfg.n_buffers, self.plan.n_tokens * self.schema.bytes_per_token
            ),
            quiet=self.quiet,
        )
        # with hook_names, every hook's dataset once the run is done
        self.datasets: dict[str, Dataset] = {}

    @property
    def activations_store(self) -> ActivationsStore:  # type: ignore[override]
        """sae-lens's store the activations come from (upstream's attribute)."""
        return self.source.store

    @property
    def fingerprint(self) -> str:
        """`data_fingerprint`, and the world size when there are several ranks (the
        split of the data, so the cache, depends on it)."""
        return self.cfg.run_fingerprint(self.world.size)

    def identity(self) -> lifecycle.Run:
        """This run at its output path: config, inputs (the weights are hashed
        here) and the plan's derived values."""
        cfg, plan = self.cfg, self.plan
        facts = self.pipeline.start_run_facts().result()
        return lifecycle.Run(
            layout=self.layout,
            fingerprint=self.fingerprint,
            config=cfg.to_dict(),
            inputs=Inputs(
                dataset=dataset_fingerprint(
                    self.source.store.dataset, cfg.dataset_path
                ),
                weights_sha256=facts["weights_sha256"],
                device=device_kind(self.model),
            ),
            plan={
                "n_buckets": self.pipeline.n_buckets,
                "rows_per_buffer": plan.rows_per_buffer,
                "context_size": plan.context_size,
                "rows_of_ranks": [plan.rows_of(r) for r in range(self.world.size)],
            },
            resume=cfg.resume,
            lease_stale_seconds=cfg.lease_stale_seconds,
            wait_for_lease=cfg.wait_for_lease,
        )

    @torch.no_grad()
    def run(self) -> Dataset:
        if self.world.distributed:
            run_data_parallel(
                self.pipeline,
                self.world,
                self.identity() if self.world.is_main else None,
            )
            return self._publish(self._load_result())
        run = self.identity()
        with lifecycle.owned(run) as lease:
            recovery = lifecycle.recover(run, lease)
            if not recovery.finished:
                if recovery.plan is not None:  # the kept run's, e.g. its buckets
                    self.pipeline.n_buckets = recovery.plan["n_buckets"]
                with lifecycle.staged(run, recovery, lease) as folder:
                    if not staging.is_our_finished_cache(folder):
                        checkpoint = (
                            checkpoints.load(folder) if recovery.resumable else None
                        )
                        self.pipeline.build(folder, checkpoint)
        return self._publish(self._load_result())

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


def _dataset_of_rank(
    cfg: CacheActivationsRunnerConfig, dataset: Dataset | None, world: World
) -> Dataset:
    """This rank's disjoint part of the dataset (`split_dataset_by_node`)."""
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
        rank=world.rank,
        world_size=world.size,
    )


def _output_path(cfg: CacheActivationsRunnerConfig) -> str:
    if cfg.new_cached_activations_path is None:  # the config always sets a default
        raise ValueError("new_cached_activations_path must be set.")
    return cfg.new_cached_activations_path

"""The pipeline: producer -> background writer -> sink, checkpointed after each step.

`Pipeline.build` makes one cache in a staging folder: it caches every buffer (the
model runs here, writes and checkpoints on the writer thread, at most two buffers
alive at once), then finishes the sink (the shuffle's gather, checkpointed after
each shard) and describes the result (metadata files and manifest). A run that
stopped continues from its checkpoint, in either phase, with the same bytes.

Each buffer's statistics are added on the writer thread, as stored, before it is
written; one holding NaN or inf is refused there (or warned about) by
`statistics.check_finite`, so the model's thread never waits for either. The first
buffer also gives the numeric envelope (`envelope.measure`), here. Both travel in
the checkpoint.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext import checkpoints, envelope, manifest, staging
from sae_cache_ext.checkpoints import Checkpoint, Phase
from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.packing import token_ids_of
from sae_cache_ext.plan import BufferPlan
from sae_cache_ext.producer import Buffer, Producer
from sae_cache_ext.shuffle import BucketShuffleSink, OrderedSink, Shards, Sink
from sae_cache_ext.statistics import CacheStatistics, check_finite
from sae_cache_ext.writer import BackgroundWriter, CacheSchema, WriterStats

logger = logging.getLogger(__name__)


@dataclass
class CachingFacts:
    """What the caching phase recorded, for the manifest."""

    dataset_exhaustion: dict[str, Any]
    accounting: dict[str, Any]
    writer: dict[str, Any]
    caching_seconds: float
    resumed: bool
    rows: int  # rows this process cached
    statistics: dict[str, Any] | None  # `CacheStatistics.to_json()`
    envelope: dict[str, Any] | None  # `Envelope.to_json()`, or why it was skipped

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def writer_facts(stats: WriterStats) -> dict[str, Any]:
    return {
        "overflow_policy": "block the producer; never drop",
        "stall_seconds": stats.stall_seconds,
        "stalls": stats.stalls,
        "max_queue_depth": stats.max_queue_depth,
        "write_seconds": stats.write_seconds,
    }


def excluded_tokens(
    model: HookedRootModule, exclude_ids: torch.Tensor | None
) -> dict[str, Any]:
    """`{"excluded_tokens": {id: token string}}` when ids are excluded (else {})."""
    tokenizer = getattr(model, "tokenizer", None)
    if exclude_ids is None or tokenizer is None:
        return {}
    ids = [int(i) for i in exclude_ids.tolist()]
    return {
        "excluded_tokens": {
            str(i): str(tokenizer.convert_ids_to_tokens(i)) for i in ids
        }
    }


@dataclass
class Watch:
    """What the caching loop learns about the activations as it goes."""

    statistics: CacheStatistics
    envelope: dict[str, Any] | None = None  # once measured, or skipped
    warned: bool = False  # about non-finite values


class Pipeline:
    """Builds one cache (or one rank's part of it) in a staging folder."""

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        model: HookedRootModule,
        schema: CacheSchema,
        plan: BufferPlan,
        producer: Producer,
        n_buckets: int,
        quiet: bool = False,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.schema = schema
        self.plan = plan
        self.producer = producer
        self.n_buckets = n_buckets  # of the persisted shuffle (unused without it)
        self.quiet = quiet
        self._run_facts: Future[dict[str, Any]] | None = None

    def start_run_facts(self) -> Future[dict[str, Any]]:
        """How the activations are computed, for the manifest. Hashing the weights
        takes a second for a small model: do it beside the caching loop."""
        if self._run_facts is None:
            hasher = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sae-cache-ext-hash"
            )
            self._run_facts = hasher.submit(manifest.run_facts, self.model, self.cfg)
            hasher.shutdown(wait=False)
        return self._run_facts

    def make_sink(self, folder: Path) -> Sink:
        if self.cfg.shuffle:
            return BucketShuffleSink(
                folder, self.schema, seed=self.cfg.seed, n_buckets=self.n_buckets
            )
        return OrderedSink(folder, self.schema)

    def build(self, folder: Path, checkpoint: Checkpoint | None) -> None:
        """Cache, finish and describe the dataset in `folder`, continuing from
        `checkpoint` if given."""
        self.start_run_facts()
        marker = staging.read_marker(folder) or {}
        if checkpoint is not None and checkpoint.phase is Phase.GATHER:
            sink = self.resume_sink(folder, checkpoint)
            facts = {**(checkpoint.facts or {}), "resumed": True}
        else:
            sink, caching = self.cache(folder, checkpoint)
            facts = caching.to_json()
            del facts["rows"]
            # caching is complete: a failure from here on keeps the folder
            sink.sync()
            checkpoints.save(
                folder, Checkpoint(Phase.GATHER, sink.state(), facts=facts)
            )
        self.finish(folder, sink, facts, marker)

    def resume_sink(self, folder: Path, checkpoint: Checkpoint) -> Sink:
        sink = self.make_sink(folder)
        sink.restore(checkpoint.sink)  # type: ignore[arg-type]
        return sink

    # -- caching ----------------------------------------------------------------------

    def cache(
        self, folder: Path, checkpoint: Checkpoint | None
    ) -> tuple[Sink, CachingFacts]:
        """Run the model over this process's buffers into a sink in `folder`
        (continuing from a caching `checkpoint` if given)."""
        started = time.perf_counter()
        sink = self.make_sink(folder)
        watch = Watch(CacheStatistics.empty(self.schema.hooks))
        if checkpoint is None:
            # a run killed before its first checkpoint may have left files
            sink.restore(sink.state())  # type: ignore[arg-type]
        else:
            sink.restore(checkpoint.sink)  # type: ignore[arg-type]
            if checkpoint.producer is not None:
                self.producer.restore(checkpoint.producer, quiet=self.quiet)
            if checkpoint.statistics is not None:
                watch.statistics = checkpoint.statistics
            watch.envelope = checkpoint.envelope
        stats = self._write_buffers(sink, folder, watch)
        self.producer.finish()
        source = self.producer.source
        facts = CachingFacts(
            dataset_exhaustion=source.exhaustion(),
            accounting=source.ledger.summary(),
            writer=writer_facts(stats),
            caching_seconds=time.perf_counter() - started,
            resumed=checkpoint is not None,
            rows=self.producer.rows_cached,
            statistics=watch.statistics.to_json(),
            envelope=watch.envelope,
        )
        return sink, facts

    def _write_buffers(self, sink: Sink, folder: Path, watch: Watch) -> WriterStats:
        """The caching loop: the producer builds each buffer here, the writer
        thread writes it and then saves the checkpoint as of that buffer."""
        plan, producer = self.plan, self.producer
        first = producer.first
        with (
            BackgroundWriter(max_buffers=2) as writer,
            tqdm(
                total=plan.n_tokens,
                initial=min(first * plan.rows_per_buffer, plan.n_rows)
                * plan.context_size,
                desc="Caching activations",
                unit="tok",
                unit_scale=True,
                disable=self.quiet,
            ) as progress,
        ):
            buffers = producer.buffers(progress)
            while True:
                writer.reserve()
                item = next(buffers, None)
                if item is None:
                    writer.release()
                    break
                buffer, state = item
                if watch.envelope is None:
                    watch.envelope = self._measure_envelope(buffer)

                def job(b=buffer, s=state) -> None:
                    started = time.perf_counter()
                    broken = watch.statistics.add(b.acts_RTD, self.schema.dtype)
                    watch.statistics.seconds += time.perf_counter() - started
                    if broken:
                        self._refuse_or_warn(b, watch)
                    sink.write_buffer(b.number, b.acts_RTD, b.toks_RT, b.order_N)
                    sink.sync()  # what the checkpoint counts is on disk first
                    checkpoints.save(
                        folder,
                        Checkpoint(
                            Phase.CACHING,
                            sink.state(),
                            producer=s,
                            statistics=watch.statistics,
                            envelope=watch.envelope,
                        ),
                    )

                writer.submit(job)
                del buffer, state, item, job
        return writer.stats

    def _refuse_or_warn(self, buffer: Buffer, watch: Watch) -> None:
        """`buffer` holds NaN or inf: stop (`on_non_finite="error"`), or warn once
        and keep them."""
        messages = check_finite(
            buffer.acts_RTD,
            self.schema.hooks,
            self.schema.dtype,
            self.cfg.on_non_finite,
            buffer.number,
        )
        if messages and not watch.warned:
            watch.warned = True
            for message in messages:
                logger.warning("%s Kept (on_non_finite='warn').", message)

    def _measure_envelope(self, buffer: Buffer) -> dict[str, Any] | None:
        cfg = self.cfg
        reason = envelope.skip_reason(
            excluding=self.producer.source.exclude_ids is not None,
            sliced=self.plan.context_size != cfg.context_size,
        )
        if reason is not None:
            return {"skipped": reason}
        measured = envelope.measure(
            self.model,
            buffer.acts_RTD,
            token_ids_of(buffer.toks_RT, self.schema.token_positions),
            self.schema.hooks,
            self.schema.dtype,
            cfg.model_batch_size,
            buffer.number,
            model_kwargs=cfg.model_kwargs,
            autocast=cfg.autocast_lm,
        )
        return None if measured is None else measured.to_json()

    # -- finishing --------------------------------------------------------------------

    def finish(
        self, folder: Path, sink: Sink, facts: dict[str, Any], marker: dict[str, Any]
    ) -> None:
        """Gather the shuffle (if any), then write the dataset files and manifest."""
        started = time.perf_counter()
        shards = sink.finish(
            quiet=self.quiet,
            checkpoint=lambda state: checkpoints.save(
                folder, Checkpoint(Phase.GATHER, state, facts=facts)
            ),
        )
        self.describe(folder, shards, facts, marker, started)

    def describe(
        self,
        folder: Path,
        shards: Shards,
        facts: dict[str, Any],
        marker: dict[str, Any],
        started: float,
    ) -> None:
        """Write the dataset files and manifest of the finished `shards` (the
        finishing began at `time.perf_counter()` = `started`)."""
        cfg = self.cfg
        if not any(shards.values()):
            raise ValueError(
                "The dataset did not yield a single row of context_size="
                f"{cfg.context_size} tokens: use a larger dataset or a smaller "
                "context_size."
            )
        facts = dict(facts)
        caching_seconds = facts.pop("caching_seconds")
        statistics = facts.pop("statistics", None)
        if statistics is not None:
            statistics = CacheStatistics.from_json(statistics)
        measured = facts.get("envelope") or {}
        facts["envelope"] = {
            k: v for k, v in measured.items() if k != "seconds"
        } or None  # its time goes to the timings
        rows = sum(s.rows for s in next(iter(shards.values())))
        exclude_ids = self.producer.source.exclude_ids
        described = {
            "tokens": rows * self.plan.context_size,
            "row_length": self.plan.context_size,
            "rows_are_sequences": not (
                cfg.shuffle_across_sequences or exclude_ids is not None
            ),
            "run": self.start_run_facts().result(),
            "excluded_token_ids": [] if exclude_ids is None else exclude_ids.tolist(),
            **excluded_tokens(self.model, exclude_ids),
            "timings": {
                "caching_seconds": caching_seconds,
                "finishing_seconds": time.perf_counter() - started,
                "statistics_seconds": None
                if statistics is None
                else statistics.seconds,
                "envelope_seconds": measured.get("seconds"),
            },
            **facts,
            "statistics": None if statistics is None else statistics.summary(),
        }
        manifest.write_cache_description(
            folder, self.schema, shards, marker, cfg.to_dict(), described
        )
        checkpoints.remove(folder)

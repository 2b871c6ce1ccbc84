"""The producer: buffers of whole rows from the source, and the order of their tokens.

Each buffer is filled from the source's batches (tokens left over from one buffer are
carried into the next, never dropped), then given the seeded order its tokens are
written in (`shuffle_across_sequences`; generation order otherwise). A buffer's
content depends only on the config, the inputs and its run-wide number. Shape
suffixes: R rows, T tokens per row, D values per token, N tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sae_cache_ext import accounting
from sae_cache_ext.hoststage import HostStager
from sae_cache_ext.packing import RowPacker, Stream, seeded_generator, token_order
from sae_cache_ext.plan import BufferPlan
from sae_cache_ext.source import ActivationSource, SourceState


@dataclass
class Buffer:
    """One buffer, ready for a sink."""

    number: int  # run-wide: seeds its randomness and names its files
    acts_RTD: torch.Tensor
    toks_RT: torch.Tensor  # (R, T) ids, or (R, T, 3) records with positions
    order_N: torch.Tensor | None  # the order to write its tokens in (None: as is)


@dataclass
class ProducerState:
    """Where the producer is, as of the last buffer it built."""

    buffers_done: int = 0  # this rank's buffers built so far
    rows_cached: int = 0
    source: SourceState | None = None
    carry: tuple[torch.Tensor, torch.Tensor] | None = None  # pairs for the next one


class Producer:
    """Builds this rank's buffers in order, from `first` on."""

    def __init__(
        self,
        source: ActivationSource,
        plan: BufferPlan,
        seed: int,
        shuffle_across_sequences: bool,
    ) -> None:
        self.source = source
        self.plan = plan
        self.seed = seed
        self.shuffle_across_sequences = shuffle_across_sequences
        # on a CUDA model, batches go straight from the GPU into pinned buffers
        self.packer = RowPacker(
            plan.context_size, HostStager.for_device(source.activations_device)
        )
        self.rows_cached = 0
        self.rows_restored = 0  # rows an earlier run cached (`restore`)
        self.first = 0

    def buffer(self, index: int, progress: tqdm | None = None) -> Buffer:
        """This rank's buffer `index`.

        Raises StopIteration when the dataset is exhausted with no row left."""

        def pull() -> tuple[torch.Tensor, torch.Tensor]:
            acts_ND, toks_N = self.source.next_batch()
            if progress is not None and progress.total is not None:
                progress.update(min(toks_N.shape[0], progress.total - progress.n))
            return acts_ND, toks_N

        acts_RTD, toks_RT = self.packer.fill(self.plan.rows_in_buffer(index), pull)
        number = self.plan.first_buffer_number + index
        generator = (
            seeded_generator(self.seed, number, Stream.TOKEN_PERMUTATION)
            if self.shuffle_across_sequences
            else None
        )
        n_rows, context_size = toks_RT.shape[:2]
        self.rows_cached += n_rows
        order_N = token_order(n_rows, context_size, generator)
        return Buffer(number, acts_RTD, toks_RT, order_N)

    def buffers(
        self, progress: tqdm | None = None
    ) -> Iterator[tuple[Buffer, ProducerState]]:
        """Every buffer still to build, each with the state as of it."""
        for index in range(self.first, self.plan.n_buffers):
            if self.source.exhausted:
                return
            try:
                buffer = self.buffer(index, progress)
            except StopIteration:
                return
            yield buffer, self.state(index + 1)

    def state(self, buffers_done: int) -> ProducerState:
        return ProducerState(
            buffers_done=buffers_done,
            rows_cached=self.rows_cached,
            source=self.source.state(),
            carry=self.packer.carried(),
        )

    def restore(self, state: ProducerState, quiet: bool = False) -> None:
        """Continue after the buffer `state` was taken at."""
        if state.source is not None:
            self.source.restore(state.source, quiet)
        self.rows_cached = self.rows_restored = state.rows_cached
        if state.carry is not None:
            self.packer.add(*state.carry)
        self.first = state.buffers_done

    def finish(self) -> None:
        """Count the tokens left over at the end (too few for a whole row)."""
        if self.packer.n_tokens:
            self.source.ledger.dropped[accounting.LEFTOVER_AT_END] += (
                self.packer.n_tokens
            )

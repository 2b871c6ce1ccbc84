"""The plan of a run: how many rows, how they split into buffers and across ranks.

Everything here is derived from the config and the world size alone, so every rank
(and every resumed run) derives the same plan. Buffers are numbered run-wide, in
rank order, and each buffer's randomness is seeded by its number.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_cache_ext.distributed import World, rows_of_rank


@dataclass(frozen=True)
class BufferPlan:
    """Rows and buffers of one rank of a run (the only rank of a single process)."""

    total_rows: int  # of the whole run: `training_tokens // context_size`
    rows_per_buffer: int  # `n_seq_in_buffer`
    context_size: int  # tokens per row, after `seqpos_slice`
    world: World

    def rows_of(self, rank: int) -> int:
        return rows_of_rank(self.total_rows, self.world, rank)

    def buffers_of(self, rank: int) -> int:
        return -(-self.rows_of(rank) // self.rows_per_buffer)

    @property
    def n_rows(self) -> int:
        """This rank's rows: its share of `training_tokens` rounded down to whole
        rows (never more); all of them in a single process."""
        return self.rows_of(self.world.rank)

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.context_size

    @property
    def n_buffers(self) -> int:
        """This rank's buffers (the last may be partial)."""
        return self.buffers_of(self.world.rank)

    @property
    def first_buffer_number(self) -> int:
        """The run-wide number of this rank's first buffer."""
        return sum(self.buffers_of(r) for r in range(self.world.rank))

    def rows_in_buffer(self, index: int) -> int:
        """Rows of this rank's buffer `index` (0 past the last)."""
        full = self.rows_per_buffer
        return max(0, min(full, self.n_rows - index * full))

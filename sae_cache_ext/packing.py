"""Pure tensor functions: token exclusion with carry-over, per-buffer permutations.

Nothing here touches a disk or a model. Token ids come as `toks_N` / `toks_RT`, or,
with `store_token_positions`, as `(N, 3)` / `(R, T, 3)` records `(id, sequence,
position)` that move exactly as the ids do (`token_ids_of` gives the ids). Shape
suffixes:
    N  tokens (flattened), R  rows, T  tokens per row (context size after slicing),
    D  d_in, K  buckets of the persisted row shuffle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

import einops
import torch


class Stream(IntEnum):
    """Independent random streams drawn from one `(seed, index)` pair."""

    TOKEN_PERMUTATION = 0
    BUCKET_ASSIGNMENT = 1
    BUCKET_PERMUTATION = 2


def seeded_generator(seed: int, index: int, stream: Stream) -> torch.Generator:
    """A CPU `torch.Generator` that depends only on `(seed, index, stream)`.

    Buffer `index`'s randomness never depends on the buffers before it, which is what
    makes a resumed run or another rank reproduce it exactly.
    """
    digest = hashlib.sha256(f"sae-cache-ext:{seed}:{index}:{int(stream)}".encode())
    return torch.Generator(device="cpu").manual_seed(
        int.from_bytes(digest.digest()[:8], "little")
    )


def token_ids_of(toks: torch.Tensor, positions: bool) -> torch.Tensor:
    """The token ids of `toks`: itself, or the first field of its records."""
    return toks[..., 0] if positions else toks


def with_positions(toks_BT: torch.Tensor, first_sequence: int, start: int = 0):
    """`(B, T)` token ids of consecutive sequences, the first numbered
    `first_sequence`, as `(B*T, 3)` records `(id, sequence, position)`; positions
    count from `start` (the first position kept by `seqpos_slice`)."""
    n_rows, n_tokens = toks_BT.shape
    sequence_BT = torch.arange(first_sequence, first_sequence + n_rows).view(-1, 1)
    position_BT = torch.arange(start, start + n_tokens).view(1, -1)
    records = torch.stack(
        torch.broadcast_tensors(
            toks_BT.long().cpu(), sequence_BT.expand(-1, n_tokens), position_BT
        ),
        dim=-1,
    )
    return records.reshape(-1, 3)


def drop_tokens(
    acts_ND: torch.Tensor, toks_N: torch.Tensor, exclude_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the positions whose token id is in `exclude_ids`, keeping pairs aligned
    (`toks_N` may be `(N, 3)` records: their ids are the first field)."""
    if exclude_ids is None or exclude_ids.numel() == 0:
        return acts_ND, toks_N
    ids_N = token_ids_of(toks_N, toks_N.dim() == 2)
    keep_N = ~torch.isin(ids_N, exclude_ids.to(toks_N.device))
    return acts_ND[keep_N], toks_N[keep_N]


class Stager(Protocol):
    """Where a buffer's activations are allocated and how batches are copied in
    (`hoststage.HostStager`: pinned host memory, asynchronous device copies)."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None: ...

    def wait(self) -> None: ...


class RowPacker:
    """Fills buffers of full rows from batches of (activation, token) pairs.

    Each buffer is allocated once and batches are copied into it as they arrive, so
    a buffer costs its own size plus one batch, never a concatenated copy. Pairs
    that do not fit are carried into the next buffer: nothing is dropped. With a
    `stager`, activations (on an accelerator) are copied by it into a buffer it
    allocates, and every copy has landed before `fill` returns.
    """

    def __init__(self, context_size: int, stager: Stager | None = None) -> None:
        self.context_size = context_size
        self.stager = stager
        self._acts: list[torch.Tensor] = []
        self._toks: list[torch.Tensor] = []
        self.n_tokens = 0

    def add(self, acts_ND: torch.Tensor, toks_N: torch.Tensor) -> None:
        """Carry these pairs into the next buffer."""
        if acts_ND.shape[0] != toks_N.shape[0]:
            raise ValueError(
                f"{acts_ND.shape[0]} activations but {toks_N.shape[0]} token ids: "
                "every activation needs its token id."
            )
        if toks_N.shape[0] == 0:
            return
        self._acts.append(acts_ND)
        self._toks.append(toks_N)
        self.n_tokens += toks_N.shape[0]

    def fill(
        self,
        n_rows: int,
        pull: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A buffer of up to `n_rows` rows as `(acts_RTD, toks_RT)`.

        Takes the carried pairs first, then calls `pull()` for more batches. When
        `pull` raises StopIteration the buffer is cut to the whole rows it holds
        (possibly none); the rest stays carried.
        """
        need = n_rows * self.context_size
        acts_ND: torch.Tensor | None = None
        toks_N: torch.Tensor | None = None
        filled = 0
        while filled < need:
            if not self._acts:
                try:
                    self.add(*pull())
                except StopIteration:
                    break
                continue
            chunk_acts, chunk_toks = self._acts.pop(0), self._toks.pop(0)
            if acts_ND is None or toks_N is None:
                acts_ND = (
                    chunk_acts.new_empty((need, chunk_acts.shape[1]))
                    if self.stager is None
                    else self.stager.empty(
                        (need, chunk_acts.shape[1]), chunk_acts.dtype
                    )
                )
                toks_N = chunk_toks.new_empty((need, *chunk_toks.shape[1:]))
            take = min(need - filled, chunk_toks.shape[0])
            if self.stager is None:
                acts_ND[filled : filled + take] = chunk_acts[:take]
            else:
                self.stager.copy(acts_ND[filled : filled + take], chunk_acts[:take])
            toks_N[filled : filled + take] = chunk_toks[:take]
            filled += take
            self.n_tokens -= take
            if take < chunk_toks.shape[0]:
                self._acts.insert(0, chunk_acts[take:])
                self._toks.insert(0, chunk_toks[take:])
        if self.stager is not None:
            self.stager.wait()
        if acts_ND is None or toks_N is None:
            raise StopIteration
        whole = filled - filled % self.context_size
        if whole < filled:  # a partial row at exhaustion: carry it back
            self._acts.insert(0, acts_ND[whole:filled].clone())
            self._toks.insert(0, toks_N[whole:filled].clone())
            self.n_tokens += filled - whole
        if whole == 0:
            raise StopIteration
        return rows_from_tokens(acts_ND[:whole], toks_N[:whole], self.context_size)

    def take_rows(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n_rows * context_size` carried pairs, as rows."""
        if n_rows * self.context_size > self.n_tokens:
            raise ValueError(
                f"asked for {n_rows} rows ({n_rows * self.context_size} tokens) but "
                f"only {self.n_tokens} are packed"
            )

        def nothing_more() -> tuple[torch.Tensor, torch.Tensor]:
            raise StopIteration

        return self.fill(n_rows, nothing_more)

    def carried(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The carried pairs as one `(acts_ND, toks_N)` in host memory, or None."""
        if not self._acts:
            return None
        return torch.cat(self._acts).cpu(), torch.cat(self._toks).cpu()


def rows_from_tokens(
    acts_ND: torch.Tensor, toks_N: torch.Tensor, context_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold flat token streams into rows: `(R*T, D), (R*T,) -> (R, T, D), (R, T)`
    (or `(R*T, 3) -> (R, T, 3)` records)."""
    acts_RTD = einops.rearrange(acts_ND, "(r t) d -> r t d", t=context_size)
    toks_RT = einops.rearrange(toks_N, "(r t) ... -> r t ...", t=context_size)
    return acts_RTD, toks_RT


def permute_tokens(
    acts_RTD: torch.Tensor, toks_RT: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle tokens across all rows of a buffer, moving each activation with its
    token id, and fold them back into rows of the same shape."""
    n_rows, context_size, _ = acts_RTD.shape
    perm_N = torch.randperm(n_rows * context_size, generator=generator)
    acts_ND = einops.rearrange(acts_RTD, "r t d -> (r t) d")[perm_N]
    toks_N = einops.rearrange(toks_RT, "r t ... -> (r t) ...")[perm_N]
    return rows_from_tokens(acts_ND, toks_N, context_size)


def token_order(
    n_rows: int, context_size: int, generator: torch.Generator | None
) -> torch.Tensor | None:
    """The order in which a buffer's flat tokens are written: a seeded permutation
    when tokens are shuffled across rows, or None for generation order."""
    if generator is None:
        return None
    return torch.randperm(n_rows * context_size, generator=generator)


def assign_buckets(
    n_rows: int, n_buckets: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Scatter row indices uniformly at random into `n_buckets` buckets.

    Returns, for each bucket, the row indices in it (in increasing order). With every
    bucket later permuted uniformly, concatenating the buckets gives a uniform random
    permutation of all rows.
    """
    bucket_R = torch.randint(0, n_buckets, (n_rows,), generator=generator)
    order_R = torch.argsort(bucket_R, stable=True)
    counts_K = torch.bincount(bucket_R, minlength=n_buckets).tolist()
    return list(torch.split(order_R, counts_K))

"""Pure tensor functions: token exclusion with carry-over, per-buffer permutations.

Nothing here touches a disk or a model. Shape suffixes:
    N  tokens (flattened), R  rows, T  tokens per row (context size after slicing),
    D  d_in, K  buckets of the persisted row shuffle.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

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


def drop_tokens(
    acts_ND: torch.Tensor, toks_N: torch.Tensor, exclude_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the positions whose token id is in `exclude_ids`, keeping pairs aligned."""
    if exclude_ids is None or exclude_ids.numel() == 0:
        return acts_ND, toks_N
    keep_N = ~torch.isin(toks_N, exclude_ids.to(toks_N.device))
    return acts_ND[keep_N], toks_N[keep_N]


class RowPacker:
    """Collects (activation, token) pairs and hands them out as full rows.

    Tokens that do not fill a row stay for the next call: nothing is dropped.
    """

    def __init__(self, context_size: int) -> None:
        self.context_size = context_size
        self._acts: list[torch.Tensor] = []
        self._toks: list[torch.Tensor] = []
        self.n_tokens = 0

    def add(self, acts_ND: torch.Tensor, toks_N: torch.Tensor) -> None:
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

    def take_rows(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n_rows * context_size` pairs as `(acts_RTD, toks_RT)`."""
        n_take = n_rows * self.context_size
        if n_take > self.n_tokens:
            raise ValueError(
                f"asked for {n_rows} rows ({n_take} tokens) but only "
                f"{self.n_tokens} are packed"
            )
        acts_ND = torch.cat(self._acts) if len(self._acts) > 1 else self._acts[0]
        toks_N = torch.cat(self._toks) if len(self._toks) > 1 else self._toks[0]
        rest = self.n_tokens - n_take
        self._acts = [acts_ND[n_take:]] if rest else []
        self._toks = [toks_N[n_take:]] if rest else []
        self.n_tokens = rest
        return rows_from_tokens(acts_ND[:n_take], toks_N[:n_take], self.context_size)


def rows_from_tokens(
    acts_ND: torch.Tensor, toks_N: torch.Tensor, context_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold flat token streams into rows: `(R*T, D), (R*T,) -> (R, T, D), (R, T)`."""
    acts_RTD = einops.rearrange(acts_ND, "(r t) d -> r t d", t=context_size)
    toks_RT = einops.rearrange(toks_N, "(r t) -> r t", t=context_size)
    return acts_RTD, toks_RT


def permute_tokens(
    acts_RTD: torch.Tensor, toks_RT: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle tokens across all rows of a buffer, moving each activation with its
    token id, and fold them back into rows of the same shape."""
    n_rows, context_size, _ = acts_RTD.shape
    perm_N = torch.randperm(n_rows * context_size, generator=generator)
    acts_ND = einops.rearrange(acts_RTD, "r t d -> (r t) d")[perm_N]
    toks_N = einops.rearrange(toks_RT, "r t -> (r t)")[perm_N]
    return rows_from_tokens(acts_ND, toks_N, context_size)


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

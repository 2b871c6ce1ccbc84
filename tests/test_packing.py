"""Pure tensor functions, on tiny tensors with hand-computed answers."""

from __future__ import annotations

import collections

import pytest
import torch

from sae_cache_ext.packing import (
    RowPacker,
    Stream,
    assign_buckets,
    drop_tokens,
    rows_from_tokens,
    seeded_generator,
    token_order,
)


def test_drop_tokens_removes_listed_ids_and_keeps_pairs():
    toks_N = torch.tensor([0, 5, 1, 6, 0])
    acts_ND = toks_N.float().unsqueeze(1) * 10  # activation = 10 * token id
    acts, toks = drop_tokens(acts_ND, toks_N, torch.tensor([0, 1]))
    assert toks.tolist() == [5, 6]
    assert acts.squeeze(1).tolist() == [50.0, 60.0]


def test_drop_tokens_with_nothing_to_exclude_is_the_identity():
    toks_N = torch.arange(4)
    acts_ND = torch.randn(4, 2)
    acts, toks = drop_tokens(acts_ND, toks_N, None)
    assert acts is acts_ND and toks is toks_N


def test_row_packer_carries_leftovers_into_the_next_take():
    packer = RowPacker(context_size=3)
    # 5 tokens in, one row (3 tokens) out, 2 carried.
    packer.add(torch.arange(5).float().unsqueeze(1), torch.arange(5))
    acts_RTD, toks_RT = packer.take_rows(1)
    assert toks_RT.tolist() == [[0, 1, 2]]
    assert acts_RTD.shape == (1, 3, 1)
    assert packer.n_tokens == 2
    packer.add(torch.arange(5, 9).float().unsqueeze(1), torch.arange(5, 9))
    _, toks_RT = packer.take_rows(2)
    assert toks_RT.tolist() == [[3, 4, 5], [6, 7, 8]]
    assert packer.n_tokens == 0


def test_row_packer_refuses_more_rows_than_it_holds():
    packer = RowPacker(context_size=4)
    packer.add(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="only 3"):
        packer.take_rows(1)


def test_row_packer_refuses_unpaired_input():
    with pytest.raises(ValueError, match="token id"):
        RowPacker(2).add(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_rows_from_tokens_folds_in_row_major_order():
    acts_RTD, toks_RT = rows_from_tokens(
        torch.arange(6.0).unsqueeze(1), torch.arange(6), 3
    )
    assert toks_RT.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert acts_RTD[1, 2, 0] == 5.0


def test_seeded_generator_depends_only_on_seed_index_and_stream():
    def draw(seed, index, stream):
        return torch.randperm(50, generator=seeded_generator(seed, index, stream))

    same = draw(1, 2, Stream.TOKEN_PERMUTATION)
    assert torch.equal(same, draw(1, 2, Stream.TOKEN_PERMUTATION))
    assert not torch.equal(same, draw(1, 3, Stream.TOKEN_PERMUTATION))
    assert not torch.equal(same, draw(2, 2, Stream.TOKEN_PERMUTATION))
    assert not torch.equal(same, draw(1, 2, Stream.BUCKET_ASSIGNMENT))


def test_token_order_is_a_seeded_permutation_or_none():
    assert token_order(3, 4, None) is None
    order = token_order(3, 4, seeded_generator(0, 0, Stream.TOKEN_PERMUTATION))
    assert order is not None and sorted(order.tolist()) == list(range(12))
    again = token_order(3, 4, seeded_generator(0, 0, Stream.TOKEN_PERMUTATION))
    assert torch.equal(order, again)


def test_row_packer_fill_pulls_batches_into_one_buffer_and_carries_the_rest():
    batches = [
        (torch.arange(a, a + 5).float().unsqueeze(1), torch.arange(a, a + 5))
        for a in (0, 5, 10)
    ]
    pulls = iter(batches)
    packer = RowPacker(context_size=4)
    # 2 rows = 8 tokens: the first batch and 3 of the second; 2 carried
    acts_RTD, toks_RT = packer.fill(2, lambda: next(pulls))
    assert toks_RT.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(acts_RTD[..., 0], toks_RT.float())
    assert packer.n_tokens == 2
    # the dataset then runs out after one more batch: 2 + 5 = 7 tokens, 1 whole row
    acts_RTD, toks_RT = packer.fill(5, lambda: next(pulls))
    assert toks_RT.tolist() == [[8, 9, 10, 11]]
    assert packer.n_tokens == 3  # the partial row stays carried
    with pytest.raises(StopIteration):
        packer.fill(1, lambda: next(pulls))


def test_assign_buckets_partitions_rows():
    buckets = assign_buckets(100, 4, seeded_generator(0, 0, Stream.BUCKET_ASSIGNMENT))
    assert len(buckets) == 4
    everything = torch.cat(buckets)
    assert sorted(everything.tolist()) == list(range(100))
    for rows in buckets:
        assert torch.equal(rows, rows.sort().values)  # in increasing order


def test_bucket_then_permute_gives_uniform_positions():
    # Where does row 0 of 6 end up after scatter (3 buckets) + per-bucket permutation?
    # Uniform: each of the 6 positions about 1/6 of 6000 trials, i.e. ~1000 each.
    counts: collections.Counter[int] = collections.Counter()
    for trial in range(6000):
        buckets = assign_buckets(
            6, 3, seeded_generator(trial, 0, Stream.BUCKET_ASSIGNMENT)
        )
        order = []
        for k, rows in enumerate(buckets):
            perm = torch.randperm(
                rows.numel(), generator=seeded_generator(trial, k, Stream(2))
            )
            order.extend(rows[perm].tolist())
        counts[order.index(0)] += 1
    assert set(counts) == set(range(6))
    assert all(850 < c < 1150 for c in counts.values()), counts

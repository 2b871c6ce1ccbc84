"""The GPU path's staging: on CPU nothing changes; the stager branch of the row
packer fills the same buffers; on CUDA (skipped here without one) our cache equals
sae-lens's row for row and the buffers really are pinned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache_ext.hoststage import HostStager
from sae_cache_ext.packing import RowPacker
from tests.conftest import default_cfg_kwargs
from tests.helpers import columns, run_ours, run_upstream

HAS_CUDA = torch.cuda.is_available()


class HostCopies:
    """A `Stager` over plain host memory with synchronous copies: the row packer's
    stager branch, checked where there is no GPU. Counts what it is asked."""

    def __init__(self) -> None:
        self.allocations = self.copies = self.waits = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.allocations += 1
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies += 1
        dst.copy_(src)

    def wait(self) -> None:
        self.waits += 1


def _fill_all(packer: RowPacker) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # 7 batches of 5 tokens (35) into buffers of 2 rows of 4 tokens: 4 full
    # buffers (32 tokens), and 3 tokens too few for a row at the end
    batches = iter(
        (
            torch.arange(i, i + 5).float().unsqueeze(1).repeat(1, 3),
            torch.arange(i, i + 5),
        )
        for i in range(0, 35, 5)
    )

    def pull() -> tuple[torch.Tensor, torch.Tensor]:
        return next(batches)

    out = []
    while True:
        try:
            out.append(packer.fill(2, pull))
        except StopIteration:
            return out


def test_row_packer_through_a_stager_fills_the_same_buffers():
    stager = HostCopies()
    plain, staged = _fill_all(RowPacker(4)), _fill_all(RowPacker(4, stager))
    assert len(plain) == len(staged) == 4
    for (acts_a, toks_a), (acts_b, toks_b) in zip(plain, staged, strict=True):
        assert torch.equal(acts_a, acts_b) and torch.equal(toks_a, toks_b)
    # one allocation per buffer (and one for the last, cut-short try); every
    # fill waits for its copies before handing the buffer over
    assert stager.allocations == 5 and stager.waits == 5
    assert stager.copies >= 7


def test_no_stager_for_a_cpu_device_and_none_made_for_one():
    assert HostStager.for_device("cpu") is None
    assert HostStager.for_device(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="for_device"):
        HostStager(torch.device("cpu"))


def test_a_cpu_run_packs_without_a_stager_and_never_starts_cuda(
    make_cfg, tiny_model, corpus
):
    runner = CacheActivationsRunner(
        make_cfg(), override_dataset=corpus, override_model=tiny_model, quiet=True
    )
    assert runner.producer.packer.stager is None
    assert runner.source.activations_device == torch.device("cpu")
    runner.run()
    if hasattr(torch.cuda, "is_initialized"):
        assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_on_cuda_our_plain_cache_equals_sae_lens_row_for_row(
    tmp_path: Path, tiny_model, corpus, monkeypatch
):
    model = tiny_model.to("cuda")
    try:
        ours = run_ours(
            CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, device="cuda")),
            model,
            corpus,
        )
        upstream = default_cfg_kwargs(
            tmp_path, device="cuda", new_cached_activations_path=str(tmp_path / "up")
        )
        theirs = run_upstream(upstream, model, corpus, monkeypatch)
        for a, b in zip(columns(ours), columns(theirs), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        tiny_model.to("cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_on_cuda_buffers_are_pinned_and_hold_the_device_values():
    stager = HostStager.for_device("cuda")
    assert stager is not None
    src = torch.arange(12.0, device="cuda").reshape(4, 3)
    dst = stager.empty((4, 3), torch.float32)
    assert dst.is_pinned()
    stager.copy(dst, src)
    stager.wait()
    assert torch.equal(dst, src.cpu())

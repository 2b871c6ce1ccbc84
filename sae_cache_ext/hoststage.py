"""Activations from an accelerator to host memory, copied once.

With a CUDA model, each batch's activations stay on the GPU until the producer
packs them: `HostStager` gives the producer pinned (page-locked) host buffers and
copies every batch straight into its place in the buffer with a non-blocking copy
on a side stream, so the GPU runs the next forward pass while the copy engine
moves the last batch. An event recorded after the last copy is waited on before
the buffer goes to the writer. On a CPU model none of this is used
(`HostStager.for_device` returns None) and the producer packs as before, byte for
byte. Nothing CUDA-only is touched unless a CUDA device is asked for.

Pinned buffers come from torch's caching host allocator, which reuses a freed
buffer's pages for the next one (pinning pages is slow) and knows which copies
still use them.
"""

from __future__ import annotations

import torch


class HostStager:
    """Pinned host buffers filled by non-blocking copies on a side stream."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"HostStager stages activations from a CUDA device, not {device}; "
                "use HostStager.for_device, which gives None for other devices."
            )
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._last_copy: torch.cuda.Event | None = None

    @classmethod
    def for_device(cls, device: torch.device | str) -> HostStager | None:
        """A stager for a CUDA device; None for any other (nothing to stage)."""
        device = torch.device(device)
        return cls(device) if device.type == "cuda" else None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer (its contents undefined)."""
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Start copying `src` (on the device, or on the host: a carry restored
        from a checkpoint) into `dst` (a slice of a pinned buffer)."""
        if src.device.type != "cuda":
            dst.copy_(src)
            return
        # the copy starts once the forward pass that made `src` is done ...
        self.stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        # ... and `src`'s device memory is not reused before it has finished
        src.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._last_copy = event

    def wait(self) -> None:
        """Block until every copy started so far has landed in host memory."""
        if self._last_copy is not None:
            self._last_copy.synchronize()
            self._last_copy = None

"""What a benchmark runs on: the models, their hooks and cache sizes (`ModelSetup`),
and the whole plan (setups, arms, repeats) the command asks for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("tiny", "smollm2")
WIDE = "wide"
TINY_WIDTH = 32
WIDE_WIDTH = 1024
WIDE_GB = 1.074
"""The wide model's default cache: 262,144 tokens of 1024 float32 values (1.07 GB)."""
WIDE_CONTEXT, WIDE_BATCH, WIDE_BATCHES_PER_BUFFER = 128, 32, 16
ITEMSIZE = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class ModelSetup:
    """One benchmark configuration: a model, a hook and a cache size."""

    name: str
    hook_name: str
    d_in: int
    context_size: int
    batch_size: int
    n_buffers: int
    batches_per_buffer: int
    hook_set: tuple[str, ...] = ()
    """Four hooks of the same width as `hook_name`, for the `--hooks` arms."""
    dtype: str = "float32"
    """The cache's dtype (`float32` or `float16`)."""
    device: str = "cpu"
    model: str = ""
    """The model to load when `name` is a label (`wide@4x`); "" means `name`."""

    @property
    def family(self) -> str:
        """The model this setup loads: `tiny`, `smollm2` or `wide`."""
        return self.model or self.name

    @classmethod
    def sized(cls, name: str, tokens: int, n_buffers: int, **fields: Any) -> ModelSetup:
        """The setup caching about `tokens` tokens (rounded down to whole batches) in
        `n_buffers` buffers (fewer if there are fewer batches)."""
        batch_tokens = fields["batch_size"] * fields["context_size"]
        n_batches = tokens // batch_tokens
        if n_batches < 1:
            raise ValueError(
                f"{name}: {tokens} tokens is less than one batch ({batch_tokens} "
                "tokens); ask for more tokens (--tokens / --tiny-tokens)."
            )
        n_buffers = min(n_buffers, n_batches)
        return cls(
            name=name,
            n_buffers=n_buffers,
            batches_per_buffer=n_batches // n_buffers,
            **fields,
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context_size

    @property
    def n_batches(self) -> int:
        return self.n_buffers * self.batches_per_buffer

    @property
    def tokens(self) -> int:
        return self.n_batches * self.tokens_per_batch

    @property
    def buffer_size_gb(self) -> float:
        # The +0.5 byte survives float rounding, so sae-lens's `n_tokens_in_buffer`
        # comes out exactly.
        return (self.buffer_bytes + 0.5) / 1e9

    @property
    def buffer_bytes(self) -> int:
        """The activations of one buffer, in bytes."""
        return self.batches_per_buffer * self.tokens_per_batch * self.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        return self.d_in * ITEMSIZE[self.dtype]

    @property
    def activation_bytes(self) -> int:
        """The activations of the whole cache, in bytes (what GB/s counts)."""
        return self.tokens * self.bytes_per_token

    @property
    def payload_bytes(self) -> int:
        """The activations and their int32 token ids: what any writer must write."""
        return self.tokens * (self.bytes_per_token + 4)

    def describe(self) -> str:
        return (
            f"{self.tokens:,} tokens = {self.n_buffers} buffers x "
            f"{self.batches_per_buffer} batches x {self.batch_size} x "
            f"{self.context_size} tokens, {self.hook_name} (d_in {self.d_in}"
            + ("" if self.dtype == "float32" else f", {self.dtype}")
            + ("" if self.device == "cpu" else f", on {self.device}")
            + f"); {self.activation_bytes / 1e9:.2f} GB of activations, "
            f"{self.buffer_bytes / 1e6:.0f} MB buffers"
        )


def tiny_setup(tokens: int, width: int = TINY_WIDTH) -> ModelSetup:
    return ModelSetup.sized(
        "tiny",
        tokens,
        n_buffers=8,
        hook_name="blocks.1.hook_resid_post",
        d_in=width,
        context_size=64,
        batch_size=32,
        hook_set=_block_hooks(1),
    )


def _block_hooks(block: int) -> tuple[str, ...]:
    """Four d_model-wide hook points of one block: what one forward pass to that
    block computes anyway (a fair case; hooks spread over depth let single-hook
    runs stop earlier)."""
    return tuple(
        f"blocks.{block}.hook_{name}"
        for name in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    )


def smollm2_setup(tokens: int) -> ModelSetup:
    return ModelSetup.sized(
        "smollm2",
        tokens,
        n_buffers=4,
        hook_name="blocks.15.hook_resid_post",
        d_in=576,
        context_size=128,
        batch_size=8,
        hook_set=_block_hooks(15),
    )


def wide_setup(
    gb: float,
    width: int = WIDE_WIDTH,
    dtype: str = "float32",
    device: str = "cpu",
    batches_per_buffer: int | None = None,
    name: str = WIDE,
) -> ModelSetup:
    """The wide model (one layer of width `width`, one 1-wide attention head,
    hooked before its block: the forward pass is nearly free, as on a fast GPU)
    caching about `gb` GB of activations, in whole buffers of `batches_per_buffer`
    batches (default: 16, or a quarter of the batches of a smaller cache)."""
    if dtype not in ITEMSIZE:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(ITEMSIZE)}.")
    if width < 1:
        raise ValueError(f"--width must be at least 1, got {width}.")
    batch_tokens = WIDE_CONTEXT * WIDE_BATCH
    n_batches = int(gb * 1e9) // (batch_tokens * width * ITEMSIZE[dtype])
    if n_batches < 1:
        raise ValueError(
            f"{name}: {gb} GB is less than one batch ({batch_tokens} tokens of "
            f"{width} {dtype} values); ask for more (--gb)."
        )
    if batches_per_buffer is None:
        batches_per_buffer = min(WIDE_BATCHES_PER_BUFFER, max(1, n_batches // 4))
    return ModelSetup(
        name=name,
        hook_name="blocks.0.hook_resid_pre",
        d_in=width,
        context_size=WIDE_CONTEXT,
        batch_size=WIDE_BATCH,
        n_buffers=max(1, n_batches // batches_per_buffer),
        batches_per_buffer=min(batches_per_buffer, n_batches),
        dtype=dtype,
        device=device,
        model=WIDE if name != WIDE else "",
    )


SCALE_FACTORS = (1, 4, 16)


def scale_setups(
    base_gb: float, width: int = WIDE_WIDTH, dtype: str = "float32", device: str = "cpu"
) -> list[ModelSetup]:
    """The wide model at 1x, 4x and 16x the cache of `base_gb` (whole multiples of
    it), all with the buffers of 1x, so only the number of buffers grows."""
    base = wide_setup(base_gb, width, dtype, device)
    return [
        dataclasses.replace(
            base,
            name=f"{WIDE}@{factor}x",
            model=WIDE,
            n_buffers=base.n_buffers * factor,
        )
        for factor in SCALE_FACTORS
    ]


@dataclass
class BenchPlan:
    setups: list[ModelSetup]
    arms: list[str]
    repeats: int
    threads: int
    disk_interval: float
    workdir: Path | None = None
    scale: bool = False
    """The scale curve: the setups are the wide model at 1x, 4x and 16x."""

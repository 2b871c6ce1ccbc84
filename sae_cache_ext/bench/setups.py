"""What a benchmark runs on: the models, their hooks and cache sizes (`ModelSetup`),
and the whole plan (setups, arms, repeats) the command asks for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("tiny", "smollm2")
TINY_WIDTH = 32


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
        # float32: 4 bytes per value. The +0.5 byte survives float rounding, so
        # sae-lens's `n_tokens_in_buffer` comes out exactly.
        buffer_bytes = self.batches_per_buffer * self.tokens_per_batch * self.d_in * 4
        return (buffer_bytes + 0.5) / 1e9

    def describe(self) -> str:
        return (
            f"{self.tokens:,} tokens = {self.n_buffers} buffers x "
            f"{self.batches_per_buffer} batches x {self.batch_size} x "
            f"{self.context_size} tokens, {self.hook_name} (d_in {self.d_in})"
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


@dataclass
class BenchPlan:
    setups: list[ModelSetup]
    arms: list[str]
    repeats: int
    threads: int
    disk_interval: float
    workdir: Path | None = None

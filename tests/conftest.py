"""Shared fixtures: a tiny tokenizer, model and corpus built locally (no downloads).

The tokenizer is a BPE trained in well under a second on prose that ships with
CPython (`pydoc_data.topics`), saved to a folder because TransformerLens reloads
tokenizers by `name_or_path`. The model is a random 2-layer `HookedTransformer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sae_cache_ext.data import pydoc_corpus
from tests.fixtures import (
    D_MODEL,
    build_corpus,
    build_model,
    build_tokenizer,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir: Path):
    return build_model(tokenizer_dir)


@pytest.fixture(scope="session")
def corpus():
    return build_corpus()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama saved as a Hugging Face folder, with the toy tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("models") / "tiny-hf"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(pydoc_corpus()["text"][:400]))
    return path


@pytest.fixture
def make_cfg(tmp_path: Path):
    """`make_cfg(**overrides)`: a small valid config writing under `tmp_path`."""
    from sae_cache_ext import CacheActivationsRunnerConfig

    def make(**overrides: Any) -> CacheActivationsRunnerConfig:
        return CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, **overrides))

    return make


def default_cfg_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    # 16 tokens per row, 4 rows per batch, 2 batches per buffer (128 tokens), and
    # 3 buffers: 384 tokens, 24 rows.
    context_size = overrides.get("context_size", 16)
    d_in = overrides.get("d_in", D_MODEL)
    bytes_per_token = d_in * 4
    kwargs: dict[str, Any] = {
        "dataset_path": "local/corpus",
        "model_name": "tiny-random",
        "hook_name": "blocks.0.hook_resid_post",
        "d_in": d_in,
        "context_size": context_size,
        "model_batch_size": 4,
        "training_tokens": 3 * 2 * 4 * context_size,
        "buffer_size_gb": (2 * 4 * context_size * bytes_per_token + 0.5) / 1e9,
        "new_cached_activations_path": str(tmp_path / "cache"),
        "shuffle": False,
        "device": "cpu",
    }
    kwargs.update(overrides)
    return kwargs

"""Builders for the tiny local tokenizer, model and corpus the tests use."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

from datasets import Dataset

D_MODEL = 32
N_CTX = 64
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def corpus_documents() -> list[str]:
    """Real English prose of varied lengths: CPython's pydoc topics, one document
    per paragraph (from a few tokens to a few hundred)."""
    topics = pydoc_data.topics.topics
    return [
        paragraph.strip()
        for key in sorted(topics)
        for paragraph in topics[key].split("\n\n")
        if paragraph.strip()
    ]


def build_tokenizer(folder: Path) -> Path:
    """Train a small BPE tokenizer and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, PAD, "<|unk|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_documents()[:600], trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token="<|unk|>",
    )
    fast.save_pretrained(str(folder))
    return folder


def build_model(tokenizer_dir: Path, seed: int = 0):
    """A random 2-layer HookedTransformer using the local tokenizer."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=N_CTX,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def build_corpus(n_docs: int | None = None) -> Dataset:
    docs = corpus_documents()
    return Dataset.from_dict({"text": docs[:n_docs] if n_docs else docs})

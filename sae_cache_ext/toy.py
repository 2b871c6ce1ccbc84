"""A tiny model for tutorials, tests and trying things out: a BPE tokenizer trained in
about a second on CPython's own prose, and a random 2-layer `HookedTransformer` that
uses it. Nothing is downloaded. The activations mean nothing; the plumbing is real.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from sae_cache_ext.data import pydoc_corpus

D_MODEL = 32
N_CTX = 64
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def corpus_documents() -> list[str]:
    """Real English prose of varied lengths: CPython's pydoc topics, one document
    per paragraph (from a few tokens to a few hundred)."""
    return list(pydoc_corpus()["text"])


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


def build_model(tokenizer_dir: Path, seed: int = 0, d_model: int = D_MODEL):
    """A random 2-layer HookedTransformer using the local tokenizer (4 heads,
    d_mlp = 2 x d_model)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        n_ctx=N_CTX,
        d_head=d_model // 4,
        n_heads=4,
        d_mlp=2 * d_model,
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


def build_wide_model(
    tokenizer_dir: Path, d_model: int = 1024, device: str = "cpu", seed: int = 0
):
    """A random 1-layer, attention-only HookedTransformer of width `d_model` with
    one 1-wide head and no layer norm: hooked before its block
    (`blocks.0.hook_resid_pre`, sae-lens still runs the block), its forward pass
    is a few passes over the activations, nearly free, so a benchmark on it
    measures the write path as a fast GPU would see it."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d_model,
        n_ctx=N_CTX * 2,
        d_head=1,
        n_heads=1,
        attn_only=True,
        d_vocab=len(tokenizer),
        normalization_type=None,
        seed=seed,
        device=device,
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def build_corpus(n_docs: int | None = None) -> Dataset:
    """The prose as a `Dataset` with a `text` column (optionally the first n docs)."""
    corpus = pydoc_corpus()
    return corpus.select(range(n_docs)) if n_docs else corpus


def toy_model_and_corpus(folder: Path) -> tuple:
    """`(model, corpus)`: the tokenizer is saved under `folder` (TransformerLens
    reloads tokenizers by path)."""
    return build_model(build_tokenizer(Path(folder))), build_corpus()

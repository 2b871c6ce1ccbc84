"""The tests' tiny tokenizer, model and corpus (built by `sae_cache_ext.toy`)."""

from sae_cache_ext.toy import (
    BOS,
    D_MODEL,
    EOS,
    N_CTX,
    PAD,
    build_corpus,
    build_model,
    build_tokenizer,
    corpus_documents,
)

__all__ = [
    "BOS",
    "D_MODEL",
    "EOS",
    "N_CTX",
    "PAD",
    "build_corpus",
    "build_model",
    "build_tokenizer",
    "corpus_documents",
]

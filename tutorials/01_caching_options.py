# %% [markdown]
# # Tutorial 1: caching activations, and what each option does to the rows
#
# We cache a tiny random model's activations over real prose (CPython's own docs),
# first exactly as sae-lens would, then with each new option, and look at the rows.
# Everything runs offline in a few seconds: `python tutorials/01_caching_options.py`.

# %%
import tempfile
from pathlib import Path

import numpy as np

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache_ext.toy import D_MODEL, toy_model_and_corpus

work = Path(tempfile.mkdtemp(prefix="sae-cache-ext-tutorial-"))
model, corpus = toy_model_and_corpus(work / "tokenizer")
tok = model.tokenizer
print(f"{len(corpus)} documents; BOS={tok.bos_token_id}, EOS={tok.eos_token_id}")


def cache(name: str, **options):
    """Cache 3 buffers of 8 rows x 16 tokens with these options; return the dataset."""
    cfg = CacheActivationsRunnerConfig(
        dataset_path="pydoc_data.topics",
        model_name="toy",
        hook_name="blocks.0.hook_resid_post",
        d_in=D_MODEL,
        context_size=16,
        model_batch_size=4,
        training_tokens=384,
        buffer_size_gb=(2 * 4 * 16 * D_MODEL * 4 + 0.5) / 1e9,  # 2 batches per buffer
        new_cached_activations_path=str(work / name),
        shuffle=options.pop("shuffle", False),
        device="cpu",
        **options,
    )
    runner = CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    )
    return runner.run()


def show(dataset, rows: int = 3) -> np.ndarray:
    toks = np.asarray(dataset.with_format("numpy")["token_ids"])
    for row in toks[:rows]:
        print("  ", tok.decode(row[:12]).replace("\n", " ")[:70])
    return toks


# %% [markdown]
# ## Defaults: upstream's rows
# Documents are concatenated with a BOS token between them, and every row starts with
# BOS. With `shuffle=False` and the new options at their defaults, the output equals
# sae-lens's own runner bit for bit.

# %%
plain = show(cache("plain"))
assert (plain[:, 0] == tok.bos_token_id).all()

# %% [markdown]
# ## `sequence_separator_token="eos"`: EOS between documents instead of BOS

# %%
eos = show(cache("eos", sequence_separator_token="eos"))
assert (eos[:, 1:] == tok.eos_token_id).any()

# %% [markdown]
# ## `disable_concat_sequences=True`: one document per row
# Each row is the start of one document; documents shorter than a row are skipped
# (sae-lens's semantics), which biases the cache towards long documents.

# %%
single = show(cache("single", disable_concat_sequences=True))
assert not (single[:, 1:] == tok.bos_token_id).any()

# %% [markdown]
# ## `exclude_special_tokens=True`: no BOS/EOS/PAD activations on disk
# The positions are removed at cache time and the remaining tokens re-packed into
# full rows, so the cache still holds 24 rows of 16 tokens.

# %%
no_special = show(cache("no-special", exclude_special_tokens=True))
assert not np.isin(
    no_special, [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
).any()
assert no_special.shape == plain.shape

# %% [markdown]
# ## `shuffle=True`: the files on disk are shuffled, seeded
# Rows are whole sequences, in a seeded random order: reading the files in order (as
# SAE training does) no longer walks through the corpus document by document.

# %%
shuffled_ds = cache("shuffled", shuffle=True)
shuffled = show(shuffled_ds)
assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, plain.tolist()))
print("rows on disk in a new order:", not np.array_equal(shuffled, plain))

# %% [markdown]
# ## `shuffle_across_sequences=True`: tokens mixed across rows
# Tokens (with their activations) are permuted within each buffer, seeded by
# `(seed, buffer index)`. A row is no longer a piece of text; every activation still
# sits beside its own token id.

# %%
mixed = show(cache("mixed", shuffle=True, shuffle_across_sequences=True))
assert sorted(mixed.ravel().tolist()) == sorted(plain.ravel().tolist())
print("\nCaches written under", work)

# %% [markdown]
# # Tutorial 2: train an SAE straight from the cache
#
# A real model (SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file and converted
# once into `~/.cache/sae_cache_ext/`), real prose, a shuffled cache of layer 15, and
# sae-lens's own trainer reading it. About two minutes on two CPU cores:
# `python tutorials/02_train_sae.py`. Set `TUTORIAL_TOKENS` to cache more or fewer
# tokens.

# %%
import os
import tempfile
from pathlib import Path

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache_ext.data import pydoc_corpus
from sae_cache_ext.models import load_smollm2_hooked
from sae_cache_ext.train import evaluate_sae, train_sae_from_cache

tokens = int(os.environ.get("TUTORIAL_TOKENS", 12_288))
work = Path(tempfile.mkdtemp(prefix="sae-cache-ext-tutorial-"))
model = load_smollm2_hooked()  # converts the GGUF file on first use (about 40 s)
print(model.cfg.n_layers, "layers, d_model", model.cfg.d_model)

# %% [markdown]
# ## Cache layer 15's residual stream, shuffled on disk
# `shuffle=True` writes a seeded permutation of the rows to disk, and
# `shuffle_across_sequences=True` also mixes tokens across the rows of each buffer, so
# that sae-lens's trainer, which reads files in order, sees uncorrelated tokens.

# %%
context = 64
cfg = CacheActivationsRunnerConfig(
    dataset_path="pydoc_data.topics",
    model_name="SmolLM2-135M-Instruct",
    hook_name="blocks.15.hook_resid_post",
    d_in=model.cfg.d_model,
    context_size=context,
    model_batch_size=8,
    training_tokens=tokens,
    buffer_size_gb=(4 * 8 * context * model.cfg.d_model * 4 + 0.5) / 1e9,
    new_cached_activations_path=str(work / "cache"),
    shuffle=True,
    shuffle_across_sequences=True,
    device="cpu",
)
dataset = CacheActivationsRunner(
    cfg, override_dataset=pydoc_corpus(), override_model=model
).run()
print(dataset)

# %% [markdown]
# ## Train a TopK SAE with sae-lens's `LanguageModelSAETrainingRunner`
# `train_sae_from_cache` sets `use_cached_activations=True` and holds out the last
# `eval_rows` rows, which the trainer (reading in file order) never reaches.

# %%
eval_rows = 16
sae = train_sae_from_cache(
    cfg.new_cached_activations_path,
    model,
    d_sae=1152,
    k=32,
    training_tokens=(len(dataset) - eval_rows - 40) * context,
    eval_rows=eval_rows,
    train_batch_size_tokens=256,
    lr=1e-3,
    store_batch_size_prompts=4,
    n_batches_in_buffer=8,
)
result = evaluate_sae(sae, cfg.new_cached_activations_path, eval_rows)
print(
    f"held-out explained variance {result.explained_variance:.3f}, L0 {result.l0:.1f}"
)
assert result.mse < result.variance

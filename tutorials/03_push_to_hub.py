# %% [markdown]
# # Tutorial 3: push a cache to the Hugging Face Hub
#
# With `hf_repo_id` set, the runner pushes the dataset exactly as it is on disk (so a
# persisted shuffle is what others download), uploads the config as
# `cache_activations_runner_cfg.json` (new fields included, as sae-lens does) and the
# manifest `sae_cache_ext_manifest.json`. This tutorial runs everything up to the push
# itself; set `TUTORIAL_PUSH_REPO=you/your-cache` (and log in with
# `huggingface-cli login`) to push for real.

# %%
import json
import os
import tempfile
from pathlib import Path

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache_ext.hub import CONFIG_FILENAME, push_cache
from sae_cache_ext.staging import MARKER
from sae_cache_ext.toy import D_MODEL, toy_model_and_corpus

work = Path(tempfile.mkdtemp(prefix="sae-cache-ext-tutorial-"))
model, corpus = toy_model_and_corpus(work / "tokenizer")
repo_id = os.environ.get("TUTORIAL_PUSH_REPO")

# %% [markdown]
# ## Cache, with the Hub fields set
# `hf_repo_id`, `hf_revision`, `hf_num_shards` and `hf_is_private_repo` mean what they
# mean in sae-lens. When `hf_repo_id` is set, `run()` pushes at the end; here we leave
# it unset and push by hand below, so nothing leaves this machine unless you ask.

# %%
cfg = CacheActivationsRunnerConfig(
    dataset_path="pydoc_data.topics",
    model_name="toy",
    hook_name="blocks.1.hook_resid_post",
    d_in=D_MODEL,
    context_size=16,
    model_batch_size=4,
    training_tokens=384,
    buffer_size_gb=(2 * 4 * 16 * D_MODEL * 4 + 0.5) / 1e9,
    new_cached_activations_path=str(work / "cache"),
    shuffle=True,
    device="cpu",
)
dataset = CacheActivationsRunner(
    cfg, override_dataset=corpus, override_model=model, quiet=True
).run()

# %% [markdown]
# ## What would be uploaded

# %%
config_json = json.dumps(cfg.to_dict(), indent=2)
manifest = json.loads((Path(cfg.new_cached_activations_path) / MARKER).read_text())
print(f"{len(dataset)} rows; {CONFIG_FILENAME}: {len(config_json)} bytes")
print("manifest keys:", sorted(manifest))
assert json.loads(config_json)["shuffle"] is True

# %% [markdown]
# ## The push
# The same call the runner makes when `hf_repo_id` is set.

# %%
if repo_id:
    push_cache(
        dataset,
        cfg.to_dict(),
        repo_id=repo_id,
        num_shards=None,
        private=True,
        revision="main",
        manifest_path=Path(cfg.new_cached_activations_path) / MARKER,
    )
    print("pushed to", repo_id)
else:
    print("TUTORIAL_PUSH_REPO is not set: stopping before the push.")

"""Pushing a cache to the Hub.

The real Hub cannot be reached from here, so these tests run the REAL clients
(`Dataset.push_to_hub`, `HfApi.upload_file`, `load_dataset`) against a loopback
double of the Hub's HTTP API (tests/hub_server.py). What the double cannot prove is
that huggingface.co answers the same way; everything on our side of the wire is real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sae_cache_ext.hub import CONFIG_FILENAME
from sae_cache_ext.staging import MARKER
from tests.conftest import default_cfg_kwargs
from tests.hub_server import HubStorage, hub_client_env, serve_hub

ROOT = Path(__file__).resolve().parent.parent


def test_push_sends_the_persisted_shuffled_dataset_config_and_manifest(
    tmp_path, tiny_model, tokenizer_dir
):
    weights = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), weights)
    cfg = default_cfg_kwargs(
        tmp_path,
        shuffle=True,
        shuffle_across_sequences=True,
        exclude_special_tokens=True,
        hf_repo_id="me/tiny-cache",
        hf_revision="main",
    )
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"tokenizer_dir": str(tokenizer_dir), "weights": str(weights), "cfg": cfg}
        )
    )
    with serve_hub(tmp_path / "hub") as endpoint:
        env = hub_client_env(endpoint, tmp_path / "hf_home")
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.hub_child", str(spec)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"rows": 24, "hub_equals_local": True, "hub_equals_disk": True}

    hub = HubStorage(tmp_path / "hub")
    files = hub.list_files("me/tiny-cache", "main")
    assert CONFIG_FILENAME in files and MARKER in files
    assert any(f.endswith(".parquet") for f in files)
    uploaded_cfg = json.loads(hub.read_file("me/tiny-cache", CONFIG_FILENAME))
    # every field, the new ones included, as upstream uploads asdict(cfg)
    assert uploaded_cfg["shuffle_across_sequences"] is True
    assert uploaded_cfg["exclude_special_tokens"] is True
    assert uploaded_cfg["sequence_separator_token"] == "bos"
    assert uploaded_cfg["hook_name"] == cfg["hook_name"]
    manifest = json.loads(hub.read_file("me/tiny-cache", MARKER))
    local_manifest = json.loads(
        (Path(cfg["new_cached_activations_path"]) / MARKER).read_text()
    )
    assert manifest == local_manifest
    card = hub.read_file("me/tiny-cache", "README.md").decode()
    assert card.startswith("---\n") and "dataset_info" in card  # datasets' header kept
    assert "# Activations of `tiny-random` at `blocks.0.hook_resid_post`" in card
    assert "| rows x tokens per row | 24 x 16 |" in card
    assert "excluded_special_token" in card  # what was left out, by reason
    # no secret travels with the cache
    token = env["HF_TOKEN"]
    assert (
        token
        and token not in json.dumps(manifest)
        and token not in json.dumps(uploaded_cfg)
    )

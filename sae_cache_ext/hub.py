"""Pushing a finished cache to the Hugging Face Hub: the dataset as it is on disk
(already shuffled), the runner config as JSON (as sae-lens does), and the manifest."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "cache_activations_runner_cfg.json"


def push_cache(
    dataset: Dataset,
    config: dict[str, Any],
    *,
    repo_id: str,
    num_shards: int | None,
    private: bool,
    revision: str,
    manifest_path: Path | None = None,
) -> None:
    """Upload `dataset` and its config (and manifest) to the dataset repo `repo_id`."""
    logger.info("Pushing %d rows to the Hub as %s@%s", len(dataset), repo_id, revision)
    dataset.push_to_hub(
        repo_id=repo_id, num_shards=num_shards, private=private, revision=revision
    )
    api = HfApi()
    config_bytes = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
    api.upload_file(
        path_or_fileobj=io.BytesIO(config_bytes),
        path_in_repo=CONFIG_FILENAME,
        repo_id=repo_id,
        repo_type="dataset",
        revision=revision,
        commit_message="Add cache_activations_runner metadata",
    )
    if manifest_path is not None:
        api.upload_file(
            path_or_fileobj=str(manifest_path),
            path_in_repo=manifest_path.name,
            repo_id=repo_id,
            repo_type="dataset",
            revision=revision,
            commit_message="Add sae-cache-ext manifest",
        )

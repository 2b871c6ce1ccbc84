"""Pushing a finished cache to the Hugging Face Hub: the dataset as it is on disk
(already shuffled), the runner config as JSON (as sae-lens does), and the manifest."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import DatasetCard, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

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
        push_card(repo_id, revision, json.loads(manifest_path.read_text()))


def push_card(repo_id: str, revision: str, manifest: dict[str, Any]) -> None:
    """Put the key facts in the dataset card (README.md), keeping the metadata
    header `datasets` wrote there."""
    try:
        readme = hf_hub_download(
            repo_id, "README.md", repo_type="dataset", revision=revision
        )
        card = DatasetCard(Path(readme).read_text())
    except EntryNotFoundError:
        card = DatasetCard("")
    card.text = card_text(manifest)
    card.push_to_hub(
        repo_id,
        repo_type="dataset",
        revision=revision,
        commit_message="Describe the activation cache",
    )


def card_text(manifest: dict[str, Any]) -> str:
    """A dataset card body stating how the cache was made and what it left out."""
    config = manifest.get("config", {})
    run = manifest.get("run", {})
    facts = manifest.get("accounting", {})
    exhaustion = manifest.get("dataset_exhaustion", {})
    dropped = facts.get("tokens_dropped", {}) or {"nothing": 0}
    lines = [
        f"# Activations of `{run.get('model_name', config.get('model_name'))}` at "
        f"`{run.get('hook_name', config.get('hook_name'))}`",
        "",
        "Cached with [sae-cache-ext](https://pypi.org/project/sae-cache-ext/) for "
        "training sparse autoencoders with sae-lens (`use_cached_activations=True`).",
        "",
        "| fact | value |",
        "|---|---|",
        f"| rows x tokens per row | {manifest.get('rows')} x {manifest.get('row_length')} |",
        f"| tokens | {manifest.get('tokens')} |",
        f"| d_in, dtype | {run.get('d_in')}, {run.get('dtype')} |",
        f"| dataset | `{config.get('dataset_path')}` |",
        f"| shuffle on disk (seed) | {config.get('shuffle')} ({config.get('seed')}) |",
        f"| shuffle_across_sequences | {config.get('shuffle_across_sequences')} |",
        f"| exclude_special_tokens | {config.get('exclude_special_tokens')} |",
        f"| disable_concat_sequences | {config.get('disable_concat_sequences')} |",
        f"| documents read / kept / dropped short | {facts.get('documents_read')} / "
        f"{facts.get('documents_kept')} / {facts.get('documents_dropped_short')} |",
        f"| dataset ran out / repeats | {exhaustion.get('exhausted')} / "
        f"{exhaustion.get('repeats')} |",
        f"| weights sha256 | `{run.get('weights_sha256')}` |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in manifest.get('versions', {}).items())} |",
        *_headline_rows(manifest),
        "",
        "Tokens that did not reach the cache, by reason: "
        + ", ".join(f"{reason} {count}" for reason, count in dropped.items())
        + ".",
        "",
        "The full record (config, per-shard sha256, coverage by document length, "
        "per-dimension mean and variance, timings) is in `sae_cache_ext_manifest.json`; the runner config in "
        f"`{CONFIG_FILENAME}`.",
    ]
    return "\n".join(lines) + "\n"


def _headline_rows(manifest: dict[str, Any]) -> list[str]:
    """Table rows for the activation statistics and the numeric envelope."""
    rows = []
    for hook, stats in (manifest.get("statistics") or {}).items():
        q = stats["norm_quantiles"]
        rows.append(
            f"| `{hook}`: L2 norm mean (1% / 50% / 99%) | {_num(stats['norm_mean'])} "
            f"({_num(q['0.01'])} / {_num(q['0.5'])} / {_num(q['0.99'])}) |"
        )
        rows.append(
            f"| `{hook}`: max \\|x\\|, non-finite values | "
            f"{_num(stats['max_abs'])}, {stats['non_finite']} |"
        )
    envelope = manifest.get("envelope")
    if envelope and "skipped" in envelope:
        rows.append(f"| numeric envelope | not measured: {envelope['skipped']} |")
    elif envelope:
        rows.append(
            f"| numeric envelope ({envelope['rows']} rows re-run in a batch of "
            f"{envelope['batch_size']}) | max abs error "
            f"{_num(envelope['max_abs_error'])}, max rel error "
            f"{_num(envelope['max_rel_error'])}, min cosine "
            f"{envelope['min_cosine']:.6f} |"
        )
    return rows


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"

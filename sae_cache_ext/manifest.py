"""What a cache records about itself, and the dataset folder's metadata files.

The manifest (`sae_cache_ext_manifest.json`) sits beside the Arrow files. While the
cache is being built it only marks the staging folder as ours; when the cache is
finished it holds the config, versions, counts, shard checksums and timings.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Features

from sae_cache_ext.envelope import for_hook
from sae_cache_ext.shard_files import ShardInfo
from sae_cache_ext.staging import MARKER, STATE_COMPLETE
from sae_cache_ext.writer import CacheSchema, write_json_atomic

MANIFEST_FORMAT = 1
_PACKAGES = ("sae-cache-ext", "sae-lens", "transformer-lens", "torch", "datasets")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def dataset_fingerprint(shards: list[ShardInfo]) -> str:
    """A deterministic `datasets` fingerprint: the same data gives the same value."""
    blob = json.dumps([(s.filename, s.sha256) for s in shards]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_dataset_metadata(
    folder: Path, shards: list[ShardInfo], features: Features
) -> None:
    """Write `state.json` and `dataset_info.json` so `load_from_disk` reads `folder`."""
    state = {
        "_data_files": [{"filename": s.filename} for s in shards],
        "_fingerprint": dataset_fingerprint(shards),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {
        "citation": "",
        "description": "",
        "features": features.to_dict(),
        "homepage": "",
        "license": "",
    }
    write_json_atomic(folder / "state.json", state)
    write_json_atomic(folder / "dataset_info.json", info)


def finish_manifest(
    folder: Path, marker: dict[str, Any], config: dict[str, Any], **facts: Any
) -> dict[str, Any]:
    """Turn the staging marker into the finished cache's manifest (atomically)."""
    shards: list[ShardInfo] = facts.pop("shards")
    # the staging bookkeeping (pid, host) has no place in the finished record
    kept = {k: v for k, v in marker.items() if k not in ("pid", "host")}
    manifest = {
        **kept,
        "state": STATE_COMPLETE,
        "format": MANIFEST_FORMAT,
        "config": config,
        "versions": package_versions(),
        "shards": [asdict(s) for s in shards],
        "rows": sum(s.rows for s in shards),
        **facts,
    }
    write_json_atomic(folder / MARKER, manifest)
    return manifest


def write_cache_description(
    folder: Path,
    schema: CacheSchema,
    shards: dict[str, list[ShardInfo]],
    marker: dict[str, Any],
    config: dict[str, Any],
    facts: dict[str, Any],
) -> None:
    """Write every dataset's metadata files and manifest in the staging `folder`.

    With one folder per hook, each hook's folder is a cache of its own (its manifest
    says which hook and width), and the top-level manifest, written last, lists them
    and marks the whole as finished. `facts` go into every manifest."""
    for subdir, features in schema.outputs:
        write_dataset_metadata(folder / subdir, shards[subdir], features)
    if schema.per_hook_folders:
        rows = sum(s.rows for s in next(iter(shards.values())))
        for hook, width in schema.hooks:
            finish_manifest(
                folder / hook,
                marker,
                {**config, "hook_name": hook, "d_in": width},
                shards=shards[hook],
                **_hook_facts(facts, hook, width),
            )
        facts = {
            **facts,
            "hook_datasets": {
                hook: {"folder": hook, "d_in": width, "rows": rows}
                for hook, width in schema.hooks
            },
            "rows": rows,
        }
    finish_manifest(folder, marker, config, shards=shards.get("", []), **facts)


def _hook_facts(facts: dict[str, Any], hook: str, width: int) -> dict[str, Any]:
    """`facts` as one hook's own manifest records them: its run, its statistics and
    its part of the envelope."""
    statistics = facts.get("statistics")
    return {
        **facts,
        "run": {**facts["run"], "hook_name": hook, "d_in": width},
        "statistics": None if statistics is None else {hook: statistics[hook]},
        "envelope": for_hook(facts.get("envelope"), hook),
    }


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, by name, in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(
            tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        )
    return digest.hexdigest()


def run_facts(model: torch.nn.Module, cfg: Any) -> dict[str, Any]:
    """How the activations were computed: model, hook, precision, device, seeds."""
    model_cfg = getattr(model, "cfg", None)
    parameter = next(model.parameters(), None)
    return {
        "model_name": cfg.model_name,
        "model_class": type(model).__name__,
        "model_config_name": getattr(model_cfg, "model_name", None),
        "weights_sha256": weights_sha256(model),
        "model_dtype": None if parameter is None else str(parameter.dtype),
        "hook_name": cfg.hook_name,
        "d_in": cfg.d_in,
        "dtype": cfg.dtype,
        "device": str(parameter.device) if parameter is not None else cfg.device,
        "autocast_lm": cfg.autocast_lm,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_num_threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "torch_initial_seed": torch.initial_seed(),
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text())

"""What a cache holds, for `sae-cache-ext info`: `describe_cache` and its text.

`describe_cache` reads metadata only (`dataset_info.json`, `state.json`, the manifest)
and the sizes of the files; it works on any folder `datasets.save_to_disk` or
sae-lens's runner wrote, with more facts when our manifest is there.
`format_description` turns its dict into lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sae_cache_ext.staging import TOOL
from sae_cache_ext.verify import tables
from sae_cache_ext.verify.folder import (
    INFO_FILE,
    STATE_FILE,
    arrow_rows,
    cache_folder,
    data_filenames,
    feature_text,
    features_of,
    hook_column,
    read_config,
    read_json,
    read_manifest,
)
from sae_cache_ext.verify.report import envelope_text


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def describe_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the cache at `path` holds, as JSON-ready values (for `sae-cache-ext info`).

    Keys: `path`, `made_by`, `schema` (column -> feature), `hook_name`, `dtype`,
    `d_in`, `context_size` (tokens per stored row), `rows`, `tokens`, `data_files`,
    `data_bytes`, `size_bytes` (every file in the folder), `config` and
    `config_source` (None without a manifest or config file), and `manifest` (the
    manifest's other facts: versions, timings, counts; None without one). Rows come
    from the manifest, or are counted in the Arrow files when there is none.
    """
    folder = cache_folder(path)
    manifest = read_manifest(folder)
    if manifest is not None and isinstance(manifest.get("hook_datasets"), dict):
        # several hooks: hook_name's dataset stands for the rows and tokens
        hooks = manifest["hook_datasets"]
        primary = manifest["config"].get("hook_name")
        entry = hooks.get(primary) or next(iter(hooks.values()))
        first = describe_cache(folder / entry["folder"])
        return {
            **first,
            "path": str(folder.absolute()),
            "hook_name": manifest["config"].get("hook_name"),
            "hook_datasets": {
                hook: {**entry, "path": str((folder / entry["folder"]).absolute())}
                for hook, entry in hooks.items()
            },
            "size_bytes": folder_bytes(folder),
            "config": manifest["config"],
            "manifest": {  # every hook's statistics and envelope
                **(first["manifest"] or {}),
                **{
                    key: manifest[key]
                    for key in ("statistics", "envelope")
                    if key in manifest
                },
            },
        }
    for name in (STATE_FILE, INFO_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: it is not a dataset folder written by "
                "sae-lens, sae-cache-ext or `Dataset.save_to_disk`."
            )
    manifest = read_manifest(folder)
    config, config_source = read_config(folder, manifest)
    features = features_of(read_json(folder / INFO_FILE))
    filenames = data_filenames(read_json(folder / STATE_FILE))
    hook = hook_column(features, config)
    shape = features[hook].shape if hook is not None else (None, None)
    if manifest is not None and isinstance(manifest.get("rows"), int):
        rows = manifest["rows"]
    else:
        rows = sum(arrow_rows(folder / name)[0] for name in filenames)
    facts = (
        None
        if manifest is None
        else {k: v for k, v in manifest.items() if k not in ("config", "shards")}
    )
    return {
        "path": str(folder.absolute()),
        "made_by": TOOL if manifest is not None else "sae-lens (no manifest)",
        "schema": {name: feature_text(f) for name, f in features.items()},
        "hook_name": hook,
        "dtype": features[hook].dtype if hook is not None else None,
        "d_in": shape[1],
        "context_size": shape[0],
        "rows": rows,
        "tokens": rows * shape[0] if shape[0] is not None else None,
        "data_files": filenames,
        "data_bytes": sum(
            (folder / n).stat().st_size for n in filenames if (folder / n).is_file()
        ),
        "size_bytes": folder_bytes(folder),
        "config": config,
        "config_source": config_source,
        "manifest": facts,
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _fact_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fact_text(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _aligned(pairs: list[tuple[str, str]], indent: str) -> list[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in pairs]


def statistics_lines(statistics: dict[str, Any] | None, indent: str) -> list[str]:
    """One line per hook: tokens, norms, largest magnitude, non-finite values, and
    the spread of the per-dimension means and variances."""
    if not statistics:
        return []
    pairs = []
    for hook, stats in statistics.items():
        q = stats["norm_quantiles"]
        mean, var = stats["mean"], stats["var"]
        norm = stats["norm_mean"]
        pairs.append(
            (
                hook,
                f"{stats['count']:,} tokens; L2 norm mean "
                f"{_fact_text(norm)}, 1%/50%/99% "
                f"{_fact_text(q['0.01'])}/{_fact_text(q['0.5'])}/"
                f"{_fact_text(q['0.99'])}; max |x| {_fact_text(stats['max_abs'])}; "
                f"non-finite {stats['non_finite']}; per-dimension mean in "
                f"[{_fact_text(min(mean, default=0.0))}, "
                f"{_fact_text(max(mean, default=0.0))}], variance in "
                f"[{_fact_text(min(var, default=0.0))}, "
                f"{_fact_text(max(var, default=0.0))}]",
            )
        )
    return [f"{indent}statistics", *_aligned(pairs, indent + "  ")]


def format_description(desc: dict[str, Any]) -> str:
    """`describe_cache`'s dict as human-readable lines."""
    tokens = desc["tokens"]
    pairs = [
        ("made by", desc["made_by"]),
        ("hook", str(desc["hook_name"])),
        ("dtype", str(desc["dtype"])),
        (
            "rows",
            f"{desc['rows']:,} rows x {desc['context_size']} tokens"
            f" = {tokens:,} tokens, d_in {desc['d_in']}"
            if tokens is not None
            else f"{desc['rows']:,}",
        ),
        (
            "size on disk",
            f"{_human_bytes(desc['size_bytes'])} ({desc['size_bytes']:,} bytes); "
            f"{len(desc['data_files'])} data files, {_human_bytes(desc['data_bytes'])}",
        ),
    ]
    if desc.get("hook_datasets"):
        pairs.append(
            (
                "datasets (one per hook)",
                "; ".join(
                    f"{hook}: d_in {entry['d_in']} in {entry['folder']}/"
                    for hook, entry in desc["hook_datasets"].items()
                ),
            )
        )
    facts = desc["manifest"] or {}
    shown = ("tool", "rows", "tokens", *tables.SHOWN)  # in the lines above or below
    special = ("statistics", "envelope")  # below, in their own words
    pairs += [
        (k, _fact_text(v)) for k, v in sorted(facts.items()) if k not in shown + special
    ]
    envelope = envelope_text(facts.get("envelope"))
    if envelope is not None:
        pairs.append(("envelope", envelope))
    lines = [f"Activation cache at {desc['path']}", *_aligned(pairs, "  ")]
    lines += statistics_lines(facts.get("statistics"), "  ")
    lines += tables.format_accounting(facts)
    lines += ["  schema", *_aligned(list(desc["schema"].items()), "    ")]
    if desc["config"] is not None:
        lines.append(f"  config (from {desc['config_source']})")
        config = sorted(desc["config"].items())
        lines += _aligned([(k, json.dumps(v)) for k, v in config], "    ")
    else:
        lines.append("  config: unknown (no manifest or config file)")
    return "\n".join(lines)

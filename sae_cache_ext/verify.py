"""What a cache holds (`describe_cache`) and whether it is intact (`verify_cache`).

`describe_cache` reads metadata only (`dataset_info.json`, `state.json`, the manifest)
and the sizes of the files; it works on any folder `datasets.save_to_disk` or
sae-lens's runner wrote, with more facts when our manifest is there.

`verify_cache` checks, and lists in `VerifyReport.checks`:

- manifest: it is ours, finished, and complete enough to check against;
- data files: `state.json` lists the manifest's shards, in order, each one exists,
  has the recorded size, and no stray Arrow file lies beside them;
- row counts: every Arrow stream reads (fully validated) and holds its recorded
  rows; the totals agree with the manifest and `load_from_disk`;
- checksums: the sha256 of every data file matches the manifest (so any flipped
  byte is found, even one inside the activations that still loads);
- load_from_disk: `datasets` opens the folder;
- schema: the hook column is `Array2D(context_size, d_in)` in the stored dtype and
  `token_ids` is `Sequence(int32, length=context_size)`;
- re-run (with a model): a seeded sample of rows is run through the model again and
  compared with the stored activations (`compare_activations`).

Shapes: B rows re-run (b: one model batch of them), T tokens per row (the stored
context size), D d_in, N rows in the cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import numpy as np
import pyarrow as pa
import torch
from datasets import Array2D, Dataset, Features, Sequence, Value, load_from_disk
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.hub import CONFIG_FILENAME
from sae_cache_ext.staging import MARKER, STATE_COMPLETE, TOOL
from sae_cache_ext.writer import TOKEN_IDS, file_sha256

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"

CHECK_MANIFEST = "manifest"
CHECK_FILES = "data files"
CHECK_ROWS = "row counts"
CHECK_CHECKSUMS = "checksums"
CHECK_LOAD = "load_from_disk"
CHECK_SCHEMA = "schema"
CHECK_RERUN = "re-run"

_CONFIG_KEYS = ("hook_name", "context_size", "d_in", "dtype")

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-4, 1e-4),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
"""Re-run tolerances `(atol, rtol)` by precision. `atol` is a fraction of the
activation scale (the RMS of the stored values compared), `rtol` of each value. The
default for a cache is the looser of its stored dtype's and the model's compute
dtype's (bfloat16 when the cache was made with `autocast_lm=True`)."""


# -- reading a cache folder -----------------------------------------------------------


def _cache_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"path={str(folder)!r} is not a folder. Pass the folder a cache was "
            "written to (the one holding state.json and the .arrow files)."
        )
    return folder


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """Our manifest, None when the folder has none (a plain sae-lens cache)."""
    if not (folder / MARKER).exists():
        return None
    manifest = _read_json(folder / MARKER)
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        raise ValueError(f"{folder / MARKER} was not written by {TOOL}.")
    return manifest


def _read_config(
    folder: Path, manifest: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The config the cache was made with, and the file it came from."""
    if manifest is not None and isinstance(manifest.get("config"), dict):
        return manifest["config"], MARKER
    if (folder / CONFIG_FILENAME).exists():  # sae-lens's (and our) Hub metadata
        return _read_json(folder / CONFIG_FILENAME), CONFIG_FILENAME
    return None, None


def _data_filenames(state: Any) -> list[str]:
    return [entry["filename"] for entry in state["_data_files"]]


def _features_of(info: Any) -> Features:
    return Features.from_dict(info["features"])


def _hook_column(features: Features, config: dict[str, Any] | None) -> str | None:
    hook = None if config is None else config.get("hook_name")
    if hook in features and isinstance(features[hook], Array2D):
        return hook
    arrays = [name for name, f in features.items() if isinstance(f, Array2D)]
    return arrays[0] if len(arrays) == 1 else None


def _sliced_context_size(context_size: int, seqpos_slice: Any) -> int:
    """Row length after `seqpos_slice` (sae-lens's `_get_sliced_context_size`)."""
    if seqpos_slice is None:
        return context_size
    return len(range(context_size)[slice(*seqpos_slice)])


def _arrow_rows(path: Path, validate: bool = False) -> tuple[int, pa.Schema]:
    """Rows in an Arrow stream file, and its schema; `validate` checks every batch's
    buffers and offsets, so corrupt structure raises here and not on first use."""
    with pa.memory_map(str(path), "r") as source:
        reader = pa.ipc.open_stream(source)
        n_rows = 0
        for batch in reader:
            if validate:
                batch.validate(full=True)
            n_rows += batch.num_rows
        return n_rows, reader.schema


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- describe -------------------------------------------------------------------------


def describe_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the cache at `path` holds, as JSON-ready values (for `sae-cache-ext info`).

    Keys: `path`, `made_by`, `schema` (column -> feature), `hook_name`, `dtype`,
    `d_in`, `context_size` (tokens per stored row), `rows`, `tokens`, `data_files`,
    `data_bytes`, `size_bytes` (every file in the folder), `config` and
    `config_source` (None without a manifest or config file), and `manifest` (the
    manifest's other facts: versions, timings, counts; None without one). Rows come
    from the manifest, or are counted in the Arrow files when there is none.
    """
    folder = _cache_folder(path)
    manifest = _read_manifest(folder)
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
        }
    for name in (STATE_FILE, INFO_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: it is not a dataset folder written by "
                "sae-lens, sae-cache-ext or `Dataset.save_to_disk`."
            )
    manifest = _read_manifest(folder)
    config, config_source = _read_config(folder, manifest)
    features = _features_of(_read_json(folder / INFO_FILE))
    filenames = _data_filenames(_read_json(folder / STATE_FILE))
    hook = _hook_column(features, config)
    shape = features[hook].shape if hook is not None else (None, None)
    if manifest is not None and isinstance(manifest.get("rows"), int):
        rows = manifest["rows"]
    else:
        rows = sum(_arrow_rows(folder / name)[0] for name in filenames)
    facts = (
        None
        if manifest is None
        else {k: v for k, v in manifest.items() if k not in ("config", "shards")}
    )
    return {
        "path": str(folder.absolute()),
        "made_by": TOOL if manifest is not None else "sae-lens (no manifest)",
        "schema": {name: _feature_text(f) for name, f in features.items()},
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


def _feature_text(feature: Any) -> str:
    if isinstance(feature, Array2D):
        return f"Array2D(shape={tuple(feature.shape)}, dtype={feature.dtype})"
    inner = getattr(feature, "feature", None)
    if isinstance(inner, Value):
        return f"Sequence({inner.dtype}, length={getattr(feature, 'length', -1)})"
    if isinstance(feature, Value):
        return f"Value({feature.dtype})"
    return repr(feature)


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
    shown = ("tool", "rows", "tokens")  # already in the lines above
    pairs += [(k, _fact_text(v)) for k, v in sorted(facts.items()) if k not in shown]
    lines = [f"Activation cache at {desc['path']}", *_aligned(pairs, "  ")]
    lines += ["  schema", *_aligned(list(desc["schema"].items()), "    ")]
    if desc["config"] is not None:
        lines.append(f"  config (from {desc['config_source']})")
        config = sorted(desc["config"].items())
        lines += _aligned([(k, json.dumps(v)) for k, v in config], "    ")
    else:
        lines.append("  config: unknown (no manifest or config file)")
    return "\n".join(lines)


# -- comparing a re-run with the stored activations -----------------------------------


@dataclass(frozen=True)
class ErrorStats:
    """How a re-run differs from the stored activations.

    `max_rel_error` is the largest `|rerun - stored| / |stored|` over the values with
    `|stored| > atol * activation_scale`: smaller values are judged by `atol` alone,
    so values near zero do not blow it up.
    """

    max_abs_error: float
    max_rel_error: float
    activation_scale: float
    n_values: int
    n_outside: int


def compare_activations(
    rerun_BTD: torch.Tensor, stored_BTD: torch.Tensor, atol: float, rtol: float
) -> ErrorStats:
    """Compare like `torch.allclose`, with `atol` scaled by the activation scale: a
    value is outside when `|rerun - stored| > atol * scale + rtol * |stored|`, where
    scale is the RMS of `stored`. NaN or infinite differences are always outside."""
    if rerun_BTD.shape != stored_BTD.shape:
        raise ValueError(
            f"rerun_BTD has shape {tuple(rerun_BTD.shape)} but stored_BTD has "
            f"{tuple(stored_BTD.shape)}: compare activations of the same rows."
        )
    rerun, stored = rerun_BTD.double(), stored_BTD.double()
    finite = stored[torch.isfinite(stored)]
    scale = finite.square().mean().sqrt().item() if finite.numel() else 0.0
    error = torch.nan_to_num((rerun - stored).abs(), nan=torch.inf)
    floor = atol * scale
    outside = error > floor + rtol * stored.abs()
    large = stored.abs() > floor
    rel = error[large] / stored.abs()[large]
    return ErrorStats(
        max_abs_error=error.max().item() if error.numel() else 0.0,
        max_rel_error=rel.max().item() if rel.numel() else 0.0,
        activation_scale=scale,
        n_values=error.numel(),
        n_outside=int(outside.sum().item()),
    )


def default_tolerances(stored_dtype: str, compute_dtype: str) -> tuple[float, float]:
    """The looser of `DEFAULT_TOLERANCES` for the two dtypes (float32's if unknown)."""
    fallback = DEFAULT_TOLERANCES["float32"]
    a = DEFAULT_TOLERANCES.get(stored_dtype, fallback)
    b = DEFAULT_TOLERANCES.get(compute_dtype, fallback)
    return max(a[0], b[0]), max(a[1], b[1])


def _model_device(model: HookedRootModule) -> torch.device:
    embed = getattr(model, "W_E", None)
    if isinstance(embed, torch.Tensor):
        return embed.device
    return next(iter(model.parameters()), torch.empty(0)).device


def _compute_dtype(model: HookedRootModule, autocast: bool) -> str:
    if autocast:
        return "bfloat16"
    dtype = getattr(getattr(model, "cfg", None), "dtype", torch.float32)
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def rerun_activations(
    model: HookedRootModule,
    toks_BT: torch.Tensor,
    hook_name: str,
    model_kwargs: dict[str, Any] | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    """The model's activations at `hook_name` for `toks_BT`, exactly as sae-lens's
    `ActivationsStore.get_activations` computes them (no BOS added), as `acts_BTD`
    on the CPU."""
    device = _model_device(model)
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=autocast
    ):
        _, cache = model.run_with_cache(
            toks_BT.to(device),
            names_filter=[hook_name],
            stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name),
            prepend_bos=False,
            **(model_kwargs or {}),
        )
    return einops.rearrange(cache[hook_name], "b t ... -> b t (...)").cpu()


# -- verify ---------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What `verify_cache` found. `ok` is False when there is any problem."""

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    """Names of the checks that ran (the `CHECK_*` constants), in order."""
    skipped: list[str] = field(default_factory=list)
    """Checks that did not run, each with the reason (not failures)."""
    rerun_rows: list[int] = field(default_factory=list)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    activation_scale: float | None = None
    atol: float | None = None
    rtol: float | None = None

    def format(self) -> str:
        n = len(self.problems)
        verdict = "OK" if self.ok else f"FAILED ({n} problem{'s' * (n != 1)})"
        lines = [
            f"Verified {self.path}: {verdict}",
            f"  checks: {', '.join(self.checks)}",
        ]
        if self.max_abs_error is not None:
            lines.append(
                f"  re-run of {len(self.rerun_rows)} rows {self.rerun_rows}: "
                f"max abs error {self.max_abs_error:.3g}, max rel error "
                f"{self.max_rel_error:.3g} (activation scale "
                f"{self.activation_scale:.3g}; tolerance atol {self.atol:g} x scale, "
                f"rtol {self.rtol:g})"
            )
        lines += [f"  skipped: {reason}" for reason in self.skipped]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


@dataclass
class _Expected:
    """What the schema should be: from the manifest's config, else from the files."""

    hook_name: str | None
    context_size: int | None
    d_in: int | None
    dtype: str | None


def verify_cache(
    path: str | os.PathLike[str],
    model: HookedRootModule | None = None,
    rows: int = 8,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Check the cache at `path` (see the module docstring for the checks).

    With `model` (an already-loaded HookedTransformer), `rows` rows drawn with a
    generator seeded by `seed` are run again and compared with the stored
    activations within `atol` (a fraction of the activation scale) and `rtol`
    (defaults: `DEFAULT_TOLERANCES`). The re-run is skipped, with the reason in
    `skipped`, when rows are not whole original sequences or a check failed.
    """
    if rows < 0:
        raise ValueError(f"rows={rows} is negative: pass the number of rows to re-run.")
    folder = _cache_folder(path)
    report = VerifyReport(path=str(folder.absolute()), ok=False)
    manifest = _check_manifest(folder, report)
    if manifest is not None and isinstance(manifest.get("hook_datasets"), dict):
        return _verify_hook_datasets(
            folder, manifest, report, model, rows, seed, atol, rtol
        )
    config = manifest["config"] if manifest is not None else None
    features = _load_json_part(folder, INFO_FILE, report, _features_of)
    listed = _load_json_part(folder, STATE_FILE, report, _data_filenames)
    expected = _expected_schema(config, features)
    dataset = None
    if listed is not None:
        counted = _check_files(folder, listed, manifest, features, report)
        dataset = _check_load(folder, counted, report)
    if features is not None:
        report.checks.append(CHECK_SCHEMA)
        report.problems += _schema_problems(features, expected)
    if model is None:
        report.skipped.append(f"{CHECK_RERUN}: no model given")
    else:
        _rerun(dataset, model, config, expected, rows, seed, (atol, rtol), report)
    report.ok = not report.problems
    logger.info("Verified %s: %s", folder, "OK" if report.ok else report.problems)
    return report


def _verify_hook_datasets(
    folder: Path,
    manifest: dict[str, Any],
    report: VerifyReport,
    model: HookedRootModule | None,
    rows: int,
    seed: int,
    atol: float | None,
    rtol: float | None,
) -> VerifyReport:
    """A cache of several hooks: verify each hook's dataset, and that they hold the
    same rows and the same `token_ids`."""
    token_ids = None
    for hook, entry in manifest["hook_datasets"].items():
        sub = verify_cache(folder / entry["folder"], model, rows, seed, atol, rtol)
        report.checks += [f"{hook}: {check}" for check in sub.checks]
        report.skipped += [f"{hook}: {reason}" for reason in sub.skipped]
        report.problems += [f"{hook}: {problem}" for problem in sub.problems]
        if sub.rerun_rows:
            report.rerun_rows = sub.rerun_rows
            report.atol, report.rtol = sub.atol, sub.rtol
            for name in ("max_abs_error", "max_rel_error", "activation_scale"):
                values = [getattr(report, name), getattr(sub, name)]
                known = [v for v in values if v is not None]
                setattr(report, name, max(known) if known else None)
        if not sub.ok:
            continue
        ids = Dataset.load_from_disk(str(folder / entry["folder"])).with_format(
            "numpy"
        )[TOKEN_IDS]
        if token_ids is None:
            token_ids = np.asarray(ids)
        elif not np.array_equal(token_ids, np.asarray(ids)):
            report.problems.append(
                f"{hook}: its token_ids differ from the first hook's: the hooks' "
                "rows no longer line up."
            )
    report.checks.append("same token_ids in every hook")
    report.ok = not report.problems
    return report


def _check_manifest(folder: Path, report: VerifyReport) -> dict[str, Any] | None:
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError) as error:
        report.checks.append(CHECK_MANIFEST)
        report.problems.append(f"{MARKER} cannot be read: {error}")
        return None
    if manifest is None:
        report.skipped.append(
            f"{CHECK_CHECKSUMS}: no {MARKER} (a plain sae-lens cache), so there are no "
            "checksums or per-file row counts to check against"
        )
        return None
    report.checks.append(CHECK_MANIFEST)
    if manifest.get("state") != STATE_COMPLETE:
        report.problems.append(
            f"{MARKER} says state={manifest.get('state')!r}, not {STATE_COMPLETE!r}: "
            "this cache was never finished (the run crashed or is still running). "
            "Run the caching again."
        )
    config = manifest.get("config")
    missing = [k for k in ("config", "shards", "rows") if k not in manifest]
    if isinstance(config, dict):
        missing += [f"config.{k}" for k in _CONFIG_KEYS if k not in config]
    if missing:
        report.problems.append(f"{MARKER} lacks {missing}: it cannot be checked.")
        return None
    return manifest


def _load_json_part(folder: Path, name: str, report: VerifyReport, parse: Any) -> Any:
    try:
        return parse(_read_json(folder / name))
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.problems.append(f"{name} cannot be read: {error!r}")
        return None


def _expected_schema(
    config: dict[str, Any] | None, features: Features | None
) -> _Expected:
    if config is not None:
        return _Expected(
            hook_name=config.get("hook_name"),
            context_size=_sliced_context_size(
                config["context_size"], config.get("seqpos_slice")
            ),
            d_in=config.get("d_in"),
            dtype=config.get("dtype"),
        )
    hook = None if features is None else _hook_column(features, None)
    if features is None or hook is None:
        return _Expected(hook, None, None, None)
    context_size, d_in = features[hook].shape
    return _Expected(hook, context_size, d_in, features[hook].dtype)


def _check_files(
    folder: Path,
    listed: list[str],
    manifest: dict[str, Any] | None,
    features: Features | None,
    report: VerifyReport,
) -> int:
    """Data files, row counts and checksums; returns the rows counted in the files."""
    report.checks.append(CHECK_FILES)
    shards = {s["filename"]: s for s in manifest["shards"]} if manifest else {}
    if manifest is not None and list(shards) != listed:
        report.problems.append(
            f"{STATE_FILE} lists data files {listed} but {MARKER} records "
            f"{list(shards)}: the folder's file list was changed."
        )
    stray = sorted({p.name for p in folder.glob("*.arrow")} - set(listed))
    if stray:
        report.problems.append(f"Arrow files not listed in {STATE_FILE}: {stray}.")
    report.checks.append(CHECK_ROWS)
    if manifest is not None:
        report.checks.append(CHECK_CHECKSUMS)
    schema = features.arrow_schema if features is not None else None
    counted = 0
    for name in dict.fromkeys([*listed, *shards]):
        problems, n_rows = _file_problems(folder / name, shards.get(name), schema)
        report.problems += problems
        counted += n_rows
    if manifest is not None:
        report.problems += _total_problems(manifest, counted)
    return counted


def _file_problems(
    path: Path, shard: dict[str, Any] | None, schema: pa.Schema | None
) -> tuple[list[str], int]:
    if not path.is_file():
        return [
            f"data file {path.name} is missing: restore it, or cache the "
            "activations again."
        ], 0
    problems = []
    if shard is not None and path.stat().st_size != shard.get("nbytes"):
        problems.append(
            f"{path.name} is {path.stat().st_size} bytes; {MARKER} records "
            f"{shard.get('nbytes')}."
        )
    try:
        n_rows, file_schema = _arrow_rows(path, validate=True)
    except Exception as error:  # a corrupt file can make pyarrow raise anything
        problems.append(f"{path.name} is not a readable Arrow stream: {error!r}")
        n_rows, file_schema = 0, None
    if (
        file_schema is not None
        and schema is not None
        and not file_schema.equals(schema, check_metadata=False)
    ):
        problems.append(
            f"{path.name} has an Arrow schema that differs from what {INFO_FILE} "
            f"describes: {file_schema} vs {schema}."
        )
    if shard is not None and file_schema is not None and n_rows != shard.get("rows"):
        problems.append(
            f"{path.name} holds {n_rows} rows; {MARKER} records {shard.get('rows')}."
        )
    if shard is not None and file_sha256(path) != shard.get("sha256"):
        problems.append(
            f"{path.name} does not match its sha256 in {MARKER}: the file was "
            "changed or corrupted after it was written; restore it from a copy, or "
            "cache the activations again."
        )
    return problems, n_rows


def _total_problems(manifest: dict[str, Any], counted: int) -> list[str]:
    problems = []
    recorded = sum(s.get("rows", 0) for s in manifest["shards"])
    if manifest["rows"] != recorded:
        problems.append(
            f"{MARKER} records rows={manifest['rows']} but its shards add up to "
            f"{recorded}."
        )
    if counted != manifest["rows"]:
        problems.append(
            f"the data files hold {counted} rows; {MARKER} records {manifest['rows']}."
        )
    config = manifest["config"]
    per_row = _sliced_context_size(config["context_size"], config.get("seqpos_slice"))
    tokens = manifest.get("tokens")
    if tokens is not None and tokens != manifest["rows"] * per_row:
        problems.append(
            f"{MARKER} records tokens={tokens}, not rows x tokens per row = "
            f"{manifest['rows']} x {per_row}."
        )
    return problems


def _check_load(folder: Path, counted: int, report: VerifyReport) -> Dataset | None:
    report.checks.append(CHECK_LOAD)
    try:
        dataset = load_from_disk(str(folder))
    except Exception as error:  # any failure to load is the finding
        report.problems.append(f"load_from_disk({str(folder)!r}) fails: {error!r}")
        return None
    if not isinstance(dataset, Dataset):
        report.problems.append(f"{folder} holds a DatasetDict, not one cache.")
        return None
    if dataset.num_rows != counted:
        report.problems.append(
            f"load_from_disk sees {dataset.num_rows} rows; the data files hold {counted}."
        )
    return dataset


def _schema_problems(features: Features, expected: _Expected) -> list[str]:
    hook, ctx, d_in, dtype = (
        expected.hook_name,
        expected.context_size,
        expected.d_in,
        expected.dtype,
    )
    if hook is None or ctx is None:
        return [
            f"cannot tell the hook column: columns are {list(features)}, expected "
            f"exactly one Array2D column beside {TOKEN_IDS!r}."
        ]
    problems = []
    extra = sorted(set(features) - {hook, TOKEN_IDS})
    if extra:
        problems.append(
            f"unexpected columns {extra} beside {hook!r} and {TOKEN_IDS!r}."
        )
    want_hook = Array2D(shape=(ctx, d_in), dtype=str(dtype))
    if features.get(hook) != want_hook:
        found = _feature_text(features[hook]) if hook in features else "no such column"
        problems.append(
            f"column {hook!r} is {found}, expected {_feature_text(want_hook)}."
        )
    want_toks = Sequence(Value("int32"), length=ctx)
    if features.get(TOKEN_IDS) != want_toks:
        found = (
            _feature_text(features[TOKEN_IDS])
            if TOKEN_IDS in features
            else "no such column"
        )
        problems.append(
            f"column {TOKEN_IDS!r} is {found}, expected {_feature_text(want_toks)}."
        )
    return problems


def _rerun_skip_reason(
    config: dict[str, Any] | None, report: VerifyReport
) -> str | None:
    if report.problems:
        return "the checks above found problems; fix those first"
    if config is None:
        return (
            f"no {MARKER}, so it is unknown whether rows are whole original sequences"
        )
    if config.get("shuffle_across_sequences"):
        return (
            "shuffle_across_sequences=True permuted tokens across rows, so rows are "
            "not original sequences"
        )
    if config.get("exclude_special_tokens") not in (False, None, []):
        return (
            "exclude_special_tokens removed tokens and re-packed the rest, so rows "
            "are not original sequences"
        )
    ctx = config["context_size"]
    if _sliced_context_size(ctx, config.get("seqpos_slice")) != ctx:
        return (
            f"seqpos_slice={config.get('seqpos_slice')} stored only part of each "
            "sequence, so the stored tokens are not the model's input"
        )
    return None


def _sample_rows(n_rows: int, rows: int, seed: int) -> list[int]:
    """`rows` distinct row indices (all when there are fewer), seeded, sorted."""
    perm_N = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return sorted(perm_N[:rows].tolist())


def _rerun(
    dataset: Dataset | None,
    model: HookedRootModule,
    config: dict[str, Any] | None,
    expected: _Expected,
    rows: int,
    seed: int,
    tolerances: tuple[float | None, float | None],
    report: VerifyReport,
) -> None:
    reason = _rerun_skip_reason(config, report)
    if reason is None and (rows == 0 or dataset is None or dataset.num_rows == 0):
        reason = "no rows to re-run"
    if (
        reason is not None
        or config is None
        or dataset is None
        or expected.hook_name is None
    ):
        report.skipped.append(f"{CHECK_RERUN}: {reason or 'no hook column'}")
        return
    report.checks.append(CHECK_RERUN)
    hook, autocast = expected.hook_name, bool(config.get("autocast_lm"))
    indices = _sample_rows(dataset.num_rows, rows, seed)
    sample = dataset.with_format("numpy")[indices]
    toks_BT = torch.from_numpy(np.asarray(sample[TOKEN_IDS]).astype(np.int64))
    stored_BTD = torch.from_numpy(np.asarray(sample[hook]))
    batch_size = int(config.get("model_batch_size") or len(indices))
    rerun_BTD = torch.cat(
        [
            rerun_activations(
                model, toks_bT, hook, config.get("model_kwargs"), autocast
            )
            for toks_bT in toks_BT.split(max(1, batch_size))
        ]
    )
    default = default_tolerances(str(expected.dtype), _compute_dtype(model, autocast))
    atol = default[0] if tolerances[0] is None else tolerances[0]
    rtol = default[1] if tolerances[1] is None else tolerances[1]
    report.rerun_rows, report.atol, report.rtol = indices, atol, rtol
    if rerun_BTD.shape != stored_BTD.shape:
        report.problems.append(
            f"re-run: the model gives activations of shape {tuple(rerun_BTD.shape)} "
            f"at {hook!r}, the cache stores {tuple(stored_BTD.shape)}: this is not "
            "the model (or hook) the cache was made with."
        )
        return
    stats = compare_activations(rerun_BTD, stored_BTD, atol, rtol)
    report.max_abs_error = stats.max_abs_error
    report.max_rel_error = stats.max_rel_error
    report.activation_scale = stats.activation_scale
    if stats.n_outside:
        report.problems.append(
            f"re-run: {stats.n_outside} of {stats.n_values} values differ from the "
            f"stored activations by more than atol x scale + rtol x |stored| "
            f"(atol={atol:g}, rtol={rtol:g}, scale={stats.activation_scale:.3g}); "
            f"max abs error {stats.max_abs_error:.3g}, max rel error "
            f"{stats.max_rel_error:.3g}. Check that this is the model the cache was "
            f"made with (model_name={config.get('model_name')!r}), or pass larger "
            "atol/rtol if a difference is expected (another device or dtype)."
        )

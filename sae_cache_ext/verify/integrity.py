"""Integrity checks of a cache folder against its manifest: the manifest itself, the
data files (listed, present, sizes, no strays), row counts, sha256 checksums,
`load_from_disk`, and the schema. Each appends what it ran and found to a
`VerifyReport`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Array2D, Dataset, Features, Sequence, Value, load_from_disk

from sae_cache_ext.staging import MARKER, STATE_COMPLETE
from sae_cache_ext.verify.folder import (
    INFO_FILE,
    STATE_FILE,
    arrow_rows,
    feature_text,
    hook_column,
    read_json,
    read_manifest,
    sliced_context_size,
)
from sae_cache_ext.verify.report import (
    CHECK_CHECKSUMS,
    CHECK_FILES,
    CHECK_LOAD,
    CHECK_MANIFEST,
    CHECK_ROWS,
    Expected,
    VerifyReport,
)
from sae_cache_ext.writer import TOKEN_IDS, TOKEN_POSITIONS, file_sha256

_CONFIG_KEYS = ("hook_name", "context_size", "d_in", "dtype")


def check_manifest(folder: Path, report: VerifyReport) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(folder)
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


def load_json_part(folder: Path, name: str, report: VerifyReport, parse: Any) -> Any:
    try:
        return parse(read_json(folder / name))
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.problems.append(f"{name} cannot be read: {error!r}")
        return None


def expected_schema(
    config: dict[str, Any] | None, features: Features | None
) -> Expected:
    if config is not None:
        return Expected(
            hook_name=config.get("hook_name"),
            context_size=sliced_context_size(
                config["context_size"], config.get("seqpos_slice")
            ),
            d_in=config.get("d_in"),
            dtype=config.get("dtype"),
        )
    hook = None if features is None else hook_column(features, None)
    if features is None or hook is None:
        return Expected(hook, None, None, None)
    context_size, d_in = features[hook].shape
    return Expected(hook, context_size, d_in, features[hook].dtype)


def check_files(
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
        n_rows, file_schema = arrow_rows(path, validate=True)
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
    per_row = sliced_context_size(config["context_size"], config.get("seqpos_slice"))
    tokens = manifest.get("tokens")
    if tokens is not None and tokens != manifest["rows"] * per_row:
        problems.append(
            f"{MARKER} records tokens={tokens}, not rows x tokens per row = "
            f"{manifest['rows']} x {per_row}."
        )
    return problems


def check_load(folder: Path, counted: int, report: VerifyReport) -> Dataset | None:
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


def schema_problems(features: Features, expected: Expected) -> list[str]:
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
    extra = sorted(set(features) - {hook, TOKEN_IDS, TOKEN_POSITIONS})
    if extra:
        problems.append(
            f"unexpected columns {extra} beside {hook!r} and {TOKEN_IDS!r}."
        )
    want_hook = Array2D(shape=(ctx, d_in), dtype=str(dtype))
    if features.get(hook) != want_hook:
        found = feature_text(features[hook]) if hook in features else "no such column"
        problems.append(
            f"column {hook!r} is {found}, expected {feature_text(want_hook)}."
        )
    want_positions = Array2D(shape=(ctx, 2), dtype="int64")
    if TOKEN_POSITIONS in features and features[TOKEN_POSITIONS] != want_positions:
        problems.append(
            f"column {TOKEN_POSITIONS!r} is {feature_text(features[TOKEN_POSITIONS])}"
            f", expected {feature_text(want_positions)}."
        )
    want_toks = Sequence(Value("int32"), length=ctx)
    if features.get(TOKEN_IDS) != want_toks:
        found = (
            feature_text(features[TOKEN_IDS])
            if TOKEN_IDS in features
            else "no such column"
        )
        problems.append(
            f"column {TOKEN_IDS!r} is {found}, expected {feature_text(want_toks)}."
        )
    return problems

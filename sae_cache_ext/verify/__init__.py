"""Whether a cache is intact (`verify_cache`), and what it holds (`describe_cache`).

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
  compared with the stored activations (`compare_activations`); with
  `store_token_positions`, each sampled token from its rebuilt context (the run's
  dataset replayed), so also after exclusion and every shuffle;
- with several hooks: each hook's dataset as above, and the same `token_ids` in all.

Rooms, lowest first: `folder` (reading a cache folder), `report` (the report and
check names), `integrity` (files, checksums, rows, schema), `rerun` (the model
re-run), `positions` (the re-run from `token_positions`), `describe` (`describe_cache` and `format_description`, for `info`). This
module wires the checks together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.verify.describe import (
    describe_cache,
    folder_bytes,
    format_description,
)
from sae_cache_ext.verify.folder import (
    INFO_FILE,
    STATE_FILE,
    cache_folder,
    data_filenames,
    features_of,
)
from sae_cache_ext.verify.integrity import (
    check_files,
    check_load,
    check_manifest,
    expected_schema,
    load_json_part,
    schema_problems,
)
from sae_cache_ext.verify.positions import check_position_rerun
from sae_cache_ext.verify.report import (
    CHECK_CHECKSUMS,
    CHECK_FILES,
    CHECK_LOAD,
    CHECK_MANIFEST,
    CHECK_RERUN,
    CHECK_ROWS,
    CHECK_SCHEMA,
    VerifyReport,
)
from sae_cache_ext.verify.rerun import (
    DEFAULT_TOLERANCES,
    ErrorStats,
    check_rerun,
    compare_activations,
    default_tolerances,
    manifest_skip_reason,
    rerun_activations,
)
from sae_cache_ext.writer import TOKEN_IDS

__all__ = [
    "CHECK_CHECKSUMS",
    "CHECK_FILES",
    "CHECK_LOAD",
    "CHECK_MANIFEST",
    "CHECK_RERUN",
    "CHECK_ROWS",
    "CHECK_SCHEMA",
    "DEFAULT_TOLERANCES",
    "INFO_FILE",
    "STATE_FILE",
    "ErrorStats",
    "VerifyReport",
    "compare_activations",
    "default_tolerances",
    "describe_cache",
    "folder_bytes",
    "format_description",
    "manifest_skip_reason",
    "rerun_activations",
    "verify_cache",
]

logger = logging.getLogger(__name__)


ModelLoader = Callable[[], HookedRootModule]
"""Loads the model for the re-run; called only when the cache's rows can be re-run."""


def verify_cache(
    path: str | os.PathLike[str],
    model: HookedRootModule | ModelLoader | None = None,
    rows: int = 8,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    dataset: Dataset | IterableDataset | None = None,
) -> VerifyReport:
    """Check the cache at `path` (see the module docstring for the checks).

    With `model` (a HookedTransformer, or a function that loads one), `rows` rows drawn with a
    generator seeded by `seed` are run again and compared with the stored
    activations within `atol` (a fraction of the activation scale) and `rtol`
    (defaults: `DEFAULT_TOLERANCES`). The re-run is skipped, with the reason in
    `skipped`, when rows are not whole original sequences or a check failed. A
    loader is not called when the manifest already says the rows cannot be re-run.
    A cache made with `store_token_positions=True` re-runs every token of the
    sampled rows from its rebuilt context: the run's store replayed over `dataset`
    (default: the config's `dataset_path`, skipped with the reason if it cannot be
    loaded).
    """
    if rows < 0:
        raise ValueError(f"rows={rows} is negative: pass the number of rows to re-run.")
    folder = cache_folder(path)
    report = VerifyReport(path=str(folder.absolute()), ok=False)
    manifest = check_manifest(folder, report)
    if model is not None and not isinstance(model, HookedRootModule):
        reason = (
            "the checks above found problems; fix those first"
            if report.problems
            else manifest_skip_reason(manifest)
        )
        if reason is not None:
            # said up front: the model is never loaded
            report.skipped.append(f"{CHECK_RERUN}: {reason}")
            model = None
        else:
            model = model()
    if manifest is not None and isinstance(manifest.get("hook_datasets"), dict):
        return _verify_hook_datasets(
            folder, manifest, report, model, rows, seed, atol, rtol, dataset
        )
    config = manifest["config"] if manifest is not None else None
    features = load_json_part(folder, INFO_FILE, report, features_of)
    listed = load_json_part(folder, STATE_FILE, report, data_filenames)
    expected = expected_schema(config, features)
    cached = None
    if listed is not None:
        counted = check_files(folder, listed, manifest, features, report)
        cached = check_load(folder, counted, report)
    if features is not None:
        report.checks.append(CHECK_SCHEMA)
        report.problems += schema_problems(features, expected)
    if model is None:
        if not any(s.startswith(CHECK_RERUN) for s in report.skipped):
            report.skipped.append(f"{CHECK_RERUN}: no model given")
    else:
        report.envelope = None if manifest is None else manifest.get("envelope")
        tolerances = (atol, rtol)
        if config is not None and config.get("store_token_positions"):
            check_position_rerun(
                cached,
                model,
                manifest,
                expected,
                rows,
                seed,
                tolerances,
                report,
                dataset,
            )
        else:
            check_rerun(cached, model, config, expected, rows, seed, tolerances, report)
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
    dataset: Dataset | IterableDataset | None,
) -> VerifyReport:
    """A cache of several hooks: verify each hook's dataset, and that they hold the
    same rows and the same `token_ids`."""
    token_ids = None
    said_up_front = any(s.startswith(CHECK_RERUN) for s in report.skipped)
    for hook, entry in manifest["hook_datasets"].items():
        sub = verify_cache(
            folder / entry["folder"], model, rows, seed, atol, rtol, dataset
        )
        report.checks += [f"{hook}: {check}" for check in sub.checks]
        report.skipped += [
            f"{hook}: {reason}"
            for reason in sub.skipped
            if not (said_up_front and reason.startswith(CHECK_RERUN))
        ]
        report.problems += [f"{hook}: {problem}" for problem in sub.problems]
        if model is not None:
            report.envelope = manifest.get("envelope")
        if sub.rerun_rows:
            report.rerun_rows = sub.rerun_rows
            report.rerun_tokens = sub.rerun_tokens
            report.rerun_sequences = sub.rerun_sequences
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

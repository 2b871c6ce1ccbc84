"""The model re-run of a cache made with `store_token_positions=True`: a seeded
sample of rows, each token re-run from its rebuilt context (its `(sequence,
position)` in the sequences the run's store yielded, replayed from the dataset) and
compared with the stored activations, so also through exclusion and every shuffle.

Shapes: B rows sampled, T tokens per row, D d_in; N = B * T tokens, S sequences
replayed.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, cast

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.config_io import convert_field
from sae_cache_ext.config_schema import fields_by_name
from sae_cache_ext.data import is_local_dataset, load_local_dataset
from sae_cache_ext.provenance import source_sequences
from sae_cache_ext.verify.report import CHECK_RERUN, Expected, VerifyReport
from sae_cache_ext.verify.rerun import (
    data_parallel_reason,
    model_device,
    report_comparison,
    rerun_tokens,
    sample_rows,
)
from sae_cache_ext.writer import TOKEN_POSITIONS

SourceDataset = Dataset | IterableDataset


def config_from_manifest(
    config: dict[str, Any], model: HookedRootModule
) -> CacheActivationsRunnerConfig:
    """The run's config rebuilt from the manifest's (keys the class does not take
    are dropped), on the model's device."""
    specs = fields_by_name()
    names = {f.name for f in fields(CacheActivationsRunnerConfig)}
    values = {
        name: convert_field(specs[name], value, "manifest") if name in specs else value
        for name, value in config.items()
        if name in names
    }
    values["device"] = str(model_device(model))
    return CacheActivationsRunnerConfig(**values)


def load_source_dataset(
    cfg: CacheActivationsRunnerConfig,
) -> tuple[SourceDataset | None, str | None]:
    """The run's dataset loaded as the command line loads it (a local file or folder,
    else a Hub id as sae-lens's store loads it), or None and why it could not be."""
    path = cfg.dataset_path
    try:
        if is_local_dataset(path):
            return load_local_dataset(path), None
        from datasets import load_dataset

        loaded = load_dataset(path, split="train", streaming=cfg.streaming)
    except Exception as error:  # offline, gone, unreadable: a skip, with the cause
        return None, (
            f"the dataset the cache was made from, dataset_path={path!r}, could not "
            f"be loaded ({type(error).__name__}: {error}); pass it as "
            "verify_cache(..., dataset=...) to re-run the tokens"
        )
    if not isinstance(loaded, Dataset | IterableDataset):
        return None, f"dataset_path={path!r} loaded as {type(loaded).__name__}"
    return loaded, None


def check_position_rerun(
    dataset: Dataset | None,
    model: HookedRootModule,
    manifest: dict[str, Any] | None,
    expected: Expected,
    rows: int,
    seed: int,
    tolerances: tuple[float | None, float | None],
    report: VerifyReport,
    source: SourceDataset | None = None,
) -> None:
    """Re-run every token of `rows` seeded rows from its `token_positions` and
    compare with the stored activations. `source` is the run's dataset (default:
    loaded from the config's `dataset_path`)."""
    config = None if manifest is None else manifest.get("config")
    reason = None
    if report.problems:
        reason = "the checks above found problems; fix those first"
    elif config is None or dataset is None or expected.hook_name is None:
        reason = "no config or hook column"
    elif TOKEN_POSITIONS not in dataset.column_names:
        reason = f"store_token_positions=True but no {TOKEN_POSITIONS} column"
    elif rows == 0 or dataset.num_rows == 0:
        reason = "no rows to re-run"
    else:
        reason = data_parallel_reason(manifest)
    cfg = None
    if reason is None and config is not None:
        cfg = config_from_manifest(config, model)
        if source is None:
            source, reason = load_source_dataset(cfg)
    if reason is not None or cfg is None or config is None or dataset is None:
        report.skipped.append(f"{CHECK_RERUN}: {reason}")
        return
    hook = str(expected.hook_name)
    indices = sample_rows(dataset.num_rows, rows, seed)
    sample = dataset.with_format("numpy")[indices]
    positions_N2 = torch.from_numpy(np.asarray(sample[TOKEN_POSITIONS])).reshape(-1, 2)
    stored_ND = torch.from_numpy(np.asarray(sample[hook])).flatten(0, 1)
    # only as many sequences as the largest sampled sequence index needs
    sequences_ST = source_sequences(
        # sae-lens's store reads a streamed (iterable) dataset too
        cfg,
        model,
        cast(Dataset | None, source),
        int(positions_N2[:, 0].max()) + 1,
    )
    report.checks.append(CHECK_RERUN)
    rerun_ND = rerun_tokens(
        model,
        sequences_ST,
        positions_N2,
        hook,
        cfg.model_kwargs,
        autocast=cfg.autocast_lm,
        batch_size=cfg.model_batch_size,
    )
    report.rerun_rows = indices
    report.rerun_tokens = len(positions_N2)
    report.rerun_sequences = len(sequences_ST)
    report_comparison(
        rerun_ND[None], stored_ND[None], model, config, expected, tolerances, report
    )

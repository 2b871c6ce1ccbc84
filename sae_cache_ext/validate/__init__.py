"""Checks that refuse a bad run before any forward pass and before anything is written.

Three layers, cheapest first, each raising an error that names the field and the fix:

- `validate_config(cfg)`: the config's fields alone, no I/O (these belong in the
  config's `__post_init__`; they are re-checked here because a dataclass can be
  changed after it is built);
- `validate_output_path(cfg)`: the output path, read-only look at the disk;
- `validate_run(cfg, model, dataset)`: both of the above, then the model (device, hook,
  widths) and the dataset (columns, and a bounded sample tokenized as the store
  would, to prove it yields at least one row). Tokenizer calls only, no forward pass.

Rooms: `fields` (the config), `output` (the output path), `model` (device, hooks,
widths), `dataset` (the dataset's shape, a bounded sample), `tokens` (token options,
the sample's rows). This module runs them in that order.
"""

from __future__ import annotations

from datasets import Dataset, IterableDataset
from transformer_lens.hook_points import HookedRootModule

from sae_cache_ext.config import CacheActivationsRunnerConfig
from sae_cache_ext.validate.dataset import SAMPLE_DOCS, Sample, check_dataset_shape
from sae_cache_ext.validate.fields import validate_config
from sae_cache_ext.validate.model import check_device, check_hook, hook_width
from sae_cache_ext.validate.output import validate_output_path
from sae_cache_ext.validate.tokens import (
    check_pretokenized_rows,
    check_text_yields_a_row,
    check_token_options,
)

__all__ = [
    "SAMPLE_DOCS",
    "hook_width",
    "validate_config",
    "validate_output_path",
    "validate_run",
]


def validate_run(
    cfg: CacheActivationsRunnerConfig,
    model: HookedRootModule,
    dataset: Dataset | IterableDataset | None,
    check_output: bool = True,
    world_size: int = 1,
) -> None:
    """Check a whole run before it starts: no forward pass, nothing written.

    `dataset` is the `override_dataset` (None when the store loads
    `cfg.dataset_path`, which is then not checked). Raises `ValueError`,
    `FileExistsError` or `PermissionError` with the field to change. `world_size`
    is the number of data-parallel ranks (a finished cache is a run's only with the
    same number).
    """
    validate_config(cfg)
    if check_output:
        validate_output_path(cfg, world_size)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    check_device(cfg, model)
    check_hook(cfg, model)
    kind = check_dataset_shape(cfg, dataset)
    check_token_options(cfg, model, kind)
    if kind is None or dataset is None:
        return
    sample = Sample(dataset, kind.column, SAMPLE_DOCS)
    if kind.pretokenized:
        check_pretokenized_rows(cfg, model, sample)
    else:
        check_text_yields_a_row(cfg, model, sample)

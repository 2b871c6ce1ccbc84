"""The `override_dataset` itself: one split, with rows, and a column sae-lens's store
reads (`check_dataset_shape`); and a bounded, lazily read sample of it (`Sample`)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from sae_cache_ext.config import CacheActivationsRunnerConfig

logger = logging.getLogger(__name__)

SAMPLE_DOCS = 1000
"""Documents (or pretokenized rows) read from the dataset at most, to check it."""

# sae-lens's store picks the first of these columns that a row has.
_TOKEN_COLUMNS = ("tokens", "input_ids")
_TEXT_COLUMNS = ("text", "problem")
_CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")


@dataclass
class DatasetKind:
    column: str
    pretokenized: bool


def check_dataset_shape(
    cfg: CacheActivationsRunnerConfig, dataset: object
) -> DatasetKind | None:
    """The column the store will read, or None when the dataset is loaded later."""
    if dataset is None:
        if not cfg.dataset_path:
            raise ValueError(
                "dataset_path is empty and no override_dataset was given: set "
                "dataset_path, or pass the dataset as override_dataset."
            )
        logger.debug(
            "dataset_path=%r is loaded by the store; not checked here.",
            cfg.dataset_path,
        )
        return None
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        raise ValueError(
            f"override_dataset is a {type(dataset).__name__} with splits "
            f"{list(dataset)}: pass one split, e.g. override_dataset=dataset['train']."
        )
    if not isinstance(dataset, Dataset | IterableDataset):
        raise ValueError(
            f"override_dataset is a {type(dataset).__name__}: pass a datasets.Dataset "
            "or IterableDataset (e.g. Dataset.from_dict({'text': [...]}))."
        )
    first = next(iter(dataset), None)
    if first is None:
        why = (
            "sae-lens would take an empty Dataset for no dataset and download "
            f"dataset_path={cfg.dataset_path!r} instead"
            if isinstance(dataset, Dataset)
            else "sae-lens would stop with a bare StopIteration"
        )
        raise ValueError(
            f"override_dataset has no rows ({why}): pass a dataset with rows."
        )
    columns = list(first)
    candidates = (
        _CHAT_COLUMNS if cfg.use_chat_formatting else _TOKEN_COLUMNS + _TEXT_COLUMNS
    )
    column = next((c for c in candidates if c in columns), None)
    if column is None:
        raise ValueError(
            f"override_dataset has columns {columns}, none of which sae-lens reads: "
            f"name the text or token column one of {list(candidates)}, e.g. with "
            "dataset.rename_column('body', 'text')."
        )
    return DatasetKind(column, column in _TOKEN_COLUMNS and not cfg.use_chat_formatting)


class Sample:
    """The first `limit` values of `column`, read lazily; `exhausted` tells whether
    they were the whole dataset."""

    def __init__(self, dataset: Iterable[Any], column: str, limit: int) -> None:
        self._dataset, self.column, self._limit = dataset, column, limit
        self.read = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[Any]:
        rows = iter(self._dataset)
        for row in itertools.islice(rows, self._limit):
            self.read += 1
            yield row[self.column]
        self.exhausted = self.read < self._limit or next(rows, None) is None

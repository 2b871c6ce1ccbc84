"""Checks that need no model and no heavy import, run before torch is imported.

`check_before_loading(values)` looks at the typed config values (`config_io`): the
ranges of the sizes, the local dataset path (a path that looks local is never sent
to the Hub), the output path. The full checks (`validate`) run again once the model
is loaded; these only make the common mistakes answer in a fraction of a second.
`looks_local` decides whether a `dataset_path` names a local file or folder, and
`output_path_problem` whether an output path may receive a new cache (the runner's
rule too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# what `data.load_local_dataset` reads (a test holds these equal to data.py's)
LOCAL_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".json")
# file extensions a Hub dataset id never ends with
_FILE_EXTENSIONS = (*LOCAL_SUFFIXES, ".parquet", ".csv", ".arrow", ".tsv", ".text")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class PrecheckError(ValueError):
    """A config refused before loading anything, with the field and the fix."""


def looks_local(path: str) -> bool:
    """Whether `dataset_path` names a local file or folder rather than a Hub id:
    it exists, starts with `./`, `../`, `/` or `~`, ends with a file extension, or
    has a path separator and is not of the Hub's form `owner/name`."""
    if Path(path).expanduser().exists():
        return True
    if path.startswith(("./", "../", "/", "~", ".\\", "..\\")) or path in (".", ".."):
        return True
    if path.lower().endswith(_FILE_EXTENSIONS):
        return True
    has_separator = os.sep in path or "/" in path
    return has_separator and not _HUB_ID.match(path)


def check_before_loading(values: dict[str, Any]) -> None:
    """Refuse the mistakes that need no model: sizes, dataset path, output path.
    Raises `PrecheckError`."""
    _check_sizes(values)
    _check_dataset_path(values)
    _check_output_path(values)


def _check_sizes(values: dict[str, Any]) -> None:
    for name in ("model_batch_size", "d_in", "training_tokens"):
        if values[name] < 1:
            raise PrecheckError(
                f"{name}={values[name]} must be a positive whole number."
            )
    context_size = values.get("context_size", -1)
    if context_size == 0 or context_size < -1:
        raise PrecheckError(
            f"context_size={context_size} must be a positive number of tokens per row."
        )
    if context_size > values["training_tokens"]:
        raise PrecheckError(
            f"context_size={context_size} is more than training_tokens="
            f"{values['training_tokens']}: raise training_tokens or lower context_size."
        )
    buffer = values.get("buffer_size_gb", 2.0)
    if not buffer > 0:
        raise PrecheckError(f"buffer_size_gb={buffer} must be a positive number of GB.")


def _check_dataset_path(values: dict[str, Any]) -> None:
    path = values["dataset_path"]
    if not path:
        raise PrecheckError(
            "dataset_path is empty: set it to a local .txt/.jsonl file, a folder "
            "written by Dataset.save_to_disk, or a Hub dataset id (owner/name)."
        )
    if not looks_local(path):
        return
    local = Path(path).expanduser()
    if not local.exists():
        raise PrecheckError(
            f"dataset_path={path!r}: no such file or folder ({local.absolute()}). "
            "A path that looks local is never looked up on the Hub: fix the path, or "
            "give a Hub dataset id of the form owner/name."
        )
    if local.is_file() and local.suffix.lower() not in LOCAL_SUFFIXES:
        raise PrecheckError(
            f"dataset_path={path!r} has suffix {local.suffix!r}: use a text file "
            "(.txt, .md, .rst; documents separated by blank lines), a JSONL file with a "
            "'text' field (.jsonl, .json), or a folder written by Dataset.save_to_disk."
        )
    if values.get("context_size", -1) == -1:
        raise PrecheckError(
            f"context_size is not set and dataset_path={path!r} is local: set "
            "context_size (tokens per row), e.g. context_size: 128."
        )


def _check_output_path(values: dict[str, Any]) -> None:
    path = values.get("new_cached_activations_path")
    if not path or values.get("resume"):
        return  # resume: the full check knows whether it is this run's cache
    final = Path(path).expanduser().absolute()
    if (final.parent / f".{final.name}.sae-cache-ext-backup").exists():
        return  # a crashed swap: the runner sorts it out (staging.Layout's name)
    problem = output_path_problem(
        final, path, "; set resume: true to continue an interrupted run of this config"
    )
    if problem is not None:
        raise PrecheckError(problem)


def output_path_problem(final: Path, shown: str, advice: str = "") -> str | None:
    """Why `final` cannot receive a new cache (sae-lens's rule: it must hold
    nothing), or None. The one rule for the runner (`staging.check_output_free`)
    and the command line's early check; `shown` is the path as the user gave it."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        return (
            f"new_cached_activations_path={shown!r} is a file, not a folder. Choose a "
            "folder path that does not exist yet or is empty."
        )
    if final.is_dir() and any(final.iterdir()):
        # sae-lens's sentence, word for word, then ours
        return (
            f"Activations directory ({final}) is not empty. Please delete it or "
            "specify a different path. Exiting the script to prevent accidental "
            f"deletion of files. (new_cached_activations_path={shown!r}; "
            f"sae-cache-ext never overwrites existing files{advice}.)"
        )
    return None

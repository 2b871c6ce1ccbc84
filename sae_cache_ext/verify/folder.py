"""Reading a cache folder: its manifest, config, file list, schema and Arrow files.

The shared lowest room of `verify`: plain reads, no judgement. `describe` and the
integrity checks build on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Array2D, Features, Value

from sae_cache_ext.hub import CONFIG_FILENAME
from sae_cache_ext.staging import MARKER, TOOL
from sae_cache_ext.writer import TOKEN_POSITIONS

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"


def cache_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"path={str(folder)!r} is not a folder. Pass the folder a cache was "
            "written to (the one holding state.json and the .arrow files)."
        )
    return folder


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """Our manifest, None when the folder has none (a plain sae-lens cache)."""
    if not (folder / MARKER).exists():
        return None
    manifest = read_json(folder / MARKER)
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        raise ValueError(f"{folder / MARKER} was not written by {TOOL}.")
    return manifest


def read_config(
    folder: Path, manifest: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The config the cache was made with, and the file it came from."""
    if manifest is not None and isinstance(manifest.get("config"), dict):
        return manifest["config"], MARKER
    if (folder / CONFIG_FILENAME).exists():  # sae-lens's (and our) Hub metadata
        return read_json(folder / CONFIG_FILENAME), CONFIG_FILENAME
    return None, None


def data_filenames(state: Any) -> list[str]:
    return [entry["filename"] for entry in state["_data_files"]]


def features_of(info: Any) -> Features:
    return Features.from_dict(info["features"])


def hook_column(features: Features, config: dict[str, Any] | None) -> str | None:
    hook = None if config is None else config.get("hook_name")
    if hook in features and isinstance(features[hook], Array2D):
        return hook
    arrays = [
        name
        for name, f in features.items()
        if isinstance(f, Array2D) and name != TOKEN_POSITIONS
    ]
    return arrays[0] if len(arrays) == 1 else None


def sliced_context_size(context_size: int, seqpos_slice: Any) -> int:
    """Row length after `seqpos_slice` (sae-lens's `_get_sliced_context_size`)."""
    if seqpos_slice is None:
        return context_size
    return len(range(context_size)[slice(*seqpos_slice)])


def arrow_rows(path: Path, validate: bool = False) -> tuple[int, pa.Schema]:
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


def feature_text(feature: Any) -> str:
    if isinstance(feature, Array2D):
        return f"Array2D(shape={tuple(feature.shape)}, dtype={feature.dtype})"
    inner = getattr(feature, "feature", None)
    if isinstance(inner, Value):
        return f"Sequence({inner.dtype}, length={getattr(feature, 'length', -1)})"
    if isinstance(feature, Value):
        return f"Value({feature.dtype})"
    return repr(feature)

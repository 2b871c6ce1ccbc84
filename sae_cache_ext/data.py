"""Text corpora that need no download: local text/JSONL files and CPython's own prose."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, load_from_disk

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")


def pydoc_corpus() -> Dataset:
    """English prose shipped with CPython (`pydoc_data.topics`, about 460 KB), one
    document per paragraph, in a fixed order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return Dataset.from_dict(
        {
            "text": [
                paragraph.strip()
                for key in sorted(topics)
                for paragraph in topics[key].split("\n\n")
                if paragraph.strip()
            ]
        }
    )


def _text_documents(path: Path) -> list[str]:
    """Paragraphs of a text file (documents are separated by blank lines)."""
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({error.msg}); a JSONL dataset "
                f"needs one JSON object per line with a {field!r} field."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(
                f"{path}:{number} has no string field {field!r}; every line of a "
                f"JSONL dataset needs one."
            )
        documents.append(record[field])
    return documents


def load_local_dataset(path: str | Path, text_field: str = "text") -> Dataset:
    """A `Dataset` with a `text` column from a local text or JSONL file, or a dataset
    folder saved with `save_to_disk`."""
    path = Path(path).expanduser()
    if path.is_dir():
        loaded = load_from_disk(str(path))
        if not isinstance(loaded, Dataset):
            loaded = loaded["train"]
        return loaded
    if not path.is_file():
        raise FileNotFoundError(f"dataset path {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        documents = _text_documents(path)
    elif suffix in JSONL_SUFFIXES:
        documents = _jsonl_documents(path, text_field)
    else:
        raise ValueError(
            f"dataset path {path} has suffix {suffix!r}: use a text file "
            f"({', '.join(TEXT_SUFFIXES)}), a JSONL file with a {text_field!r} field, "
            "or a folder written by Dataset.save_to_disk."
        )
    if not documents:
        raise ValueError(f"dataset path {path} holds no text.")
    return Dataset.from_dict({"text": documents})


def is_local_dataset(path: str) -> bool:
    return Path(path).expanduser().exists()

"""The commented config template `sae-cache-ext init` writes: `render_template`.

Every field of `CacheActivationsRunnerConfig`, required ones first, each with its
type, default and meaning taken from the source (`config_schema`), so the template
never drifts from the config. Required fields (and a few worth setting) get
example values for the offline SmolLM2-135M; every other field its default.
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml

from sae_cache_ext.config_io import describe_type
from sae_cache_ext.config_schema import COMPUTED, OURS, FieldSpec, config_fields

# sae-lens's fields its docstring does not describe
UPSTREAM_MEANINGS = {
    "use_chat_formatting": "Format each document with the tokenizer's chat template "
    "(reads a 'conversation', 'conversations', 'messages' or 'text' column); needs "
    "context_size.",
}

# Values the template suggests (a run of the offline SmolLM2-135M on a text file).
EXAMPLE = {
    "dataset_path": "corpus.txt",
    "model_name": "smollm2",
    "model_batch_size": 8,
    "hook_name": "blocks.15.hook_resid_post",
    "d_in": 576,
    "training_tokens": 1_000_000,
    "context_size": 128,
    "new_cached_activations_path": "activations/smollm2-l15",
}
EXAMPLE_NOTES = {
    "dataset_path": "EDIT: a local .txt (documents separated by blank lines), .jsonl "
    "(a 'text' field per line), a folder written by Dataset.save_to_disk, or a Hub "
    "dataset id (owner/name)",
    "model_name": "'smollm2' is the offline SmolLM2-135M-Instruct; or a sae-lens / "
    "TransformerLens model name, or a local Hugging Face model folder",
    "d_in": "the hook's width: 576 for SmolLM2-135M's residual stream",
    "context_size": "tokens per row; -1 (the default) reads it from a pretokenized "
    "Hub dataset",
}
WIDTH = 88


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _meaning(spec: FieldSpec) -> str:
    return spec.doc or UPSTREAM_MEANINGS.get(spec.name, "")


def _field_lines(spec: FieldSpec) -> list[str]:
    if spec.required:
        default = "required"
    elif spec.default is COMPUTED:
        default = f"default {spec.default_text}"
    else:
        default = f"default {_yaml_value(spec.default)}"
    head = f"{spec.name}: {describe_type(spec.type)}; {default}."
    note = EXAMPLE_NOTES.get(spec.name)
    text = f"{head} {_meaning(spec)}" + (f" ({note}.)" if note else "")
    lines = textwrap.wrap(
        text, WIDTH - 2, initial_indent="# ", subsequent_indent="#   "
    )
    if spec.default is COMPUTED and spec.name not in EXAMPLE:
        return [*lines, f"# {spec.name}: <{spec.default_text}>"]
    value = EXAMPLE.get(spec.name, spec.default)
    return [*lines, f"{spec.name}: {_yaml_value(value)}"]


def render_template() -> str:
    """The YAML config template, every field commented."""
    specs = config_fields()
    required = [s for s in specs if s.required]
    upstream = [s for s in specs if not s.required and s.origin != OURS]
    ours = [s for s in specs if s.origin == OURS]
    lines = [
        "# sae-cache-ext run config: every field of CacheActivationsRunnerConfig.",
        "# Run it with `sae-cache-ext run THIS_FILE`; override any field with",
        "# `--set FIELD=VALUE`. Each field: its type; its default; its meaning.",
        "# Values are YAML: true/false, null, 1_000_000, [a, b].",
    ]
    for title, group in (
        ("required", required),
        ("optional (sae-lens's fields)", upstream),
        ("optional (sae-cache-ext's own fields)", ours),
    ):
        lines += ["", f"# == {title} " + "=" * (WIDTH - 8 - len(title)), ""]
        for spec in group:
            lines += [*_field_lines(spec), ""]
    return "\n".join(lines).rstrip() + "\n"

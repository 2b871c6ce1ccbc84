"""Bad input is refused before any forward pass and before anything is written.

Each catalogue case builds a config, model and dataset, calls `attempt` (which is what
a user's run does: validate, then the runner), and checks the exception type, that
its message names the field, that the model never ran, and that the disk is as it
was. Cases with a `repair` then fix the input and rerun at the same path, which must
succeed (and must run the model, which shows the forward counter works).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset

from sae_cache_ext import CacheActivationsRunner
from sae_cache_ext.staging import Layout
from sae_cache_ext.validate import hook_width, validate_config, validate_run
from tests.fixtures import build_model

HOOK = "blocks.0.hook_resid_post"
MLP_HOOK = "blocks.0.mlp.hook_post"  # d_mlp = 64 wide


def attempt(cfg, model, dataset):
    """What a run does. Once the runner calls `validate_run` itself, the first line
    is redundant (and harmless)."""
    validate_run(cfg, model, dataset)
    return CacheActivationsRunner(
        cfg, override_dataset=dataset, override_model=model, quiet=True
    ).run()


# -- datasets, by name ----------------------------------------------------------------


def _no_rows() -> Iterator[dict[str, str]]:
    yield from ()


def _pretokenized(model, corpus: Dataset, n_rows: int = 40, length: int = 16):
    text = " ".join(corpus["text"][:80])
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    return Dataset.from_dict(
        {"tokens": ids[: n_rows * length].view(n_rows, -1).tolist()}
    )


DATASETS: dict[str, Callable[[Any, Dataset], Any]] = {
    "corpus": lambda model, corpus: corpus,
    "none": lambda model, corpus: None,
    "empty": lambda model, corpus: Dataset.from_dict({"text": []}),
    "empty_iterable": lambda model, corpus: IterableDataset.from_generator(_no_rows),
    "iterable_corpus": lambda model, corpus: corpus.to_iterable_dataset(),
    "one_sentence": lambda model, corpus: Dataset.from_dict({"text": ["Tiny."]}),
    "no_text_column": lambda model, corpus: corpus.rename_column("text", "body"),
    "renamed_back": lambda model, corpus: corpus.rename_column(
        "text", "body"
    ).rename_column("body", "text"),
    "dataset_dict": lambda model, corpus: DatasetDict({"train": corpus}),
    "short_docs": lambda model, corpus: Dataset.from_dict(
        {"text": ["A short one."] * 50}
    ),
    "none_in_text": lambda model, corpus: Dataset.from_dict(
        {"text": [None, *corpus["text"][:20]]}
    ),
    "pretokenized": _pretokenized,
    "pretokenized_short_rows": lambda model, corpus: Dataset.from_dict(
        {"tokens": [[5, 6, 7]] * 30}
    ),
    "pretokenized_out_of_vocab": lambda model, corpus: Dataset.from_dict(
        {"tokens": [[5] * 15 + [999]] + [[5] * 16] * 29}
    ),
}


# -- the catalogue ------------------------------------------------------------------


@dataclass
class Case:
    id: str
    error: type[BaseException]
    match: str
    """A regex the message must match; it names the field."""
    overrides: dict[str, Any] = field(default_factory=dict)
    mutate: dict[str, Any] = field(default_factory=dict)
    """Set on the config after it is built, past its own checks."""
    path: str | None = None
    """The output path: relative to tmp_path, or absolute (default tmp_path/cache)."""
    dataset: str = "corpus"
    model: str = "tiny"
    """"tiny", or "no_tokenizer" (the tiny model with its tokenizer removed)."""
    setup: Callable[[Path], None] | None = None
    repair: Callable[[Path], dict[str, Any]] | None = None
    """Undo `setup` and return the corrected overrides; the rerun must succeed."""
    repaired_dataset: str | None = None
    field_only: bool = False
    """`validate_config(cfg)` alone refuses it (no model, dataset or disk needed)."""
    through_runner: bool = True
    """False where a regression would let the runner write somewhere it must not
    (a system folder root may write to): then only `validate_run` is called."""
    skip: str | None = None


def _write(relative: str, text: str = "keep me") -> Callable[[Path], None]:
    def setup(tmp_path: Path) -> None:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)

    return setup


def _remove(relative: str, **fixed: Any) -> Callable[[Path], dict[str, Any]]:
    def repair(tmp_path: Path) -> dict[str, Any]:
        (tmp_path / relative).unlink()
        return fixed

    return repair


def _fix(**fixed: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda tmp_path: fixed


def _lock(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)


def _unlock(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "locked").chmod(0o700)
    return {}


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

CASES = [
    # -- the output path
    Case(
        "output_path_not_empty",
        FileExistsError,
        # sae-lens's sentence, word for word, then ours naming the field
        r"Activations directory \(.*\) is not empty\. Please delete it or specify "
        r"a different path\. .*new_cached_activations_path=",
        setup=_write("cache/notes.txt"),
        repair=_remove("cache/notes.txt"),
    ),
    Case(
        "output_path_is_a_file",
        FileExistsError,
        r"new_cached_activations_path=.* is a file",
        setup=_write("cache"),
        repair=_remove("cache"),
    ),
    Case(
        "output_path_below_a_file",
        FileExistsError,
        r"new_cached_activations_path=.* cannot be created: .*blocker is a file",
        path="blocker/cache",
        setup=_write("blocker"),
        repair=_remove("blocker"),
    ),
    Case(
        "output_path_not_writable",
        PermissionError,
        r"new_cached_activations_path=.* cannot be written",
        path="locked/cache",
        setup=_lock,
        repair=_unlock,
        skip="root may write anywhere" if IS_ROOT else None,
    ),
    Case(
        "output_path_in_proc",
        ValueError,
        r"new_cached_activations_path='/proc/x' is inside the system folder /proc",
        path="/proc/x",
    ),
    Case(
        "output_path_in_usr",
        ValueError,
        r"new_cached_activations_path=.* is inside the system folder /usr",
        path="/usr/share/sae-cache-ext-test-never-created",
        through_runner=False,
    ),
    Case(
        "output_path_is_root",
        ValueError,
        r"new_cached_activations_path='/' would put the cache .* in the root folder",
        path="/",
    ),
    Case(
        "output_path_directly_under_root",
        ValueError,
        r"new_cached_activations_path='/sae-cache-ext-test-never-created' would put "
        r".* root folder",
        path="/sae-cache-ext-test-never-created",
        through_runner=False,
    ),
    # -- the model and its hook
    Case(
        "d_in_not_the_hook_width",
        ValueError,
        r"d_in=32 does not match hook_name='blocks\.0\.mlp\.hook_post'.* set d_in=64",
        overrides={"hook_name": MLP_HOOK},
        repair=_fix(hook_name=MLP_HOOK, d_in=64),
    ),
    Case(
        "d_in_not_the_attention_width",
        ValueError,
        r"d_in=16 does not match .*hook_z.* 32 values per token \(n_heads \* d_head\)",
        overrides={"hook_name": "blocks.1.attn.hook_z", "d_in": 16},
    ),
    Case(
        "unknown_hook_name",
        ValueError,
        r"hook_name='blocks\.7\.hook_resid_post' is not a hook of this model",
        overrides={"hook_name": "blocks.7.hook_resid_post"},
        repair=_fix(),
    ),
    Case(
        "misspelt_hook_name",
        ValueError,
        r"hook_name='blocks\.0\.hook_resid_pots'.*Did you mean 'blocks\.0\.hook_resid_post'",
        overrides={"hook_name": "blocks.0.hook_resid_pots"},
    ),
    Case(
        "hook_that_never_fires",
        ValueError,
        r"hook_name='blocks\.0\.attn\.hook_result' only fires when .*use_attn_result",
        overrides={"hook_name": "blocks.0.attn.hook_result", "d_in": 4 * 32},
    ),
    Case(
        "attention_pattern_hook",
        ValueError,
        r"hook_name='blocks\.0\.attn\.hook_pattern' is an attention pattern",
        overrides={"hook_name": "blocks.0.attn.hook_pattern"},
    ),
    Case(
        "context_size_above_n_ctx",
        ValueError,
        r"context_size=128 is longer than .*n_ctx=64",
        overrides={"context_size": 128},
        repair=_fix(context_size=64),
    ),
    Case(
        "device_that_does_not_exist",
        ValueError,
        r"device='cuda' does not exist on this machine",
        overrides={"device": "cuda"},
        repair=_fix(),
        skip="a GPU is present" if torch.cuda.is_available() else None,
    ),
    Case(
        "device_not_the_models",
        ValueError,
        r"device='meta' but the model is on 'cpu'",
        overrides={"device": "meta"},
        repair=_fix(),
    ),
    Case(
        "device_not_a_device",
        ValueError,
        r"device='gpu0' is not a torch device",
        overrides={"device": "gpu0"},
        field_only=True,
    ),
    # -- the dataset
    Case(
        "empty_dataset",
        ValueError,
        r"override_dataset has no rows \(sae-lens would .* download "
        r"dataset_path='local/corpus' instead\)",
        dataset="empty",
        repair=_fix(),
        repaired_dataset="corpus",
    ),
    Case(
        "empty_iterable_dataset",
        ValueError,
        r"override_dataset has no rows \(sae-lens would stop with a bare StopIteration",
        dataset="empty_iterable",
        repair=_fix(),
        repaired_dataset="iterable_corpus",
    ),
    Case(
        "too_few_tokens_for_one_row",
        ValueError,
        r"override_dataset holds too little text for one row.*context_size=16",
        dataset="one_sentence",
        repair=_fix(),
        repaired_dataset="corpus",
    ),
    Case(
        "no_text_or_tokens_column",
        ValueError,
        r"override_dataset has columns \['body'\], none of which sae-lens reads",
        dataset="no_text_column",
        repair=_fix(),
        repaired_dataset="renamed_back",
    ),
    Case(
        "dataset_dict_not_a_split",
        ValueError,
        r"override_dataset is a DatasetDict .*dataset\['train'\]",
        dataset="dataset_dict",
    ),
    Case(
        "no_dataset_and_no_dataset_path",
        ValueError,
        r"dataset_path is empty and no override_dataset",
        overrides={"dataset_path": ""},
        dataset="none",
    ),
    Case(
        "text_row_that_is_not_text",
        ValueError,
        r"override_dataset row 0 \(column 'text'\) is a NoneType, not text",
        dataset="none_in_text",
    ),
    Case(
        "pretokenized_rows_shorter_than_context_size",
        ValueError,
        r"override_dataset row 0 .* 3 tokens, fewer than context_size=16",
        dataset="pretokenized_short_rows",
    ),
    Case(
        "pretokenized_ids_outside_the_vocabulary",
        ValueError,
        r"override_dataset row 0 .* token ids outside the model's vocabulary",
        dataset="pretokenized_out_of_vocab",
    ),
    Case(
        "disable_concat_with_only_short_documents",
        ValueError,
        r"disable_concat_sequences=True keeps only documents of at least "
        r"context_size=16 .* none of the 50 documents",
        overrides={"disable_concat_sequences": True},
        dataset="short_docs",
        # each document is 8 tokens with BOS: 50 rows of 8, and the run needs 24
        repair=_fix(disable_concat_sequences=True, context_size=8),
    ),
    # -- token options
    Case(
        "sep_separator_without_a_sep_token",
        ValueError,
        r"sequence_separator_token='sep' but the model's tokenizer has no sep token",
        overrides={"sequence_separator_token": "sep"},
        repair=_fix(sequence_separator_token="eos"),
    ),
    Case(
        "separator_id_outside_the_vocabulary",
        ValueError,
        r"sequence_separator_token=400 is outside the vocabulary \(ids 0 to 399\)",
        overrides={"sequence_separator_token": 400},
    ),
    Case(
        "excluded_ids_outside_the_vocabulary",
        ValueError,
        r"exclude_special_tokens holds ids outside the vocabulary .*\[400, 10000\]",
        overrides={"exclude_special_tokens": [0, 400, 10_000]},
        repair=_fix(exclude_special_tokens=[0, 1]),
    ),
    Case(
        "exclude_special_tokens_without_a_tokenizer",
        ValueError,
        r"exclude_special_tokens=True needs the model's tokenizer",
        overrides={"exclude_special_tokens": True},
        dataset="pretokenized",
        model="no_tokenizer",
        repair=_fix(exclude_special_tokens=[0]),
    ),
    Case(
        "text_dataset_without_a_tokenizer",
        ValueError,
        r"override_dataset's 'text' column is text, which needs the model's tokenizer",
        model="no_tokenizer",
        repair=_fix(),
        repaired_dataset="pretokenized",
    ),
    # -- fields alone (refused by the config when built, or by validate_config)
    Case(
        "bfloat16_dtype",
        ValueError,
        r"dtype='bfloat16' cannot be stored.*Set dtype='float32'",
        overrides={"dtype": "bfloat16"},
        field_only=True,
    ),
    Case(
        "seqpos_slice_that_keeps_nothing",
        ValueError,
        r"The slice \(16, None\) results in an empty range",  # sae-lens's own message
        overrides={"seqpos_slice": (16, None)},
        field_only=True,
    ),
    Case(
        "seqpos_slice_step_zero",
        ValueError,
        r"step_size=0 for sequence slicing",  # sae-lens's own message
        overrides={"seqpos_slice": (None, None, 0)},
        field_only=True,
    ),
    Case(
        "seqpos_slice_step_zero_set_after_building",
        ValueError,
        r"seqpos_slice=\(None, None, 0\) has step 0",
        mutate={"seqpos_slice": (None, None, 0)},
        field_only=True,
    ),
    Case(
        "model_batch_size_zero",
        ValueError,
        r"model_batch_size=0 must be a positive whole number",
        overrides={"model_batch_size": 0},
        field_only=True,
        repair=_fix(),
    ),
    Case(
        "model_batch_size_negative",
        ValueError,
        r"model_batch_size=-4 must be a positive whole number",
        overrides={"model_batch_size": -4},
        field_only=True,
    ),
    Case(
        "training_tokens_below_one_row",
        ValueError,
        r"context_size \(16\) is greater than training_tokens \(8\)",  # sae-lens's
        overrides={"training_tokens": 8},
        field_only=True,
    ),
    Case(
        "training_tokens_below_one_row_set_after_building",
        ValueError,
        r"training_tokens=8 is less than one row of 16 tokens",
        mutate={"training_tokens": 8},
        field_only=True,
    ),
    Case(
        "buffer_too_small_for_one_batch",
        ValueError,
        r"buffer_size_gb=1e-06 does not hold one model batch: model_batch_size=4 "
        r"rows x 16 tokens x d_in=32 x float32 = 8192 bytes",
        overrides={"buffer_size_gb": 1e-6},
        field_only=True,
        repair=_fix(),
    ),
    Case(
        "shuffle_across_sequences_without_shuffle",
        ValueError,
        r"shuffle_across_sequences=True requires shuffle=True",
        overrides={"shuffle_across_sequences": True},
        field_only=True,
        repair=_fix(shuffle_across_sequences=True, shuffle=True),
    ),
    Case(
        "hf_repo_id_without_owner",
        ValueError,
        r"hf_repo_id='activations' is not a Hub repo id: use the form 'owner/name'",
        overrides={"hf_repo_id": "activations"},
        field_only=True,
    ),
    Case(
        "hf_repo_id_with_bad_characters",
        ValueError,
        r"hf_repo_id='me/my activations!' is not valid",
        overrides={"hf_repo_id": "me/my activations!"},
        field_only=True,
    ),
    Case(
        "hf_num_shards_zero",
        ValueError,
        r"hf_num_shards=0 must be at least 1",
        overrides={"hf_num_shards": 0},
        field_only=True,
    ),
]


# -- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def count_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """A list that grows by one per call of `model.forward` inside the block."""
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def model_without_tokenizer(tokenizer_dir: Path):
    model = build_model(tokenizer_dir)
    model.tokenizer = None
    return model


def _output_path(case: Case, tmp_path: Path) -> str:
    if case.path is None:
        return str(tmp_path / "cache")
    return case.path if case.path.startswith("/") else str(tmp_path / case.path)


def _build_cfg(make_cfg, case: Case, tmp_path: Path, overrides: dict[str, Any]):
    cfg = make_cfg(
        new_cached_activations_path=_output_path(case, tmp_path), **overrides
    )
    for name, value in case.mutate.items():
        setattr(cfg, name, value)
    return cfg


# -- tests --------------------------------------------------------------------------


def test_the_catalogue_has_at_least_twenty_cases_with_unique_ids():
    assert len(CASES) >= 20
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_before_any_forward_pass_or_write(
    case: Case, tmp_path, make_cfg, tiny_model, model_without_tokenizer, corpus
):
    if case.skip:
        pytest.skip(case.skip)
    model = tiny_model if case.model == "tiny" else model_without_tokenizer
    if case.setup:
        case.setup(tmp_path)
    output = Path(_output_path(case, tmp_path))
    layout = Layout.for_output(output)
    existed = output.exists()
    before = snapshot(tmp_path)

    with count_forwards(model) as calls:
        dataset = DATASETS[case.dataset](tiny_model, corpus)
        with pytest.raises(case.error, match=case.match):
            cfg = _build_cfg(make_cfg, case, tmp_path, case.overrides)
            if case.through_runner:
                attempt(cfg, model, dataset)
            else:
                validate_run(cfg, model, dataset)
        assert calls == [], "the model ran before the input was refused"

    assert snapshot(tmp_path) == before
    assert output.exists() == existed
    assert not layout.staging.exists() and not layout.backup.exists()

    if case.repair is None:
        return
    fixed = case.repair(tmp_path)
    dataset = DATASETS[case.repaired_dataset or case.dataset](tiny_model, corpus)
    cfg = _build_cfg(make_cfg, case, tmp_path, fixed)
    with count_forwards(model) as calls:
        cached = attempt(cfg, model, dataset)
    assert calls, "the corrected run never ran the model"
    assert len(cached) == cfg.n_buffers * cfg.n_seq_in_buffer
    assert output.is_dir() and not layout.staging.exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.field_only], ids=lambda c: c.id)
def test_field_only_cases_are_refused_by_validate_config_alone(
    case: Case, tmp_path, make_cfg
):
    with pytest.raises(ValueError, match=case.match):
        validate_config(_build_cfg(make_cfg, case, tmp_path, case.overrides))


def test_a_good_run_passes_without_a_forward_pass_or_a_write(
    tmp_path, make_cfg, tiny_model, corpus
):
    before = snapshot(tmp_path)
    with count_forwards(tiny_model) as calls:
        validate_run(make_cfg(), tiny_model, corpus)
        validate_run(make_cfg(), tiny_model, _pretokenized(tiny_model, corpus))
        validate_run(make_cfg(disable_concat_sequences=True), tiny_model, corpus)
        validate_run(make_cfg(), tiny_model, corpus.to_iterable_dataset())
    assert calls == []
    assert snapshot(tmp_path) == before


def test_short_documents_beyond_the_sample_only_warn(
    tmp_path, make_cfg, tiny_model, caplog
):
    # 1200 short documents: the first 1000 fill no row, but the rest are unread
    docs = Dataset.from_dict({"text": ["A short one."] * 1200})
    cfg = make_cfg(disable_concat_sequences=True)
    with caplog.at_level(logging.WARNING, logger="sae_cache_ext.validate"):
        validate_run(cfg, tiny_model, docs)
    assert "none of the first 1000 documents" in caplog.text


def _small_model(flags: tuple[str, ...], **cfg_overrides: Any):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = {
        "n_layers": 1,
        "d_model": 16,
        "n_ctx": 8,
        "d_head": 4,
        "n_heads": 4,
        "d_mlp": 24,
        "d_vocab": 30,
        "act_fn": "gelu",
        **cfg_overrides,
    }
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    for flag in flags:
        getattr(model, f"set_{flag}")(True)
    return model


def test_hook_widths_match_a_real_forward_pass(tiny_model):
    # the width table against the shapes a forward pass really gives: the fixture
    # model, grouped-query attention (grouped and ungrouped) and every hook flag
    gqa = {
        "n_key_value_heads": 2,
        "act_fn": "silu",
        "gated_mlp": True,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": 4,
    }
    models = [
        tiny_model,
        _small_model(("use_attn_result", "use_attn_in", "use_hook_mlp_in")),
        _small_model(("use_attn_result", "use_split_qkv_input"), **gqa),
        _small_model(("use_split_qkv_input", "ungroup_grouped_query_attention"), **gqa),
    ]
    for model in models:
        _, cache = model.run_with_cache(torch.zeros(2, 5, dtype=torch.long))
        known = 0
        for name, acts in cache.items():
            width = hook_width(model, name)
            if width is not None:
                known += 1
                assert acts[0, 0].numel() == width[0], name
        assert known >= 12

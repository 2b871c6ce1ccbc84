"""The command line, run for real on a tiny local Llama folder and a text file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import load_from_disk

from sae_cache_ext.cli import main
from tests.helpers import cli_config

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, llama_dir: Path, text_file: Path, **extra) -> Path:
    return cli_config(tmp_path, llama_dir, text_file, **extra)


def test_run_caches_and_prints_a_summary(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file)
    status = main(
        ["run", str(cfg), "--quiet", "--json", "--set", "shuffle_across_sequences=true"]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 24 and summary["tokens"] == 384
    assert summary["path"] == str(tmp_path / "cache")
    assert summary["bytes_on_disk"] > 384 * 32 * 4
    assert summary["tokens_per_second_run"] > 0
    assert summary["tokens_computed_this_run"] == 384
    assert summary["dataset_ran_out"] is False and summary["exit_status"] == 0
    dataset = load_from_disk(str(tmp_path / "cache"))
    assert dataset.features["blocks.1.hook_resid_post"].shape == (16, 32)
    manifest = json.loads(
        (tmp_path / "cache" / "sae_cache_ext_manifest.json").read_text()
    )
    assert manifest["config"]["shuffle_across_sequences"] is True


def test_run_with_json_config_gives_the_same_cache_as_yaml(
    tmp_path, llama_dir, text_file, capsys
):
    yaml_cfg = _config(tmp_path / "a", llama_dir, text_file)
    values = yaml.safe_load(yaml_cfg.read_text())
    values["new_cached_activations_path"] = str(tmp_path / "b" / "cache")
    json_cfg = tmp_path / "cfg.json"
    json_cfg.write_text(json.dumps(values))
    assert main(["run", str(yaml_cfg), "-q"]) == 0
    assert main(["run", str(json_cfg), "-q"]) == 0
    a = load_from_disk(str(tmp_path / "a" / "cache")).with_format("numpy")
    b = load_from_disk(str(tmp_path / "b" / "cache")).with_format("numpy")
    assert np.array_equal(a["token_ids"], b["token_ids"])


def test_unknown_field_is_named(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file)
    assert main(["run", str(cfg), "--set", "shufle=false"]) == 2
    assert "unknown config field 'shufle' (in --set): did you mean 'shuffle'?" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "cache").exists()


def test_bad_value_is_named(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file)
    assert main(["run", str(cfg), "--set", "sequence_separator_token=start"]) == 2
    assert "sequence_separator_token" in capsys.readouterr().err


def test_malformed_override_is_refused(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file)
    assert main(["run", str(cfg), "--set", "shuffle"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "sae-cache-ext init" in err


@pytest.mark.parametrize("command", ["init", "run", "info", "verify", "demo", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sae-cache-ext {command}" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "sae_cache_ext", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage: sae-cache-ext" in proc.stdout


def test_info_shows_coverage_and_plots_it(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file, disable_concat_sequences=True)
    assert main(["run", str(cfg), "-q"]) == 0
    capsys.readouterr()
    plot = tmp_path / "coverage.png"
    assert main(["info", str(tmp_path / "cache"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post" in out and "Coverage" in out
    assert "WARNING: the kept fraction differs" in out  # short documents are dropped
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_exits_non_zero_on_a_flipped_byte(
    tmp_path, llama_dir, text_file, capsys
):
    cfg = _config(tmp_path, llama_dir, text_file, shuffle=False)
    assert main(["run", str(cfg), "-q"]) == 0
    assert main(["verify", str(tmp_path / "cache"), "--model", str(llama_dir)]) == 0
    data = sorted((tmp_path / "cache").glob("data-*.arrow"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert main(["verify", str(tmp_path / "cache")]) == 1
    assert "sha256" in capsys.readouterr().out


# -- the way in, run for real in a subprocess -------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_cache_ext", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=600,
    )


@pytest.mark.slow  # three fresh processes import torch (about 60 s on 2 cores)
def test_a_short_cache_is_loud_and_quiet_means_quiet(tmp_path, llama_dir, text_file):
    # 30 documents hold far fewer than 20,000 tokens: the dataset runs out
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(text_file.read_text().split("\n\n")[:30]))
    cfg = _config(
        tmp_path, llama_dir, small, training_tokens=20_000, exclude_special_tokens=True
    )
    proc = _cli("run", str(cfg), "--json", "-q")  # flags after the command
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dataset_ran_out"] is True and summary["exit_status"] == 3
    assert 0 < summary["tokens"] < 20_000
    # -q: our warnings only; no INFO lines, sae-lens warnings or progress bars
    assert "fewer samples" not in proc.stderr and "multiple training epochs" not in (
        proc.stderr
    )
    assert "INFO" not in proc.stderr and "Loading model config" not in proc.stderr
    assert "UserWarning" not in proc.stderr and "it/s" not in proc.stderr
    assert "The dataset ran out" in proc.stderr
    out = str(tmp_path / "cache")
    info = _cli("info", out, "-q")
    assert info.returncode == 0, info.stderr
    assert "dataset ran out  YES" in info.stdout
    assert "tokens dropped: excluded special token" in info.stdout
    # each excluded id with its token string (the toy tokenizer's bos, eos, pad)
    assert any(
        line.split()[:2] == ["0", "<|bos|>"] for line in info.stdout.splitlines()
    )
    manifest = json.loads((Path(out) / "sae_cache_ext_manifest.json").read_text())
    assert manifest["excluded_tokens"] == {
        "0": "<|bos|>",
        "1": "<|eos|>",
        "2": "<|pad|>",
    }
    verify = _cli("verify", out, "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True


def test_info_buckets_are_in_numeric_order(tmp_path, llama_dir, text_file, capsys):
    cfg = _config(tmp_path, llama_dir, text_file, disable_concat_sequences=True)
    assert main(["run", str(cfg), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Coverage (") :].splitlines()[2:]
    starts = [int(line.split()[0].split("-")[0]) for line in table if line[:1] == " "]
    assert starts == sorted(starts) and len(starts) > 2
    assert "  accounting" in out and "documents read" in out


def test_after_a_resume_the_rate_counts_this_runs_tokens(
    tmp_path, llama_dir, text_file, capsys, monkeypatch
):
    from sae_cache_ext.shuffle import OrderedSink
    from tests.helpers import before_nth_call

    cfg = _config(tmp_path, llama_dir, text_file, shuffle=False, resume=True)

    def fail() -> None:
        raise RuntimeError("injected")

    real = OrderedSink.write_buffer
    with monkeypatch.context() as patch:
        patch.setattr(OrderedSink, "write_buffer", before_nth_call(real, 2, fail))
        with pytest.raises(RuntimeError, match="injected"):
            main(["run", str(cfg), "-q"])
    capsys.readouterr()
    assert main(["run", str(cfg), "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the first buffer (128 tokens) was cached by the failed run
    assert summary["tokens"] == 384 and summary["tokens_computed_this_run"] == 256
    assert summary["resumed"] is True
    assert summary["tokens_per_second_run"] == pytest.approx(
        256 / summary["run_seconds"], rel=0.05
    )


@pytest.mark.slow  # two fresh processes import torch
def test_offline_hub_failures_are_one_line(tmp_path, llama_dir, text_file):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # a cache whose rows can be re-run, so that verify does need the model
    cached = _config(tmp_path / "made", llama_dir, text_file)
    assert main(["run", str(cached), "--quiet"]) == 0
    proc = _cli(
        "verify", str(tmp_path / "made" / "cache"), "--model", "gpt2", **offline
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--model gpt2 needs the Hugging Face Hub" in proc.stderr
    cfg = _config(tmp_path, llama_dir, text_file, dataset_path="someone/no-such-data")
    proc = _cli("run", str(cfg), "-q", **offline)
    assert proc.returncode == 2, proc.stderr
    assert "dataset_path='someone/no-such-data' needs the Hugging Face Hub" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
)
def test_every_example_runs_at_a_tiny_size(
    example, tmp_path, llama_dir, text_file, capsys
):
    """Each example as written, but on the tiny local model and text file."""
    values = yaml.safe_load((ROOT / "examples" / example).read_text())

    def tiny(hook: str) -> str:
        return re.sub(r"^blocks\.\d+\.", "blocks.1.", hook)

    overrides = {
        "model_name": str(llama_dir),
        "dataset_path": str(text_file),
        "hook_name": tiny(values["hook_name"]),
        "d_in": 32,
        "context_size": 16,
        "model_batch_size": 4,
        "training_tokens": 384,
        "buffer_size_gb": (2 * 4 * 16 * 32 * 4 * 4 + 0.5) / 1e9,
        "new_cached_activations_path": str(tmp_path / "cache"),
        "device": "cpu",
    }
    if values.get("hook_names"):
        overrides["hook_names"] = [tiny(h) for h in values["hook_names"]]
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    args = ["run", str(ROOT / "examples" / example), "-q", "--json"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens"] == 384

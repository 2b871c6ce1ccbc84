"""The command line, run for real on a tiny local Llama folder and a text file."""

from __future__ import annotations

import json
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

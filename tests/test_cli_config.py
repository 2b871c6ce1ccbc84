"""The way in: `init`'s template, typed config values, and the checks that answer a
typo before torch is imported. The command line runs for real, in a subprocess."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from sae_cache_ext import CacheActivationsRunnerConfig, data
from sae_cache_ext.config_io import ConfigError, read_config
from sae_cache_ext.config_schema import COMPUTED, MISSING, config_fields
from sae_cache_ext.precheck import LOCAL_SUFFIXES, looks_local
from sae_cache_ext.template import render_template

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m sae_cache_ext ARGS` in a fresh process, importing this tree."""
    return subprocess.run(
        [sys.executable, "-m", "sae_cache_ext", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
    )


def test_the_schema_read_from_source_is_the_real_configs():
    real = dataclasses.fields(CacheActivationsRunnerConfig)
    hints = typing.get_type_hints(CacheActivationsRunnerConfig)
    specs = config_fields()
    assert [s.name for s in specs] == [f.name for f in real]
    for spec, field in zip(specs, real, strict=True):
        assert spec.type == hints[field.name], field.name
        if field.default is not dataclasses.MISSING:
            expected = field.default
        elif field.default_factory is not dataclasses.MISSING:
            expected = field.default_factory()
        else:
            expected = MISSING
        # `device`'s default is computed when sae-lens is imported
        assert spec.default == expected or spec.default is COMPUTED, field.name


def test_the_template_has_every_field_with_type_default_and_meaning():
    text = render_template()
    lines = text.splitlines()
    for spec in config_fields():
        # the value line (commented out where the default is computed)
        assert any(
            line.startswith((f"{spec.name}:", f"# {spec.name}: <")) for line in lines
        ), spec.name
        start = text.index(f"# {spec.name}: ")
        block = " ".join(
            (text + "\n\n")[start : (text + "\n\n").index("\n\n", start)].split()
        )
        assert "; required." in block or "; default " in block, spec.name
        assert block.rstrip(".").count(".") >= 2, spec.name  # a meaning follows
    # required fields come first, each with a meaning
    names = [line.split(":")[0] for line in lines if line and line[0] != "#"]
    required = [s.name for s in config_fields() if s.required]
    assert names[: len(required)] == required
    values = yaml.safe_load(text)
    assert set(values) == {s.name for s in config_fields() if s.default is not COMPUTED}


def test_the_template_parses_as_a_typed_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(render_template())
    values = read_config(path)
    assert values["seqpos_slice"] == (None,)  # a tuple, as the field wants
    assert values["model_name"] == "smollm2" and values["d_in"] == 576


def test_init_writes_the_template_and_will_not_overwrite(tmp_path):
    proc = cli("init", "cfg.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cfg.yaml").read_text() == render_template()
    again = cli("init", "cfg.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "training_tokens=lots",
            "training_tokens wants a whole number (int), got 'lots' (str)",
        ),
        ("training_tokens=4e3", "got '4e3' (str) (in --set). Write 4000 (or 4_000)."),
        ("shuffle=maybe", "shuffle wants true or false, got 'maybe' (str)"),
        (
            "shufle=false",
            "unknown config field 'shufle' (in --set): did you mean 'shuffle'?",
        ),
        ("on_dataset_exhausted=wran", "Did you mean 'warn'?"),
        ("seqpos_slice=[1, x]", "seqpos_slice wants a list of"),
        ("shuffle", "not of the form FIELD=VALUE"),
    ],
)
def test_a_bad_value_names_the_field_the_type_and_the_value(
    tmp_path, override, message
):
    path = tmp_path / "cfg.yaml"
    path.write_text(render_template())
    with pytest.raises(ConfigError) as error:
        read_config(path, [override])
    assert message in str(error.value)


def test_a_missing_required_field_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name: gpt2\nhook_name: blocks.0.hook_resid_post\n")
    with pytest.raises(
        ConfigError, match=r"required field.*dataset_path, model_batch_size"
    ):
        read_config(path)


def test_a_typo_answers_before_torch_is_imported(tmp_path):
    (tmp_path / "cfg.yaml").write_text(render_template())
    code = (
        "import sys; from sae_cache_ext.cli import main; "
        "status = main(['run', 'cfg.yaml', '--set', 'shuffle=maybe']); "
        "print(status, 'torch' in sys.modules, 'sae_lens' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.stdout.split() == ["2", "False", "False"]
    started = time.perf_counter()
    proc = cli("run", "cfg.yaml", "-q", cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and seconds < 5  # about 0.3 s on an idle machine


def test_a_local_looking_dataset_path_that_does_not_exist_is_no_such_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text(render_template())
    proc = cli("run", "cfg.yaml", "--set", "dataset_path=corpus.text", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "sae-cache-ext: error: dataset_path='corpus.text': no such file"
    )
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("corpus.text", True),
        ("./corpus", True),
        ("../data", True),
        ("~/corpus", True),
        ("/data/corpus", True),
        ("data/part/corpus", True),
        ("docs.jsonl", True),
        ("NeelNanda/pile-10k", False),
        ("monology/pile-uncopyrighted", False),
        ("wikitext", False),
    ],
)
def test_which_dataset_paths_look_local(path, local):
    assert looks_local(path) is local


def test_the_cheap_suffixes_are_those_the_loader_reads():
    assert set(LOCAL_SUFFIXES) == {*data.TEXT_SUFFIXES, *data.JSONL_SUFFIXES}


def test_a_non_empty_output_path_is_refused_before_loading(tmp_path, text_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "cfg.yaml").write_text(render_template())
    proc = cli(
        "run",
        "cfg.yaml",
        "--set",
        f"dataset_path={text_file}",
        "--set",
        "new_cached_activations_path=out",
        cwd=tmp_path,
    )
    assert (
        proc.returncode == 2
        and "is not empty. Please delete it or specify a different path." in proc.stderr
        and "new_cached_activations_path='out'" in proc.stderr
    )
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_global_flags_work_in_any_position():
    for args in (["init", "-q"], ["-q", "init"], ["init", "--json", "-v"]):
        proc = cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stdout == render_template()


def test_every_example_config_parses():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        values = read_config(path)
        assert values["model_name"] and values["hook_name"], path


def test_a_field_set_twice_in_a_file_is_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(render_template() + "shuffle: false\n")
    with pytest.raises(
        ConfigError, match=r"'shuffle' is set twice \(lines \d+ and \d+\)"
    ):
        read_config(path)

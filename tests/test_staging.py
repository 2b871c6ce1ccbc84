"""Staging, the atomic swap, its rollback, and recovery after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sae_cache_ext import CacheActivationsRunner, staging
from sae_cache_ext.staging import MARKER, Layout
from tests.helpers import before_nth_call, columns, run_ours


def _make_finished_staging(layout: Layout) -> None:
    layout.staging.mkdir(parents=True)
    (layout.staging / MARKER).write_text(
        json.dumps({**staging.new_marker(layout, "f"), "state": "complete"})
    )
    (layout.staging / "data.arrow").write_text("new")


def fail_on_call(real, n: int):
    """`real`, failing with an injected OSError on its n-th call."""

    def fail() -> None:
        raise OSError(f"injected failure on call {n}")

    return before_nth_call(real, n, fail)


@pytest.mark.parametrize("failing_rename", [1, 2])
def test_swap_rolls_back_when_a_rename_fails(tmp_path, monkeypatch, failing_rename):
    layout = Layout.for_output(tmp_path / "out")
    layout.final.mkdir()  # an empty folder is in the way, as sae-lens allows
    _make_finished_staging(layout)
    monkeypatch.setattr(os, "rename", fail_on_call(os.rename, failing_rename))
    with pytest.raises(OSError, match="injected"):
        staging.swap_into_place(layout)
    # back as before: empty output folder, staging intact, no backup
    assert layout.final.is_dir() and not any(layout.final.iterdir())
    assert (layout.staging / "data.arrow").read_text() == "new"
    assert not layout.backup.exists()


def test_swap_rolls_back_when_removing_the_backup_fails(tmp_path, monkeypatch):
    layout = Layout.for_output(tmp_path / "out")
    layout.final.mkdir()
    _make_finished_staging(layout)
    monkeypatch.setattr(Path, "rmdir", fail_on_call(Path.rmdir, 1))
    with pytest.raises(OSError, match="injected"):
        staging.swap_into_place(layout)
    assert layout.final.is_dir() and not any(layout.final.iterdir())
    assert (layout.staging / "data.arrow").read_text() == "new"
    assert not layout.backup.exists()


def test_swap_never_deletes_files_that_appeared_at_the_output_path(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    layout.final.mkdir()
    _make_finished_staging(layout)
    (layout.final / "precious.txt").write_text("mine")  # appeared during the run
    with pytest.raises(OSError):
        staging.swap_into_place(layout)
    assert (layout.final / "precious.txt").read_text() == "mine"
    assert (layout.staging / "data.arrow").exists()


def test_swap_into_a_missing_output_path(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    _make_finished_staging(layout)
    staging.swap_into_place(layout)
    assert (layout.final / "data.arrow").read_text() == "new"
    assert not layout.staging.exists() and not layout.backup.exists()


def test_recover_removes_only_our_own_staging(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    layout.staging.mkdir()
    marker = staging.new_marker(layout, "f")
    marker["pid"] = 2**22 + 12345  # a process that does not exist
    (layout.staging / MARKER).write_text(json.dumps(marker))
    (layout.staging / "half.arrow").write_text("x")
    staging.recover(layout)
    assert not layout.staging.exists()


def test_recover_refuses_a_foreign_folder_at_the_staging_name(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    layout.staging.mkdir()
    (layout.staging / "someone_elses.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not created by sae-cache-ext"):
        staging.recover(layout)
    assert (layout.staging / "someone_elses.txt").exists()


def test_recover_refuses_staging_of_another_output_path(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    other = Layout.for_output(tmp_path / "elsewhere")
    layout.staging.mkdir()
    (layout.staging / MARKER).write_text(json.dumps(staging.new_marker(other, "f")))
    with pytest.raises(FileExistsError):
        staging.recover(layout)
    assert (layout.staging / MARKER).exists()


def test_recover_refuses_while_the_writer_is_alive(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    layout.staging.mkdir()
    marker = staging.new_marker(layout, "f")
    marker["pid"] = os.getppid()  # alive, and not us
    (layout.staging / MARKER).write_text(json.dumps(marker))
    with pytest.raises(RuntimeError, match="still writing"):
        staging.recover(layout)
    assert layout.staging.exists()


def test_recover_restores_what_a_crash_mid_swap_moved_aside(tmp_path):
    layout = Layout.for_output(tmp_path / "out")
    layout.backup.mkdir()  # the empty output folder, renamed in step 1
    staging.recover(layout)
    assert layout.final.is_dir() and not layout.backup.exists()


def test_output_path_that_is_a_file_is_refused_before_the_model_runs(
    make_cfg, tiny_model, corpus, tmp_path
):
    cfg = make_cfg()
    Path(cfg.new_cached_activations_path).write_text("a file")
    with pytest.raises(
        FileExistsError, match=r"new_cached_activations_path.*is a file"
    ):
        CacheActivationsRunner(cfg, override_dataset=corpus, override_model=tiny_model)


def test_non_empty_output_path_is_refused_and_left_alone(make_cfg, tiny_model, corpus):
    cfg = make_cfg()
    out = Path(cfg.new_cached_activations_path)
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        CacheActivationsRunner(cfg, override_dataset=corpus, override_model=tiny_model)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not Layout.for_output(out).staging.exists()


def test_an_empty_output_folder_is_accepted(make_cfg, tiny_model, corpus):
    cfg = make_cfg()
    Path(cfg.new_cached_activations_path).mkdir()
    assert len(run_ours(cfg, tiny_model, corpus)) == cfg.n_seq_in_dataset


def test_a_run_failing_while_caching_leaves_nothing_behind(
    make_cfg, tiny_model, corpus, monkeypatch
):
    from sae_cache_ext import shuffle

    cfg = make_cfg(shuffle=True)
    sink = shuffle.BucketShuffleSink
    monkeypatch.setattr(sink, "write_buffer", fail_on_call(sink.write_buffer, 2))
    with pytest.raises(OSError, match="injected"):
        run_ours(cfg, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    assert not layout.final.exists() and not layout.staging.exists()


def test_a_writer_error_reaches_the_caller(make_cfg, tiny_model, corpus, monkeypatch):
    from sae_cache_ext.shard_files import ShardFiles

    cfg = make_cfg()
    monkeypatch.setattr(ShardFiles, "__init__", fail_on_call(ShardFiles.__init__, 1))
    with pytest.raises(OSError, match="injected"):
        run_ours(cfg, tiny_model, corpus)
    assert not Layout.for_output(cfg.new_cached_activations_path).staging.exists()


def test_a_rerun_after_a_crash_mid_run_cleans_up_and_completes(
    make_cfg, tiny_model, corpus, caplog
):
    cfg = make_cfg(shuffle=True)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    # what a killed run leaves: a marked staging folder with part of the data
    layout.staging.mkdir()
    marker = staging.new_marker(layout, cfg.data_fingerprint)
    marker["pid"] = 2**22 + 54321
    (layout.staging / MARKER).write_text(json.dumps(marker))
    (layout.staging / "buffer-00000.arrow").write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        dataset = run_ours(cfg, tiny_model, corpus)
    assert "interrupted run" in caplog.text
    assert len(dataset) == cfg.n_seq_in_dataset
    assert not layout.staging.exists()
    reference = make_cfg(
        shuffle=True, new_cached_activations_path=str(layout.final) + "-ref"
    )
    assert np.array_equal(
        columns(dataset)[1], columns(run_ours(reference, tiny_model, corpus))[1]
    )

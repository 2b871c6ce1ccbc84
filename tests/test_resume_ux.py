"""Resume as a user meets it: it says what it does, and refuses what it cannot do.

- a dataset or weights change between the interruption and the resume is refused,
  naming what changed, and the work is kept; a finished cache made from other
  weights is not returned as this run's;
- an interrupted run without a checkpoint: "nothing to resume, starting over";
- the plan's derived values (the bucket count) are the interrupted run's;
- once caching has completed, a later failure keeps the work (even with
  resume=False) and a resume=True rerun finishes it without caching again;
- Ctrl-C in `sae-cache-ext run`: one line, exit status 130, the work kept.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_cache_ext import CacheActivationsRunnerConfig, checkpoints, manifest, shuffle
from sae_cache_ext import runner as runner_module
from sae_cache_ext.staging import MARKER, Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import before_nth_call, cli_config, columns, run_ours

ROOT = Path(__file__).resolve().parent.parent
TRAINING_TOKENS = 6 * 2 * 4 * 16 + 40  # 6 full buffers and a partial one


class Interrupt(Exception):
    pass


def _raise(error: BaseException):
    def action(*_, **__) -> None:
        raise error

    return action


def _interrupted(tmp_path, model, corpus, **options) -> CacheActivationsRunnerConfig:
    """A resume=True run stopped before its third buffer (two are checkpointed)."""
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(
            tmp_path,
            resume=True,
            shuffle=True,
            training_tokens=TRAINING_TOKENS,
            **options,
        )
    )
    sink = shuffle.BucketShuffleSink
    real = sink.write_buffer
    sink.write_buffer = before_nth_call(real, 3, _raise(Interrupt()))  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupt):
            run_ours(cfg, model, corpus)
    finally:
        sink.write_buffer = real  # type: ignore[method-assign]
    return cfg


def _other_weights(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    return other


@pytest.mark.parametrize("changed", ["dataset", "weights"])
def test_an_input_changed_between_kill_and_resume_is_refused_naming_it(
    tmp_path, tiny_model, corpus, changed
):
    cfg = _interrupted(tmp_path, tiny_model, corpus)
    layout = Layout.for_output(cfg.new_cached_activations_path)
    kept = {p.name: p.stat().st_size for p in layout.staging.rglob("*")}
    model, data = tiny_model, corpus
    if changed == "dataset":
        data = corpus.select(range(1, len(corpus)))  # one document fewer
        what = r"dataset: \S+ -> \S+"
    else:
        model = _other_weights(tiny_model)
        what = r"model weights: [0-9a-f]{64} -> [0-9a-f]{64}"
    with pytest.raises(ValueError, match=rf"Changed: {what}.*resume=False to start"):
        run_ours(cfg, model, data)
    assert {p.name: p.stat().st_size for p in layout.staging.rglob("*")} == kept
    # with the original inputs it continues
    assert len(run_ours(cfg, tiny_model, corpus)) == TRAINING_TOKENS // 16


def test_a_finished_cache_of_other_weights_is_not_returned_on_resume(
    tmp_path, tiny_model, corpus
):
    cfg = CacheActivationsRunnerConfig(**default_cfg_kwargs(tmp_path, resume=True))
    run_ours(cfg, tiny_model, corpus)
    with pytest.raises(ValueError, match=r"made from other inputs.*model weights"):
        run_ours(cfg, _other_weights(tiny_model), corpus)
    assert len(run_ours(cfg, tiny_model, corpus)) == cfg.n_seq_in_dataset  # returned


def test_a_one_buffer_run_without_checkpoint_has_nothing_to_resume(
    tmp_path, tiny_model, corpus, monkeypatch, caplog
):
    # the whole cache is one buffer (8 rows): killed while writing it, no checkpoint
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, resume=True, training_tokens=128)
    )
    with monkeypatch.context() as m:
        sink = shuffle.OrderedSink
        m.setattr(
            sink,
            "write_buffer",
            before_nth_call(sink.write_buffer, 1, _raise(Interrupt())),
        )
        with pytest.raises(Interrupt):
            run_ours(cfg, tiny_model, corpus)
    with caplog.at_level("WARNING"):
        run_ours(cfg, tiny_model, corpus)
    assert "nothing to resume" in caplog.text and "starting over" in caplog.text
    assert "Resuming" not in caplog.text
    out = Path(cfg.new_cached_activations_path)
    assert json.loads((out / MARKER).read_text())["resumed"] is False


def test_a_resume_keeps_the_interrupted_runs_bucket_count(
    tmp_path, tiny_model, corpus, monkeypatch
):
    reference = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(
            tmp_path / "ref", shuffle=True, training_tokens=TRAINING_TOKENS
        )
    )
    ref = columns(run_ours(reference, tiny_model, corpus))
    cfg = _interrupted(tmp_path / "run", tiny_model, corpus)  # 7 buckets
    # resumed where the bucket count would come out otherwise (say another version
    # or environment sizes the shuffle differently)
    monkeypatch.setattr(runner_module, "choose_n_buckets", lambda *_, **__: 4)
    acts, toks = columns(run_ours(cfg, tiny_model, corpus))
    assert acts.tobytes() == ref[0].tobytes() and np.array_equal(toks, ref[1])
    out = Path(cfg.new_cached_activations_path)
    assert json.loads((out / MARKER).read_text())["plan"]["n_buckets"] == 7


def _no_caching(monkeypatch) -> None:
    for sink in (shuffle.BucketShuffleSink, shuffle.OrderedSink):
        monkeypatch.setattr(
            sink, "write_buffer", _raise(AssertionError("cached again"))
        )


@pytest.mark.parametrize("failure", ["describing", "swap"])
def test_a_failure_after_caching_keeps_the_work_and_resume_finishes_it(
    tmp_path, tiny_model, corpus, monkeypatch, caplog, failure
):
    cfg = CacheActivationsRunnerConfig(
        **default_cfg_kwargs(tmp_path, shuffle=True, resume=False)
    )
    out = Path(cfg.new_cached_activations_path)
    with monkeypatch.context() as m:
        if failure == "describing":
            m.setattr(
                manifest,
                "write_cache_description",
                _raise(OSError("injected: disk full")),
            )
        else:  # a file appears at the output path right before the swap
            real_remove = checkpoints.remove

            def remove(folder: Path) -> None:
                real_remove(folder)
                out.mkdir(exist_ok=True)
                (out / "appeared.txt").write_text("someone else's")

            m.setattr(checkpoints, "remove", remove)
        with pytest.raises(OSError), caplog.at_level("WARNING"):
            run_ours(cfg, tiny_model, corpus)
    note = caplog.text
    assert "Caching had completed" in note and "resume=True" in note
    layout = Layout.for_output(out)
    assert layout.staging.exists()
    if failure == "swap":
        assert f"Move away what appeared at {out}" in note
        assert (out / "appeared.txt").read_text() == "someone else's"
        (out / "appeared.txt").unlink()
    with monkeypatch.context() as m:
        _no_caching(m)
        dataset = run_ours(
            CacheActivationsRunnerConfig(**{**cfg.__dict__, "resume": True}),
            tiny_model,
            corpus,
        )
    assert len(dataset) == cfg.n_seq_in_dataset
    assert not layout.staging.exists()


@pytest.mark.slow  # a CLI process loads torch and the model (10-30 s on 2 cores)
def test_ctrl_c_in_run_ends_with_one_line_and_status_130(
    tmp_path, llama_dir, text_file
):
    config = cli_config(
        tmp_path,
        llama_dir,
        text_file,
        shuffle=False,
        training_tokens=400_000,
        on_dataset_exhausted="repeat",
    )
    layout = Layout.for_output(tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae_cache_ext", "run", str(config), "--quiet"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (layout.staging / checkpoints.CHECKPOINT).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("sae-cache-ext: interrupted. The work so far is kept")
    assert "resume=True" in lines[-1]
    assert sum("interrupted" in line.lower() for line in lines) == 1
    # what the line promises: the work is kept, with its checkpoint
    assert (layout.staging / checkpoints.CHECKPOINT).exists()
    assert not layout.lease.exists()

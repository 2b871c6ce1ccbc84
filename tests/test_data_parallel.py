"""Data-parallel caching under torchrun: real processes, the gloo backend on CPU.

Each run starts `torchrun --standalone --nproc_per_node N -m sae_cache_ext run CFG`
(or `tests/dp_child.py`, the same command with a rank killed on purpose). The
reference for rank r is a single process caching `split_dataset_by_node(dataset, r,
N)` with that rank's share of `training_tokens`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets.distributed import split_dataset_by_node

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache_ext.data import load_local_dataset
from sae_cache_ext.distributed import World, rows_of_rank
from sae_cache_ext.models import load_local_model
from sae_cache_ext.staging import MARKER, Layout
from tests.helpers import cli_config, columns
from tests.test_statistics import assert_statistics_match

ROOT = Path(__file__).resolve().parent.parent
HOOK = "blocks.1.hook_resid_post"
# 16 tokens a row, 8 rows a buffer; 45 rows: 23 + 22 on 2 ranks, 15 each on 3
TRAINING_TOKENS = 45 * 16


def _config(folder: Path, llama_dir: Path, text_file: Path, **extra) -> Path:
    defaults = {"hook_name": HOOK, "training_tokens": TRAINING_TOKENS, "shuffle": False}
    return cli_config(folder, llama_dir, text_file, **{**defaults, **extra})


def _torchrun(
    n: int, config: Path, *child_args: str, check: bool = True
) -> subprocess.CompletedProcess:
    target = (
        [str(ROOT / "tests" / "dp_child.py"), str(config), *child_args]
        if child_args
        else ["-m", "sae_cache_ext", "run", str(config), "--quiet"]
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        *target,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _reference(config: Path, n: int, tmp_path: Path) -> list[tuple[np.ndarray, ...]]:
    """What a single process caches from each rank's split, rank by rank."""
    values = yaml.safe_load(config.read_text())
    model = load_local_model(values["model_name"])
    dataset = load_local_dataset(values["dataset_path"])
    total_rows = values["training_tokens"] // values["context_size"]
    parts = []
    for rank in range(n):
        rows = rows_of_rank(total_rows, World(rank=rank, size=n), rank)
        cfg = CacheActivationsRunnerConfig(
            **{
                **values,
                "training_tokens": rows * values["context_size"],
                "shuffle": False,
                "shuffle_across_sequences": False,
                "new_cached_activations_path": str(tmp_path / f"ref-{rank}"),
            }
        )
        runner = CacheActivationsRunner(
            cfg,
            override_dataset=split_dataset_by_node(dataset, rank=rank, world_size=n),
            override_model=model,
            quiet=True,
        )
        runner.run()
        out = Path(str(cfg.new_cached_activations_path))
        parts.append(
            tuple(
                columns(out / h if cfg.hook_names else out, h)[i]
                for h in cfg.all_hook_names
                for i in (0, 1)
            )
        )
    return parts


def _rows(acts: np.ndarray, toks: np.ndarray) -> list[bytes]:
    """Each row as bytes (its token ids and activations), for a multiset compare."""
    return sorted(a.tobytes() + t.tobytes() for a, t in zip(acts, toks, strict=True))


def test_two_ranks_cache_the_concatenation_of_their_splits(
    tmp_path, llama_dir, text_file
):
    config = _config(tmp_path / "dp", llama_dir, text_file)
    _torchrun(2, config)
    out = tmp_path / "dp" / "cache"
    acts, toks = columns(out, HOOK)
    reference = _reference(config, 2, tmp_path)
    ref_acts = np.concatenate([part[0] for part in reference])
    ref_toks = np.concatenate([part[1] for part in reference])
    # no row lost or duplicated, and unshuffled: rank 0's rows, then rank 1's
    assert acts.shape == (45, 16, 32)
    assert acts.tobytes() == ref_acts.tobytes()
    assert np.array_equal(toks, ref_toks)

    manifest = json.loads((out / MARKER).read_text())
    parallel = manifest["data_parallel"]
    assert parallel["world_size"] == 2 and parallel["backend"] == "gloo"
    assert [r["rows"] for r in parallel["ranks"]] == [23, 22]
    assert manifest["rows"] == 45
    assert manifest["accounting"]["documents_read"] == sum(
        r["documents_read"] for r in parallel["ranks"]
    )
    assert manifest["fingerprint"].endswith("-w2")
    # both ranks' statistics merged, as if computed over every cached row at once
    assert_statistics_match(manifest["statistics"][HOOK], acts)
    assert manifest["envelope"]["rows"] == 2 * 3  # each rank's first buffer
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "dataset_info.json", "state.json"]
        + [f"data-{i:05d}-of-00006.arrow" for i in range(6)]
    )
    assert not Layout.for_output(out).staging.exists()


@pytest.mark.slow
def test_three_ranks_shuffled_several_hooks_hold_the_same_multiset(
    tmp_path, llama_dir, text_file
):
    hooks = [HOOK, "blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"]
    options = {"shuffle": True, "hook_names": hooks, "seed": 3}
    config = _config(tmp_path / "dp", llama_dir, text_file, **options)
    _torchrun(3, config)
    reference = _reference(config, 3, tmp_path)
    out = tmp_path / "dp" / "cache"
    first_toks = None
    for i, hook in enumerate(hooks):
        acts, toks = columns(out / hook, hook)
        ref_acts = np.concatenate([part[2 * i] for part in reference])
        ref_toks = np.concatenate([part[2 * i + 1] for part in reference])
        assert _rows(acts, toks) == _rows(ref_acts, ref_toks)
        assert not np.array_equal(toks, ref_toks)  # shuffled
        first_toks = toks if first_toks is None else first_toks
        assert np.array_equal(toks, first_toks)  # one row order for every hook
    manifest = json.loads((out / MARKER).read_text())
    assert [r["rows"] for r in manifest["data_parallel"]["ranks"]] == [15, 15, 15]

    # the same config and world size give the same bytes
    again = _config(tmp_path / "again", llama_dir, text_file, **options)
    _torchrun(3, again)
    for hook in hooks:
        a = columns(out / hook, hook)
        b = columns(tmp_path / "again" / "cache" / hook, hook)
        assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rank", "where", "at"),
    [
        (1, "write_buffer", 2),
        (1, "write_buffer", 3),
        (0, "shard", 2),
        (1, "shard", 2),
    ],
    ids=["rank1-caching", "rank1-last-buffer", "rank0-gathering", "rank1-gathering"],
)
def test_a_dead_rank_fails_the_job_cleanly_and_resume_continues(
    tmp_path, llama_dir, text_file, rank, where, at
):
    options = {"shuffle": True, "shuffle_across_sequences": True, "resume": True}
    reference = _config(tmp_path / "ref", llama_dir, text_file, **options)
    _torchrun(2, reference)
    config = _config(tmp_path / "dp", llama_dir, text_file, **options)
    failed = _torchrun(
        2,
        config,
        *("--kill-rank", str(rank), "--kill-at", str(at), "--kill-in", where),
        check=False,
    )
    assert failed.returncode != 0
    out = tmp_path / "dp" / "cache"
    assert not out.exists()  # no partial dataset visible
    assert Layout.for_output(out).staging.exists()  # kept for resume=True

    _torchrun(2, config)
    acts, toks = columns(out, HOOK)
    ref_acts, ref_toks = columns(tmp_path / "ref" / "cache", HOOK)
    assert acts.tobytes() == ref_acts.tobytes() and np.array_equal(toks, ref_toks)
    manifest = json.loads((out / MARKER).read_text())
    assert manifest["resumed"] is True
    assert not Layout.for_output(out).staging.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "at", "phase"),
    [("write_buffer", 2, "caching"), ("shard", 1, "gathering")],
)
def test_a_failing_rank_fails_every_rank_at_once_without_torchrun(
    tmp_path, llama_dir, text_file, where, at, phase
):
    """Two ranks started by hand (no torchrun to stop the job): rank 1 raises, and
    rank 0 fails promptly with rank 1's error instead of waiting at a collective."""
    options = {"shuffle": True, "resume": True, "distributed_timeout_minutes": 30}
    config = _config(tmp_path / "dp", llama_dir, text_file, **options)
    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        command = [sys.executable, str(ROOT / "tests" / "dp_child.py"), str(config)]
        command += ["--kill-rank", "1", "--kill-at", str(at), "--kill-in", where]
        ranks.append(
            subprocess.Popen(
                [*command, "--fail"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [1, 1], outputs[0][1][-3000:]
    expected = f"The run failed while {phase} (rank 1: RuntimeError: injected failure"
    assert expected in outputs[0][1], outputs[0][1][-3000:]
    assert expected in outputs[1][1], outputs[1][1][-3000:]
    out = tmp_path / "dp" / "cache"
    assert not out.exists() and Layout.for_output(out).staging.exists()

"""Pinned bytes: the sha256 of small caches made by the code before the redesign.

The expected hashes below were computed by this package at commit e9cc67e (before
runner.py was split up), and the redesigned code must reproduce them byte for byte.
Changing any pinned value needs a reason in CHANGELOG.md.

For each cache, every file except the manifests is hashed (the Arrow shards,
`state.json` and `dataset_info.json`, in every hook's folder) into a dict
`{relative path: sha256}` that is compared whole, so a file added, lost or renamed
fails too. Each manifest is pinned by its row counts and a hash of its deterministic
part: everything but creation time, timings, writer stalls, library versions, the
path-dependent `final_path`/`fingerprint`, this process's torch thread count and
seed state, and with temporary paths masked.

The bytes depend on the Python build (the corpus is CPython's pydoc topics), the
library versions and the CPU's float arithmetic, so every test here is skipped, with
the difference named, where those differ from the environment the pins were made in
(`PINNED_ENVIRONMENT`, the versions of constraints.txt).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig, shuffle
from sae_cache_ext.shard_files import ShardFiles
from sae_cache_ext.staging import MARKER, Layout
from tests.conftest import default_cfg_kwargs
from tests.helpers import before_nth_call, cli_config

ROOT = Path(__file__).resolve().parent.parent
ROW = 16  # tokens a row; 8 rows a buffer (2 batches of 4)
# 3 full buffers and a partial one (2 rows; 8 tokens too few for a third row)
TRAINING_TOKENS = 3 * 8 * ROW + 40
HOOKS = {  # width of each: resid (32), attention with a head axis (4 x 8), MLP (64)
    "blocks.0.hook_resid_post": 32,
    "blocks.0.attn.hook_z": 32,
    "blocks.0.mlp.hook_post": 64,
}
SHUFFLED = {"shuffle": True, "shuffle_across_sequences": True}
CASES: dict[str, dict[str, Any]] = {
    "plain": {"shuffle": False},
    "shuffled": {**SHUFFLED, "exclude_special_tokens": True},
    "hooks": {**SHUFFLED, "hook_names": list(HOOKS), "seed": 7},
}
DP_HOOK = "blocks.1.hook_resid_post"
DP_TRAINING_TOKENS = 45 * ROW  # 23 + 22 rows on 2 ranks

# Manifest entries that vary from run to run or with the output path.
VOLATILE = ("created", "final_path", "fingerprint", "timings", "versions")
VOLATILE_RUN = ("torch_num_threads", "torch_initial_seed", "deterministic_algorithms")
# a local dataset's fingerprint holds its files' mtimes
VOLATILE_INPUTS = ("dataset",)
VOLATILE_WRITER = ("max_queue_depth", "stall_seconds", "stalls", "write_seconds")
# Entries added after the pins were made, left out of the pinned part (their values
# are tested where they are made: tests/test_statistics.py); config fields only when
# at their default, which is the behaviour the pins were made with.
ADDED_SINCE_PINS = ("statistics", "envelope", "excluded_tokens", "inputs", "plan")
ADDED_CONFIG_DEFAULTS = {
    "on_non_finite": "error",
    "lease_stale_seconds": 120.0,
    "wait_for_lease": False,
    "distributed_timeout_minutes": 360.0,
    "store_token_positions": False,
}
# the libraries the bytes depend on
PACKAGES = (
    "torch",
    "pyarrow",
    "datasets",
    "numpy",
    "tokenizers",
    "transformers",
    "transformer-lens",
    "sae-lens",
)

# -- the pins (made at e9cc67e) ---------------------------------------------------

PINNED_ENVIRONMENT: dict[str, str] = {
    "torch": "2.13.0+cpu",
    "pyarrow": "26.0.1",
    "datasets": "5.2.0",
    "numpy": "2.4.6",
    "tokenizers": "0.23.3",
    "transformers": "5.23.0",
    "transformer-lens": "3.9.0",
    "sae-lens": "6.54.12",
    "machine": "x86_64",
    "pydoc_topics": "37b51a0283fe8609",
    "torch_probe": "79de8e10194d3afe",
}
PINNED_FILES: dict[str, dict[str, str]] = {
    "plain": {
        "data-00000-of-00004.arrow": "a53130fa5f3f2789a58db385d0d5c59c97050ce9e593b7565faa94b13dd0902d",
        "data-00001-of-00004.arrow": "2365c2517ea1df5939eb847459d41477288350b8b884d206dd001731ec205dfd",
        "data-00002-of-00004.arrow": "8b8165c960039a0ad037497b4627a1c327c116eb16554a957cbeaaf44eed58a7",
        "data-00003-of-00004.arrow": "c018cff0fe4a81e4a7bf008f9cb2539e41dc4dc8bcd18bb9570c219bfcb3a148",
        "dataset_info.json": "f7267335895fc917e17ea6302db02ad3fd126048cf3cec8729c3c47f0c8bae5d",
        "state.json": "7d8ec0bb9985abd25951c7095ba072e565b8200533391d8c1edbca430010b521",
    },
    "shuffled": {
        "data-00000-of-00004.arrow": "ffbcf5e976bea0bf820e73016fd1b1df24cbb01b29184378100378926fff557f",
        "data-00001-of-00004.arrow": "728f1cbe9f0daa0b97abc58f77eecc10a835749c92f86bb916cf56ea2942ff9a",
        "data-00002-of-00004.arrow": "920c74b2d54c81b37818c1e6889fec9a1dfad54afc145f07b0959cfa7f8ef746",
        "data-00003-of-00004.arrow": "49d365a6257a6a8209380edd44a82eec57c0a80339c957d7c8e6c5a5a7d6f00c",
        "dataset_info.json": "f7267335895fc917e17ea6302db02ad3fd126048cf3cec8729c3c47f0c8bae5d",
        "state.json": "540007076550b97a1326230d32a0c4897f10d11796abc1c37c116ca204d0df5b",
    },
    "hooks": {
        "blocks.0.attn.hook_z/data-00000-of-00004.arrow": "b1075f19a52ec6140f59d2ded2d61afe17080c6a4b6e84278dbdb94834e4bf76",
        "blocks.0.attn.hook_z/data-00001-of-00004.arrow": "ffa52c9d2582b7cc45ea6b2c7a3f08c06192592ee2084d0e7060feee5357906e",
        "blocks.0.attn.hook_z/data-00002-of-00004.arrow": "73f9341099441329c9942bf996176057ce80234fd1bd09481034a6ef941b167a",
        "blocks.0.attn.hook_z/data-00003-of-00004.arrow": "bc9f446cc972667708dc029b7b0498c131cef87f298c029aec48d59d5779738b",
        "blocks.0.attn.hook_z/dataset_info.json": "96d613ac869dbeeee7e7525e4ede5f28f2ab3af0dc625efa31abfb6748a2a9b3",
        "blocks.0.attn.hook_z/state.json": "b60df981ceabc1bc9a5347361dadf8b3c3d9ce41ca27364fbfbf3dd7e4e09cfd",
        "blocks.0.hook_resid_post/data-00000-of-00004.arrow": "ab5cb26033814a2df9239ac20ce120ede9449333d31f706e9bfcd3bf0dcdeda2",
        "blocks.0.hook_resid_post/data-00001-of-00004.arrow": "0f70ac83c2397c9d045b8e38fcc713f53d7a820bd2b0ef5d5c06f9404686510b",
        "blocks.0.hook_resid_post/data-00002-of-00004.arrow": "a283d136572cb178b6baa55f85bb60d09bb178688acb36cb62be558136c0a203",
        "blocks.0.hook_resid_post/data-00003-of-00004.arrow": "1eb6fa7fc1bfe6f85eea61bc37e2c881fff402de5f8a2a29a6d26ecddd259bf8",
        "blocks.0.hook_resid_post/dataset_info.json": "f7267335895fc917e17ea6302db02ad3fd126048cf3cec8729c3c47f0c8bae5d",
        "blocks.0.hook_resid_post/state.json": "2991ee153bf87aea4425b4bcf606279a603a76783b9188ab62cc3dec56e56dbe",
        "blocks.0.mlp.hook_post/data-00000-of-00004.arrow": "bd271eec1f01a9620206428ec49f8db7ecd7c0d058158f663ebbb36df8e09c7e",
        "blocks.0.mlp.hook_post/data-00001-of-00004.arrow": "613544e2d6164a40e9fc29bb65c03fa95d774ee18bad14af56f5f7f93415d2fe",
        "blocks.0.mlp.hook_post/data-00002-of-00004.arrow": "82eaa088d641ce71da23e9116c2cc6290e2d9a5016a43ddaf331e5de7240961a",
        "blocks.0.mlp.hook_post/data-00003-of-00004.arrow": "94141fcc289f13f393a38bd93610dc7451b9ac3dcba57576ea5fd961675949c3",
        "blocks.0.mlp.hook_post/dataset_info.json": "5c2e02be84c210ca1b68ed58b47cd7a9241e06191dbf8b0bc443c3f4b0232119",
        "blocks.0.mlp.hook_post/state.json": "10397367b746a6e39590a1c7eec034b18e02234058d43d3847595f65b581aabc",
    },
    "data_parallel": {
        "data-00000-of-00006.arrow": "71cf2d54d75d9ac27e03a23a7a8ceeba26b292fdad794ef5066a773b90660924",
        "data-00001-of-00006.arrow": "5670e235e24d8f3c848e1884f7363b3740906deb287fbe0d228b82820888c89f",
        "data-00002-of-00006.arrow": "669534a08fe03f00f664e077229929a05726677e63d0b3cdc34a9bd90180a217",
        "data-00003-of-00006.arrow": "8ab3e9b191e3f340cbedcea6c38dc74b1a197e9abb983d3ecd43968b104a3f37",
        "data-00004-of-00006.arrow": "873ee3a88342c31ecb15ae517d130dd5c84431e296b592a9b70a08e3b2fcc998",
        "data-00005-of-00006.arrow": "47d590ba05419afe1a1018663ebc1b26d07c81c3d23bde4a7061e2f1326049ee",
        "dataset_info.json": "b43b90372f97447a33be40d3668e8f35dd42d8a09ba239b018ca12e2ad2f7d21",
        "state.json": "c86b2eb07104d380f4ced894d3e6b447b81fa2e14c03e813f2141bb11ff057cb",
    },
}
PINNED_MANIFESTS: dict[str, dict[str, dict[str, Any]]] = {
    "plain": {
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [8, 8, 8, 2],
            "facts_sha256": "a27681d441ae03f05e248f0c2bec0c71f6531a111b923d4f9a4c39472d48e8d9",
        }
    },
    "plain-resumed": {
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [8, 8, 8, 2],
            "facts_sha256": "1fa183052941bdaa7d3d0ecda4edf83dd70113fdfa1d65a040deb140878e23a4",
        }
    },
    "shuffled": {
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [3, 9, 6, 8],
            "facts_sha256": "25e57638a5135b108cea97c1433d02597819b8432912c46d9c621cdaedb856d2",
        }
    },
    "shuffled-resumed": {
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [3, 9, 6, 8],
            "facts_sha256": "73b0ff7a5844d6c7a5def46c65f569cb54e4d158c59e2bb85eaa0134fb7852fd",
        }
    },
    "hooks": {
        "blocks.0.attn.hook_z/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "03130ddcd7d5f91f906ce86468f11be8f38f2ac99c0313fc7800ba0ac9550232",
        },
        "blocks.0.hook_resid_post/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "1943482a234cbb8b7d04134906b3e89667773b8922dbb6452ce9461ccbd21c66",
        },
        "blocks.0.mlp.hook_post/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "f8d143f91954d55eb0081a740c02dae07de03a84c33f194c3c57255783c35775",
        },
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [],
            "facts_sha256": "0ba84d79528f4ae78415b440312168a0662612c591f2dde794a5fde2272ed95f",
        },
    },
    "hooks-resumed": {
        "blocks.0.attn.hook_z/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "ca15ba7005ca70ff13aba3502aae262e69e93b93219be2480598a856e31abd66",
        },
        "blocks.0.hook_resid_post/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "72c1540b1c58a7bf68a9c1f741075e5bc1ccc0a5fd3fd6bd8f9d26603ec55b8d",
        },
        "blocks.0.mlp.hook_post/sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [7, 7, 6, 6],
            "facts_sha256": "46e71e62f6793ff18c1d4abc0bcdd1e730f032801993f11911b829b22a36ac40",
        },
        "sae_cache_ext_manifest.json": {
            "rows": 26,
            "shard_rows": [],
            "facts_sha256": "e789e6e35f44b308e72ab4a73a95a6e4dfb0f7ed2d5b9303077b9cc02850e933",
        },
    },
    "data_parallel": {
        "sae_cache_ext_manifest.json": {
            "rows": 45,
            "shard_rows": [7, 9, 5, 10, 6, 8],
            "facts_sha256": "c6a6cce4d9e28cca8f6e7f3ddc1ac92fb7693233f06f2f6d8d1cfd39bb6c39f3",
        }
    },
}


# -- what is hashed ---------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _environment() -> dict[str, str]:
    """What the bytes depend on besides this package: library versions, the corpus
    (CPython's pydoc topics) and a probe of torch's CPU float arithmetic."""
    import pydoc_data.topics

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 40, generator=generator)
    w = torch.randn(40, 64, generator=generator)
    probe = torch.nn.functional.gelu(torch.nn.functional.layer_norm(x @ w, (64,)))
    return {
        **{name: importlib.metadata.version(name) for name in PACKAGES},
        "machine": platform.machine(),
        "pydoc_topics": _sha256(
            json.dumps(pydoc_data.topics.topics, sort_keys=True).encode()
        )[:16],
        "torch_probe": _sha256(probe.numpy().tobytes())[:16],
    }


@pytest.fixture(scope="module", autouse=True)
def _pinned_environment() -> None:
    here = _environment()
    differs = {
        key: (PINNED_ENVIRONMENT.get(key), value)
        for key, value in here.items()
        if PINNED_ENVIRONMENT.get(key) != value
    }
    if differs:
        pytest.skip(f"pinned in another environment (pinned, here): {differs}")


def _mask(value: Any, tmp_roots: tuple[str, ...]) -> Any:
    """`value` with every string under a temporary folder replaced by `<tmp>`."""
    if isinstance(value, dict):
        return {k: _mask(v, tmp_roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, tmp_roots) for v in value]
    if isinstance(value, str) and value.startswith(tmp_roots):
        return "<tmp>"
    return value


def _manifest_facts(manifest: dict[str, Any], tmp_roots: tuple[str, ...]) -> dict:
    """The manifest's deterministic part (its volatile keys' names are kept)."""
    facts = {k: v for k, v in manifest.items() if k not in VOLATILE + ADDED_SINCE_PINS}
    facts["volatile_keys"] = sorted(k for k in VOLATILE if k in manifest)
    if "config" in facts:
        facts["config"] = {
            k: v
            for k, v in facts["config"].items()
            if not (k in ADDED_CONFIG_DEFAULTS and ADDED_CONFIG_DEFAULTS[k] == v)
        }
    if "run" in facts:
        facts["run"] = {
            k: ("<volatile>" if k in VOLATILE_RUN else v)
            for k, v in facts["run"].items()
        }
    if "inputs" in facts:
        facts["inputs"] = {
            k: ("<volatile>" if k in VOLATILE_INPUTS else v)
            for k, v in facts["inputs"].items()
        }
    if "writer" in facts:
        facts["writer"] = {
            k: ("<volatile>" if k in VOLATILE_WRITER else v)
            for k, v in facts["writer"].items()
        }
    if "data_parallel" in facts:
        parallel = facts["data_parallel"]
        facts["data_parallel"] = {
            **parallel,
            "ranks": [
                {k: v for k, v in r.items() if not k.endswith("seconds")}
                for r in parallel["ranks"]
            ],
        }
    return _mask(facts, tmp_roots)


def _digest(out: Path, tmp_roots: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """`{relative path: sha256}` of every file but the manifests; `{relative path:
    rows, shard rows and the hash of its deterministic part}` of each manifest; and
    that deterministic part as JSON, to show on a mismatch."""
    files: dict[str, str] = {}
    manifests: dict[str, dict[str, Any]] = {}
    texts: dict[str, str] = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(out).as_posix()
        data = path.read_bytes()
        if path.name == MARKER:
            manifest = json.loads(data)
            facts = json.dumps(_manifest_facts(manifest, tmp_roots), sort_keys=True)
            assert not any(root in facts for root in tmp_roots), facts
            manifests[relative] = {
                "rows": manifest["rows"],
                "shard_rows": [s["rows"] for s in manifest["shards"]],
                "facts_sha256": _sha256(facts.encode()),
            }
            texts[relative] = facts
            continue
        assert not any(root.encode() in data for root in tmp_roots), relative
        files[relative] = _sha256(data)
    return files, manifests, texts


def _check(name: str, files_case: str, out: Path, tmp_roots: tuple[str, ...]) -> None:
    """The cache at `out` has the files pinned for `files_case` and the manifests
    pinned for `name` (a resumed run pins its own manifests: it says resumed)."""
    assert not Layout.for_output(out).staging.exists()
    files, manifests, texts = _digest(out, tmp_roots)
    assert files == PINNED_FILES[files_case]
    pinned = PINNED_MANIFESTS[name]
    differing = {k: texts.get(k) for k in manifests if manifests[k] != pinned.get(k)}
    assert manifests == pinned, f"deterministic parts here: {differing}"


# -- the runs ---------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path_factory) -> tuple[str, ...]:
    return (str(tmp_path_factory.getbasetemp()),)


def _cfg_kwargs(folder: Path, case: str, **extra: Any) -> dict[str, Any]:
    options = {**CASES[case], "training_tokens": TRAINING_TOKENS, **extra}
    if "hook_names" in options:  # 2 batches a buffer, as for the 32-wide hook
        options["buffer_size_gb"] = (2 * 4 * ROW * 32 * 4 + 0.5) / 1e9
    return default_cfg_kwargs(folder, **options)


def _cfg(folder: Path, case: str, **extra: Any) -> CacheActivationsRunnerConfig:
    return CacheActivationsRunnerConfig(**_cfg_kwargs(folder, case, **extra))


def _run(cfg: CacheActivationsRunnerConfig, model, corpus) -> Path:
    CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    ).run()
    return Path(str(cfg.new_cached_activations_path))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_gives_the_pinned_bytes(tmp_path, roots, tiny_model, corpus, case):
    out = _run(_cfg(tmp_path, case), tiny_model, corpus)
    _check(case, case, out, roots)


# (sink or module, function, n): interrupt right before its n-th call. 4 buffers:
# write_buffer 3 is mid-caching; 4 buckets: the 3rd shard written is mid-gather.
INTERRUPTIONS = {
    "caching": lambda cfg: (
        shuffle.BucketShuffleSink if cfg.shuffle else shuffle.OrderedSink,
        "write_buffer",
        3,
    ),
    "gather": lambda cfg: (ShardFiles, "__init__", 3),  # the 3rd shard started
}


@pytest.mark.parametrize(
    ("case", "where"),
    [
        ("plain", "caching"),
        ("shuffled", "caching"),
        ("shuffled", "gather"),
        ("hooks", "caching"),
        ("hooks", "gather"),
    ],
)
def test_a_resumed_run_gives_the_uninterrupted_bytes(
    tmp_path, roots, tiny_model, corpus, monkeypatch, case, where
):
    cfg = _cfg(tmp_path, case, resume=True)
    owner, name, n = INTERRUPTIONS[where](cfg)

    def interrupt() -> None:
        raise Interrupt(f"{name} call {n}")

    with monkeypatch.context() as m:
        m.setattr(owner, name, before_nth_call(getattr(owner, name), n, interrupt))
        with pytest.raises(Interrupt):
            _run(cfg, tiny_model, corpus)
    out = Path(str(cfg.new_cached_activations_path))
    assert Layout.for_output(out).staging.exists() and not out.exists()
    _run(cfg, tiny_model, corpus)
    _check(f"{case}-resumed", case, out, roots)


@pytest.mark.slow
def test_a_sigkilled_run_resumed_gives_the_uninterrupted_bytes(
    tmp_path, roots, tiny_model, tokenizer_dir, corpus
):
    """As above, with the process SIGKILLed mid-caching (tests/kill_child.py)."""
    weights = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), weights)
    cfg = _cfg(tmp_path, "shuffled", resume=True)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "tokenizer_dir": str(tokenizer_dir),
                "weights": str(weights),
                "cfg": _cfg_kwargs(tmp_path, "shuffled", resume=True),
                "kill": ["write_buffer", 3],
            }
        )
    )
    child = subprocess.run(
        [sys.executable, "-m", "tests.kill_child", str(spec)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    out = Path(str(cfg.new_cached_activations_path))
    assert Layout.for_output(out).staging.exists() and not out.exists()
    _run(cfg, tiny_model, corpus)
    _check("shuffled-resumed", "shuffled", out, roots)


def _torchrun(config: Path) -> None:
    """`sae-cache-ext run CONFIG` on 2 ranks (gloo on CPU), as
    test_data_parallel.py runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "sae_cache_ext", "run", str(config)]
    result = subprocess.run(
        [*command, "--quiet"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_a_data_parallel_run_gives_the_pinned_bytes(
    tmp_path, roots, llama_dir, text_file
):
    config = cli_config(
        tmp_path,
        llama_dir,
        text_file,
        hook_name=DP_HOOK,
        training_tokens=DP_TRAINING_TOKENS,
        **SHUFFLED,
    )
    _torchrun(config)
    _check("data_parallel", "data_parallel", tmp_path / "cache", roots)

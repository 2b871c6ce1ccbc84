"""Self-test of the loopback Hub double: real clients push and read back over HTTP."""

import hashlib
import io
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.hub_server import HubStorage, hub_client_env, serve_hub

REPO = "me/cache"
CFG_NAME = "cache_activations_runner_cfg.json"
CFG = {"d_in": 3, "context_size": 4, "seed": 42}

# Runs in a subprocess, as HF_ENDPOINT is read at import time. Pushes a dataset and a
# config file to `revision`, then reads both back from the Hub and checks every bit.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np
    from datasets import Array2D, Dataset, Features, Sequence, Value, load_dataset
    from huggingface_hub import HfApi, HfFileSystem, hf_hub_download

    num_shards, revision, cfg = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    repo, cfg_name = "me/cache", "cache_activations_runner_cfg.json"
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((6, 4, 3), dtype=np.float32)
    acts[0, 0, 0] = np.float32(1e-40)  # subnormal: only a bit-exact trip keeps it
    tokens = rng.integers(-(2**31), 2**31 - 1, size=(6, 4), dtype=np.int32)
    features = Features(
        {
            "activations": Array2D(shape=(4, 3), dtype="float32"),
            "token_ids": Sequence(Value("int32"), length=4),
        }
    )
    ds = Dataset.from_dict({"activations": acts, "token_ids": tokens}, features)
    ds.push_to_hub(
        repo_id=repo, num_shards=num_shards, private=False, revision=revision
    )
    cfg = cfg.encode()
    HfApi().upload_file(
        path_or_fileobj=io.BytesIO(cfg),
        path_in_repo=cfg_name,
        repo_id=repo,
        repo_type="dataset",
        revision=revision,
        commit_message="Add the runner config",
    )

    loaded = load_dataset(repo, split="train", revision=revision)
    assert loaded.features == features, loaded.features
    table = loaded.with_format("arrow")[:]
    assert table.equals(ds.with_format("arrow")[:])
    acts_back = loaded.with_format("numpy")[:]["activations"]
    assert acts_back.dtype == np.float32 and acts_back.tobytes() == acts.tobytes()
    ids_back = table["token_ids"].combine_chunks().flatten().to_numpy()
    assert ids_back.dtype == np.int32 and ids_back.tobytes() == tokens.tobytes()

    path = hf_hub_download(repo, cfg_name, repo_type="dataset", revision=revision)
    with open(path, "rb") as f:
        assert f.read() == cfg
    with HfFileSystem().open(f"datasets/{repo}@{revision}/{cfg_name}", block_size=8) as f:
        f.seek(3)
        assert f.read(10) == cfg[3:13]  # served by Range requests
    files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    assert {"README.md", cfg_name} <= set(files), files
    """
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[str, HubStorage]]:
    with serve_hub(tmp_path / "hub") as endpoint:
        yield endpoint, HubStorage(tmp_path / "hub")


def run_client(endpoint: str, hf_home: Path, num_shards: int | None, revision: str):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            json.dumps(num_shards),
            revision,
            json.dumps(CFG, indent=2),
        ],
        env=hub_client_env(endpoint, hf_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]


def parquet_shards(storage: HubStorage, revision: str) -> list[str]:
    files = storage.list_files(REPO, revision)
    return [f for f in files if f.startswith("data/") and f.endswith(".parquet")]


def test_push_upload_and_read_back(hub: tuple[str, HubStorage], tmp_path: Path) -> None:
    endpoint, storage = hub
    run_client(endpoint, tmp_path / "hf_home", num_shards=None, revision="main")

    assert storage.list_files(REPO) == [
        ".gitattributes",
        "README.md",
        CFG_NAME,
        "data/train-00000-of-00001.parquet",
    ]
    assert json.loads(storage.read_file(REPO, CFG_NAME)) == CFG
    shard = storage.read_file(REPO, "data/train-00000-of-00001.parquet")
    table = pq.read_table(io.BytesIO(shard))
    assert table.num_rows == 6
    assert table.column_names == ["activations", "token_ids"]
    assert storage.files(REPO)["data/train-00000-of-00001.parquet"]["lfs"]
    assert not storage.files(REPO)[CFG_NAME]["lfs"]
    titles = [c["title"] for c in storage.commits(REPO)]
    assert titles == ["Add the runner config", "Upload dataset", "initial commit"]


def test_two_shards_on_a_new_branch(
    hub: tuple[str, HubStorage], tmp_path: Path
) -> None:
    endpoint, storage = hub
    run_client(endpoint, tmp_path / "hf_home", num_shards=None, revision="main")
    main_head = storage.branches(REPO)["main"]
    run_client(endpoint, tmp_path / "hf_home", num_shards=2, revision="dev")

    assert storage.branches(REPO)["main"] == main_head
    assert storage.branches(REPO)["dev"] != main_head
    # dev started from main, then push_to_hub replaced the one shard by two
    assert parquet_shards(storage, "dev") == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert parquet_shards(storage, "main") == ["data/train-00000-of-00001.parquet"]
    shards = [storage.read_file(REPO, f, "dev") for f in parquet_shards(storage, "dev")]
    assert [pq.read_table(io.BytesIO(s)).num_rows for s in shards] == [3, 3]
    # the unchanged config was not committed again
    assert storage.commits(REPO, "dev")[1]["id"] == main_head


def fetch(url: str, method: str = "GET", **headers: str):
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as error:
        return error


def test_resolve_headers_ranges_and_errors(tmp_path: Path) -> None:
    storage = HubStorage(tmp_path / "hub")
    storage.create_repo("me/seeded")
    data = bytes(range(256)) * 4
    add = {"path": "dir/blob.bin", "content": data, "lfs": True}
    sha = storage.commit("me/seeded", [add], "Seed")

    with serve_hub(tmp_path / "hub") as endpoint:
        url = f"{endpoint}/datasets/me/seeded/resolve/main/dir/blob.bin"
        head = fetch(url, "HEAD")
        assert head.status == 200 and head.read() == b""
        assert head.headers["X-Repo-Commit"] == sha
        assert head.headers["Content-Length"] == head.headers["X-Linked-Size"] == "1024"
        assert head.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert fetch(url).read() == data

        ranged = fetch(url, Range="bytes=10-19")
        assert ranged.status == 206 and ranged.read() == data[10:20]
        assert ranged.headers["Content-Range"] == "bytes 10-19/1024"
        assert fetch(url, Range="bytes=-4").read() == data[-4:]
        assert fetch(url, Range="bytes=1000-").read() == data[1000:]
        assert fetch(url, Range="bytes=1024-").status == 416

        for path, code in [
            ("/api/datasets/me/missing", "RepoNotFound"),
            ("/datasets/me/missing/resolve/main/x.json", "RepoNotFound"),
            ("/datasets/me/seeded/resolve/nope/dir/blob.bin", "RevisionNotFound"),
            ("/datasets/me/seeded/resolve/main/x.json", "EntryNotFound"),
        ]:
            error = fetch(endpoint + path)
            assert (error.status, error.headers["X-Error-Code"]) == (404, code)
        missing = fetch(f"{endpoint}/datasets/me/seeded/resolve/main/x.json")
        assert missing.headers["X-Repo-Commit"] == sha  # lets the client cache the miss

"""A loopback test double of the Hugging Face Hub HTTP API.

CI cannot reach huggingface.co, yet the code under test talks to the Hub through the
real clients (``Dataset.push_to_hub``, ``HfApi.upload_file``, ``load_dataset``,
``hf_hub_download``).  This module serves just enough of the Hub API on 127.0.0.1 for
those clients to work unmodified over HTTP: repo creation, branches, the
preupload/commit protocol, Git LFS batch uploads (the client must not use Xet, hence
``HF_HUB_DISABLE_XET=1``), tree listings and ``resolve`` downloads with HEAD and Range.

Everything is kept in a folder: ``blobs/<sha256>`` holds file contents and
``repos/<type>s/<namespace>/<name>.json`` a repo's branches and commits (each commit
records its full file list, plenty for test-sized repos).  ``HubStorage`` reads that
folder, so tests can inspect what was pushed or seed a repo before a test.

``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` when imported, so the client
code must run in a subprocess started with the environment of ``hub_client_env``::

    with serve_hub(tmp_path / "hub") as endpoint:
        env = hub_client_env(endpoint, tmp_path / "hf_home")
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert "README.md" in HubStorage(tmp_path / "hub").list_files("me/cache")

Not implemented: pull requests, tags, Xet, multipart LFS, access control (any token
is the user ``me``), pagination (listings come in one page) and ``expand=True`` data.
"""

import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

USER = "me"  # the account behind every token, and the namespace of unqualified repos
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Like the Hub, store files this big or with a NUL byte in their first 512 bytes in LFS.
LFS_MIN_SIZE = 10 * 1024 * 1024
# The first commit of a repo adds this file, as on the Hub; it decides which files go
# to LFS (the preupload answer).
LFS_EXTENSIONS = "arrow bin gz h5 npy npz parquet pickle pkl pt pth safetensors tar zip"
INITIAL_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS.split()
)

Entry = dict[str, Any]  # a file in a commit: {"sha256", "size", "lfs", "oid"}


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code``, JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def _entry(sha256: str, size: int, lfs: bool, git_object: bytes) -> Entry:
    oid = _sha1(b"blob %d\0" % len(git_object) + git_object)  # the git blob id
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


class HubStorage:
    """The fake Hub's repos and blobs under ``root``: used by the server and by tests.

    Public helpers take ``repo_id`` first and ``repo_type="dataset"`` by keyword.
    ``revision`` is a branch name or a commit id.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # ----- inspection -----------------------------------------------------------------
    def repo_exists(self, repo_id: str, *, repo_type: str = "dataset") -> bool:
        return self._state_file(repo_id, repo_type).exists()

    def branches(self, repo_id: str, *, repo_type: str = "dataset") -> dict[str, str]:
        """Branch name -> id of its head commit."""
        return dict(self.load(repo_id, repo_type)["refs"])

    def commits(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset"
    ) -> list[dict[str, str]]:
        """Commits reachable from ``revision``, newest first (id/title/message/date)."""
        state = self.load(repo_id, repo_type)
        sha: str | None = self.resolve(state, revision)
        out = []
        while sha is not None:
            commit = state["commits"][sha]
            out.append(
                {"id": sha} | {k: commit[k] for k in ("title", "message", "date")}
            )
            sha = commit["parent"]
        return out

    def list_files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset"
    ) -> list[str]:
        return sorted(self.files(repo_id, revision, repo_type=repo_type))

    def read_file(
        self,
        repo_id: str,
        path: str,
        revision: str = "main",
        *,
        repo_type: str = "dataset",
    ) -> bytes:
        entry = self.files(repo_id, revision, repo_type=repo_type).get(path)
        if entry is None:
            raise FileNotFoundError(
                f"{path} is not in {repo_type} {repo_id}@{revision}"
            )
        return self.blob_path(entry["sha256"]).read_bytes()

    def files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset"
    ) -> dict[str, Entry]:
        """Path -> {sha256, size, lfs, oid} for every file at ``revision``."""
        state = self.load(repo_id, repo_type)
        return state["commits"][self.resolve(state, revision)]["files"]

    # ----- changes (the server's, or a test seeding a repo) ---------------------------
    def create_repo(
        self, repo_id: str, *, repo_type: str = "dataset", private: bool = False
    ) -> bool:
        """Create a repo with its initial commit; False if it already exists."""
        with self._lock:
            if self.repo_exists(repo_id, repo_type=repo_type):
                return False
            state = {"private": private, "createdAt": _now(), "refs": {}, "commits": {}}
            self._save(repo_id, repo_type, state)
            add = {"path": ".gitattributes", "content": INITIAL_GITATTRIBUTES.encode()}
            self.commit(repo_id, [add], "initial commit", repo_type=repo_type)
            return True

    def create_branch(
        self,
        repo_id: str,
        branch: str,
        starting_point: str = "main",
        *,
        repo_type: str = "dataset",
    ) -> None:
        with self._lock:
            state = self.load(repo_id, repo_type)
            if branch in state["refs"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            state["refs"][branch] = self.resolve(state, starting_point)
            self._save(repo_id, repo_type, state)

    def commit(
        self,
        repo_id: str,
        operations: list[dict[str, Any]],
        title: str,
        description: str = "",
        branch: str = "main",
        *,
        repo_type: str = "dataset",
    ) -> str:
        """Commit ``operations`` on top of ``branch``; return the new commit id.

        Operations: ``{"path", "content": bytes}`` adds a regular file (an LFS one
        with ``"lfs": True``), ``{"path", "lfs_oid", "size"}`` adds an LFS object
        already uploaded, ``{"delete": path}`` and ``{"delete_folder": path}`` delete.
        """
        with self._lock:
            state = self.load(repo_id, repo_type)
            parent = state["refs"].get(branch)
            if parent is None and state["refs"]:  # only a new repo has no branch yet
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            files = dict(state["commits"][parent]["files"]) if parent else {}
            for op in operations:
                if "delete" in op:
                    if files.pop(op["delete"], None) is None:
                        msg = "A file with this name doesn't exist"
                        raise HubError(404, msg, "EntryNotFound")
                elif "delete_folder" in op:
                    prefix = op["delete_folder"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                elif "content" in op:
                    data, lfs = op["content"], op.get("lfs", False)
                    sha256 = self.put_blob(data)
                    git_object = _lfs_pointer(sha256, len(data)) if lfs else data
                    files[op["path"]] = _entry(sha256, len(data), lfs, git_object)
                else:
                    sha256, size = op["lfs_oid"], op["size"]
                    blob = self.blob_path(sha256)
                    if not blob.exists() or blob.stat().st_size != size:
                        msg = f"LFS object of {op['path']} was not uploaded"
                        raise HubError(400, msg)
                    files[op["path"]] = _entry(
                        sha256, size, True, _lfs_pointer(sha256, size)
                    )
            date = _now()
            sha = _sha1(json.dumps([parent, title, description, date, files]).encode())
            state["commits"][sha] = {
                "parent": parent,
                "title": title,
                "message": description,
                "date": date,
                "files": files,
            }
            state["refs"][branch] = sha
            self._save(repo_id, repo_type, state)
            return sha

    # ----- internals ------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    def load(self, repo_id: str, repo_type: str) -> dict[str, Any]:
        """The repo's state: {"private", "createdAt", "refs", "commits"}."""
        with self._lock:
            path = self._state_file(repo_id, repo_type)
            if not path.exists():
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
            return json.loads(path.read_text())

    @staticmethod
    def resolve(state: dict[str, Any], revision: str) -> str:
        """Branch name, ``refs/heads/<branch>`` or commit id -> commit id."""
        revision = revision.removeprefix("refs/heads/")
        if revision in state["refs"]:
            return state["refs"][revision]
        if revision in state["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _state_file(self, repo_id: str, repo_type: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / f"{repo_id}.json"

    def _save(self, repo_id: str, repo_type: str, state: dict[str, Any]) -> None:
        path = self._state_file(repo_id, repo_type)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)  # atomic: a test reading the file never sees half of it


def _is_lfs(gitattributes: str, path: str, size: int, sample: bytes) -> bool:
    if size >= LFS_MIN_SIZE or b"\0" in sample:
        return True
    for line in gitattributes.splitlines():
        pattern, *attributes = line.split() or [""]
        name = path if "/" in pattern else path.rsplit("/", 1)[-1]
        if "filter=lfs" in attributes and fnmatch.fnmatch(name, pattern):
            return True
    return False


def _file_info(path: str, entry: Entry) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it."""
    info = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"]}
        info["lfs"]["pointerSize"] = pointer_size
    return info


def _folder_info(path: str, files: dict[str, Entry]) -> dict[str, Any]:
    oids = [e["oid"] for p, e in sorted(files.items()) if p.startswith(path + "/")]
    return {
        "type": "directory",
        "path": path,
        "size": 0,
        "oid": _sha1(str(oids).encode()),
    }


def _tree(
    files: dict[str, Entry], folder: str, recursive: bool
) -> list[dict[str, Any]]:
    """Listing of ``folder`` ("" is the root): its folders first, then its files."""
    prefix = folder + "/" if folder else ""
    folders: set[str] = set()
    out = []
    for path in sorted(p for p in files if p.startswith(prefix)):
        parts = path[len(prefix) :].split("/")
        depths = range(1, len(parts) if recursive else min(len(parts), 2))
        folders.update(prefix + "/".join(parts[:depth]) for depth in depths)
        if recursive or len(parts) == 1:
            out.append(_file_info(path, files[path]))
    return [_folder_info(f, files) for f in sorted(folders)] + out


_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"
_ROUTES = [
    (method, re.compile(pattern + "$"), handler)
    for method, pattern, handler in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", _REPO + r"/refs", "refs"),
        ("GET", _REPO + r"/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", _REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", _REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", _GIT_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_get"),
        ("GET", _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    timeout = 60  # seconds before an idle keep-alive connection is dropped
    server: "_HubServer"
    query: dict[str, str]
    body: bytes

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route_method, pattern, handler in _ROUTES:
                if route_method == method and (match := pattern.match(url.path)):
                    kwargs = {k: unquote(v) for k, v in match.groupdict().items() if v}
                    if (
                        "ns" in kwargs
                    ):  # repo_type: "datasets" -> "dataset", none: model
                        kwargs["repo_id"] = f"{kwargs.pop('ns')}/{kwargs.pop('name')}"
                        kwargs["repo_type"] = kwargs.pop("type", "models")[:-1]
                    getattr(self, f"_{handler}")(**kwargs)
                    return
            logger.warning("Hub double: no route for %s %s", self.command, self.path)
            raise HubError(404, f"No route for {self.command} {url.path}")
        except Exception as error:
            if not isinstance(error, HubError):
                logger.exception("Hub double failed on %s %s", self.command, self.path)
                error = HubError(500, f"{type(error).__name__}: {error}")
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message}, error.status, headers)

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("Hub double: " + format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailer lines
        return b"".join(chunks)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream", **headers}
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, obj: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send(status, json.dumps(obj).encode(), headers)

    def _json_body(self) -> Any:
        return json.loads(self.body or b"{}")

    @property
    def storage(self) -> HubStorage:
        return self.server.storage

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"

    def _files(self, repo_type: str, repo_id: str, rev: str) -> dict[str, Entry]:
        return self.storage.files(repo_id, rev, repo_type=repo_type)

    # ----- account and repos ----------------------------------------------------------
    def _whoami(self) -> None:
        token = {"displayName": "test-token", "role": "write"}
        auth = {"type": "access_token", "accessToken": token}
        user = {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User"}
        self._send_json({**user, "orgs": [], "auth": auth})

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("private") or payload.get("visibility") == "private"
        url = self._repo_url(repo_type, repo_id)
        if not self.storage.create_repo(repo_id, repo_type=repo_type, private=private):
            msg = f"You already created this {repo_type} repo"
            raise HubError(409, msg, headers={"X-Repo-Url": url})
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})  # no YAML parser in the stdlib

    def _repo_info(self, repo_type: str, repo_id: str, rev: str = "main") -> None:
        state = self.storage.load(repo_id, repo_type)
        sha = self.storage.resolve(state, rev)
        siblings = []
        for path, entry in sorted(state["commits"][sha]["files"].items()):
            sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
            if lfs := _file_info(path, entry).get("lfs"):
                sibling["lfs"] = {"sha256": lfs.pop("oid"), **lfs}
            siblings.append(sibling)
        info = {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": state["private"],
            "gated": False,
            "disabled": False,
            "createdAt": state["createdAt"],
            "lastModified": state["commits"][sha]["date"],
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        self._send_json(info)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        heads = self.storage.branches(repo_id, repo_type=repo_type)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(heads.items())
        ]
        refs = {"branches": branches, "converts": [], "tags": [], "pullRequests": []}
        self._send_json(refs)

    def _commits(self, repo_type: str, repo_id: str, rev: str) -> None:
        commits = self.storage.commits(repo_id, rev, repo_type=repo_type)
        self._send_json([{**c, "authors": [{"user": USER}]} for c in commits])

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        start = self._json_body().get("startingPoint") or "main"
        self.storage.create_branch(repo_id, branch, start, repo_type=repo_type)
        self._send_json({})

    # ----- uploads --------------------------------------------------------------------
    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        files = self._files(repo_type, repo_id, rev)
        rules = ""
        if gitattributes := files.get(".gitattributes"):
            rules = self.storage.blob_path(gitattributes["sha256"]).read_text()
        answer = []
        for file in self._json_body()["files"]:
            path, sample = file["path"], base64.b64decode(file["sample"])
            mode = "lfs" if _is_lfs(rules, path, file["size"], sample) else "regular"
            # The client leaves out files whose oid it computes identically (sha256
            # for LFS files, git blob id for the others): they did not change.
            oid = (e := files.get(path)) and (e["sha256"] if e["lfs"] else e["oid"])
            answer.append({"path": path, "uploadMode": mode, "oid": oid})
            answer[-1]["shouldIgnore"] = False  # .gitignore files are not supported
        self._send_json({"files": answer})

    def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "The Hub double does not support pull requests")
        header: dict[str, Any] = {}
        operations: list[dict[str, Any]] = []
        for line in filter(None, map(bytes.strip, self.body.splitlines())):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                # parentCommit is not checked: a 412 makes datasets retry for minutes.
                header = value
            elif key == "file":
                content = base64.b64decode(value["content"])
                operations.append({"path": value["path"], "content": content})
            elif key == "lfsFile":
                lfs = {"lfs_oid": value["oid"], "size": value["size"]}
                operations.append({"path": value["path"], **lfs})
            elif key in ("deletedFile", "deletedFolder"):
                kind = "delete" if key == "deletedFile" else "delete_folder"
                operations.append({kind: value["path"]})
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        sha = self.storage.commit(
            repo_id,
            operations,
            header.get("summary", ""),
            header.get("description", ""),
            branch=rev.removeprefix("refs/heads/"),
            repo_type=repo_type,
        )
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{sha}"
        answer = {"success": True, "commitOid": sha, "commitUrl": url}
        self._send_json(answer | {"pullRequestUrl": None})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self.storage.load(repo_id, repo_type)  # 404 if the repo does not exist
        request = self._json_body()
        objects = []
        for obj in request["objects"]:
            oid, size = obj["oid"], obj["size"]
            action = {"href": f"{self.server.endpoint}/lfs-objects/{oid}", "header": {}}
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            blob = self.storage.blob_path(oid)
            if request.get("operation") == "download":
                answer["actions"] = {"download": action}
            elif not (blob.exists() and blob.stat().st_size == size):
                answer["actions"] = {"upload": action}  # no actions: already uploaded
            objects.append(answer)
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        self._send_json(answer)

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"The uploaded content does not have sha256 {oid}")
        self.storage.put_blob(self.body)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_get(self, oid: str) -> None:
        blob = self.storage.blob_path(oid)
        if not blob.exists():
            raise HubError(404, f"LFS object {oid} not found")
        self._send(200, blob.read_bytes(), {})

    # ----- listings and downloads -----------------------------------------------------
    def _tree(self, repo_type: str, repo_id: str, rev: str, path: str = "") -> None:
        files = self._files(repo_type, repo_id, rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries = _tree(files, path.strip("/"), recursive)
        if path.strip("/") and not entries:
            raise HubError(404, f"{path} is not a folder on {rev}", "EntryNotFound")
        self._send_json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        files = self._files(repo_type, repo_id, rev)
        if "json" in self.headers.get("Content-Type", ""):
            paths = self._json_body().get("paths", [])
        else:  # huggingface_hub sends a form
            paths = parse_qs(self.body.decode()).get("paths", [])
        answer = []
        for path in (p.strip("/") for p in paths):
            if path in files:
                answer.append(_file_info(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                answer.append(_folder_info(path, files))
        self._send_json(answer)

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        state = self.storage.load(repo_id, repo_type)
        sha = self.storage.resolve(state, rev)
        entry = state["commits"][sha]["files"].get(path)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        # The ETag is the git blob id, or the sha256 for an LFS file, which the Hub
        # redirects to a CDN while naming the target in the X-Linked-* headers.
        headers["ETag"] = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        if entry["lfs"]:
            headers["X-Linked-Etag"] = headers["ETag"]
            headers["X-Linked-Size"] = str(entry["size"])
        data = self.storage.blob_path(entry["sha256"]).read_bytes()
        size = len(data)
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if byte_range is None or byte_range.groups() == ("", ""):
            self._send(200, data, headers)
            return
        first, last = byte_range.groups()
        if not first:  # "bytes=-N": the last N bytes
            first, last = str(max(size - int(last), 0)), ""
        start, end = int(first), min(int(last or size - 1), size - 1)
        if start > end:
            self._send(416, b"", headers | {"Content-Range": f"bytes */{size}"})
            return
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(206, data[start : end + 1], headers)


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, storage: HubStorage) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.storage = storage
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serve_hub(root: Path) -> Iterator[str]:
    """Serve a fake Hub keeping its data under ``root``; yield its endpoint URL."""
    server = _HubServer(HubStorage(root))
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield server.endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def hub_client_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """A copy of ``os.environ`` pointing a subprocess's Hub clients at ``endpoint``."""
    env = dict(os.environ)
    for key in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_DATASETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
        "HF_STORED_TOKENS_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        env.pop(key, None)
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy")
    no_proxy = ",".join(filter(None, [no_proxy, "127.0.0.1,localhost"]))
    env |= {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_dummytokenforthelocaltesthub",
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_XET": "1",  # LFS uploads would go through Xet otherwise
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # datasets would ping an S3 bucket otherwise
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    return env

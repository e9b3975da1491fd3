"""A hub-compatible HTTP server for tests: the real `huggingface_hub` client talks to it.

It implements the small part of the hub's HTTP surface that huggingface_hub 2.x and
transformers 5.x use (see ../shared/reference/hub-http.md): repo creation, preupload, NDJSON
commits with inline base64 files ("regular" upload mode, never LFS/Xet), repo info, the file
tree, and `resolve` downloads. Storage is in memory; every commit is applied atomically (a commit
that fails leaves the branch where it was), which is what makes "retry after the problem is
fixed" testable.

Access control, like the hub: a public repo is readable by anyone; a private one only with a
token of its owner (or one granted access). Reading a private repo without a token (or with an
invalid one) answers 401; with a valid token of someone else, 404 RepoNotFound, as the hub does
so as not to reveal the repo; writing where the token has no rights answers 403. A repository
that does not exist is 404 with `X-Error-Code: RepoNotFound`.

Use the `hub` fixture: it starts the server on a free 127.0.0.1 port and points huggingface_hub
at it (HF_ENDPOINT, a throwaway HF_HOME, telemetry off, a dummy token for user "alice").
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKENS = {"hf_alice_token": "alice", "hf_bob_token": "bob"}  # token -> user name
ALICE_TOKEN = "hf_alice_token"
BOB_TOKEN = "hf_bob_token"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the hub returns as the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool = False
    readers: set[str] = field(default_factory=set)  # extra users granted access
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def can_read(self, user: str | None) -> bool:
        return not self.private or user == self.owner or user in self.readers

    def can_write(self, user: str | None) -> bool:
        return user == self.owner

    def resolve(self, rev: str) -> str | None:
        """Branch name or full commit sha -> commit sha."""
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class HubState:
    """Everything the server knows; tests may inspect or tweak it (e.g. `fail_commits`)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for assertions
        self.fail_commits = 0  # > 0: the next N commits answer 500 and change nothing

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False, owner: str | None = None) -> str:
        """Create a repo holding `files` in one commit on main; return the commit sha."""
        owner = owner or repo_id.split("/")[0]
        repo = self.repos.setdefault(repo_id, Repo(repo_id, owner, private))
        return self.commit(repo, "main", {p: b for p, b in files.items()}, [], "initial commit")

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], deleted: list[str], summary: str) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent]) if parent else {}
            for path in deleted:
                tree.pop(path, None)
                for p in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                    tree.pop(p)
            tree.update(files)
            sha = hashlib.sha1(f"{repo.repo_id}{time.time_ns()}{summary}{len(repo.commits)}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.messages[sha] = summary
            repo.branches[branch] = sha
            return sha


class HubHandler(BaseHTTPRequestHandler):
    """One request. Routes are matched by hand: the surface is small."""

    server_version = "gqa-convert-test-hub/1.0"
    state: HubState  # set on the subclass built by HubServer

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # ---- helpers -------------------------------------------------------------------------
    @property
    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return TOKENS.get(auth[7:].strip()) if auth.startswith("Bearer ") else None

    @property
    def has_token(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status: int, code: str | None, message: str) -> None:
        self.send(
            status,
            {"error": message},
            {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message},
        )

    def repo_for(self, repo_id: str, write: bool = False) -> Repo | None:
        """The repo if this request may see it (and write to it); else answer the error."""
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self.error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if not repo.can_read(self.user) or (write and not repo.can_write(self.user)):
            if not self.has_token:
                self.error(401, None, "Unauthorized: this repository requires authentication")
            elif self.user is None:
                self.error(401, None, "Invalid credentials in Authorization header")
            elif not repo.can_read(self.user):  # like the hub: a private repo is not revealed to others
                self.error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            else:
                self.error(403, None, f"You don't have write access to {repo_id}")
            return None
        return repo

    # ---- routing -------------------------------------------------------------------------
    def route(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        self.state.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        m = self.command
        if m == "POST" and path == "/api/repos/create":
            return self.create_repo()
        if m == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml()
        if m == "GET" and path == "/api/whoami-v2":
            if self.user is None:
                return self.error(401, None, "Invalid credentials in Authorization header")
            return self.send(200, {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and m == "GET":
                return self.model_info(repo_id, "main")
            if rest and rest[0] == "revision" and m == "GET":
                return self.model_info(repo_id, "/".join(rest[1:]))
            if rest and rest[0] == "tree" and m == "GET":
                return self.tree(repo_id, rest[1] if len(rest) > 1 else "main", "/".join(rest[2:]), query)
            if rest and rest[0] == "preupload" and m == "POST":
                return self.preupload(repo_id)
            if rest and rest[0] == "commit" and m == "POST":
                return self.commit(repo_id, "/".join(rest[1:]))
            if rest and rest[0] == "branch" and m == "POST":
                return self.create_branch(repo_id, "/".join(rest[1:]))
        if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self.error(404, None, f"no route for {m} {path} in the test hub")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = lambda self: self.route()  # noqa: E731

    # ---- endpoints -----------------------------------------------------------------------
    def create_repo(self) -> None:
        req = json.loads(self.body() or b"{}")
        if self.user is None:
            return self.error(401, None, "Invalid credentials in Authorization header")
        if req.get("type", "model") not in ("model", None):
            return self.error(400, None, "the test hub only holds model repos")
        ns = req.get("organization") or self.user
        if ns != self.user:
            return self.error(403, None, f"You don't have the rights to create a repo under {ns}")
        repo_id = f"{ns}/{req['name']}"
        url = f"http://{self.headers.get('Host')}/{repo_id}"
        if repo_id in self.state.repos:
            return self.send(409, {"error": "You already created this model repo", "url": url})
        private = bool(req.get("private")) or req.get("visibility") == "private"  # 1.x sent private, 2.x visibility
        repo = Repo(repo_id, self.user, private)
        self.state.repos[repo_id] = repo
        self.state.commit(
            repo,
            "main",
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            [],
            "initial commit",
        )
        self.send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        """Parse the card's YAML front matter like the hub: a mapping, known value types."""
        req = json.loads(self.body() or b"{}")
        errors = []
        content = req.get("content", "")
        if content.lstrip().startswith("---"):  # a whole card: validate its front matter
            content = content.lstrip()[3:].split("\n---", 1)[0]
        try:
            meta = yaml.safe_load(content) or {}
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
            else:
                for key in ("tags", "datasets", "language"):
                    if key in meta and not isinstance(meta[key], (list, str)):
                        errors.append({"message": f'"{key}" must be a string or a list of strings'})
                if "model-index" in meta and not isinstance(meta["model-index"], list):
                    errors.append({"message": '"model-index" must be a list'})
        except yaml.YAMLError as err:
            errors.append({"message": f"invalid YAML: {err}"})
        if errors:
            return self.send(400, {"error": errors[0]["message"], "errors": errors, "warnings": []})
        self.send(200, {"errors": [], "warnings": []})

    def model_info(self, repo_id: str, rev: str) -> None:
        repo = self.repo_for(repo_id)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        self.send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def tree(self, repo_id: str, rev: str, prefix: str, query: dict) -> None:
        repo = self.repo_for(repo_id)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for p, data in sorted(repo.commits[sha].items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1 :] if prefix else p
            if "/" in rel and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                continue
            out.append({"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)})
        out += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
        if prefix and not out:
            return self.error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        self.send(200, out)

    def preupload(self, repo_id: str) -> None:
        req = json.loads(self.body() or b"{}")
        if self.repo_for(repo_id, write=True) is None:
            return
        # "regular" for every file: "lfs" would make huggingface_hub 2.x switch to Xet transfers.
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in req.get("files", [])]
        self.send(200, {"files": files})

    def commit(self, repo_id: str, rev: str) -> None:
        raw = self.body()
        repo = self.repo_for(repo_id, write=True)
        if repo is None:
            return
        if rev not in repo.branches:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if self.state.fail_commits > 0:  # simulated server failure: nothing is applied
            self.state.fail_commits -= 1
            return self.error(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
        files, deleted, summary = {}, [], ""
        for line in raw.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[rev]:
                    return self.error(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    return self.error(400, None, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self.error(400, None, f"the test hub does not support '{key}' operations")
        sha = self.state.commit(repo, rev, files, deleted, summary)
        host = self.headers.get("Host")
        self.send(
            200,
            {
                "commitUrl": f"http://{host}/{repo_id}/commit/{sha}",
                "commitOid": sha,
                "commitMessage": summary,
                "pullRequestUrl": None,
            },
        )

    def create_branch(self, repo_id: str, branch: str) -> None:
        req = json.loads(self.body() or b"{}")
        repo = self.repo_for(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self.send(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        start = repo.resolve(req.get("startingPoint") or "main")
        if start is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {req.get('startingPoint')}")
        repo.branches[branch] = start
        self.send(200, {})

    def resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self.repo_for(repo_id)
        if repo is None:
            return
        sha = repo.resolve(unquote(rev))
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        data = repo.commits[sha].get(path)
        if data is None:
            return self.error(
                404,
                "EntryNotFound",
                f"{path} does not exist on {rev}",
            )
        etag = git_blob_sha(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.send(206, headers=headers, raw=data[start:])
        self.send(200, headers=headers, raw=data)


class HubServer:
    """The server on a free 127.0.0.1 port, served from a daemon thread."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=lambda: self.httpd.serve_forever(poll_interval=0.05), daemon=True)
        self.running = False

    def start(self) -> "HubServer":
        self.thread.start()
        self.running = True
        return self

    def stop(self) -> None:
        """Shut down and close the socket: afterwards the endpoint refuses connections."""
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False

    def restart(self) -> None:
        """Serve again on the same port with the same state (after `stop`)."""
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        port = int(self.endpoint.rsplit(":", 1)[1])
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=lambda: self.httpd.serve_forever(poll_interval=0.05), daemon=True)
        self.start()

    # Convenience for tests.
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, private: bool = False) -> str:
        """Seed a repo from a dict or from every file under a folder."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        return self.state.add_repo(repo_id, files, private=private)


def point_hub_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, token: str | None) -> None:
    """Point huggingface_hub (already imported: constants are read at import) at `endpoint`."""
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN_PATH": str(home / "token"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub(tmp_path_factory, monkeypatch) -> HubServer:
    """A running test hub, with huggingface_hub pointed at it and alice's token in HF_TOKEN."""
    server = HubServer().start()
    point_hub_client(monkeypatch, server.endpoint, tmp_path_factory.mktemp("hf_home"), ALICE_TOKEN)
    yield server
    server.stop()


# ---- stories260K folders ready to publish (shared by the verify, card and push tests) ----------

# An explicit law for tests, independent of the shipped coefficients: a smooth form whose loss
# falls with n_h and n_kv (so fewer KV heads predict a higher loss), E = 1.0 nats.
TEST_LAW = """\
format: gqa-convert-law/1
form: smooth
E: 1.0
reference_params: 1.0e9
log_A: {"1": 0.0, "x": -0.05, "y": -0.02}
b: {"1": 0.3}
provenance: test law of tests/hubserver.py (not fitted)
"""


@pytest.fixture(scope="session")
def law_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("law") / "law.yaml"
    path.write_text(TEST_LAW)
    return path


def _converted_and_verified(stories_hf, val_text, law_file, folder: Path, kv_heads: int) -> Path:
    from gqa_convert.convert import convert_checkpoint
    from gqa_convert.verify import verify_model

    convert_checkpoint(stories_hf, folder, kv_heads, progress=False)
    verify_model(folder, str(stories_hf), val_text, 512, law_path=law_file, documents=40, retrieval=False)
    return folder


@pytest.fixture(scope="session")
def stories_kv2(stories_hf, val_text, law_file, tmp_path_factory) -> Path:
    """stories260K mean-pooled 4 -> 2 KV heads, not uptrained, verified (it FAILS: loss ~4.4)."""
    return _converted_and_verified(
        stories_hf, val_text, law_file, tmp_path_factory.mktemp("kv2") / "stories260K-kv2", 2
    )


@pytest.fixture(scope="session")
def stories_kv4_verified(stories_hf, val_text, law_file, tmp_path_factory) -> Path:
    """stories260K converted 4 -> 4 KV heads (identity): verification PASSES (delta 0, same loss)."""
    return _converted_and_verified(
        stories_hf, val_text, law_file, tmp_path_factory.mktemp("kv4") / "stories260K-kv4", 4
    )

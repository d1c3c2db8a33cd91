"""A small in-memory Hugging Face Hub speaking the HTTP API that huggingface_hub's upload path uses.

Tests point the real `huggingface_hub` client at it (HF_ENDPOINT) so that `d2merge push` is checked
against the wire protocol rather than against a mock of our own code. It serves the plain (non-Xet)
path only: repo creation, branch creation, README metadata validation, the preupload check, the
git-LFS batch API with single-part PUT uploads and a verify step, the NDJSON commit call, and the
agent-harness registry that the client's user-agent code fetches on its own.
It never advertises Xet (no X-Xet-* headers, LFS transfer "basic").

The server is bounded so that a misbehaving client cannot hang a test run: it answers at most
`max_requests` requests (then 400s), each connection has a socket timeout, and a watchdog shuts
it down after `lifetime_s`. Every request is recorded, including refused ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# File types the Hub's default .gitattributes stores in LFS; anything else goes inline unless large.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack", ".model")
_LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request exactly as the server received it (path already split from its query)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Commit:
    """A commit the server accepted: where it landed and what it carried."""

    repo_id: str
    revision: str  # the branch asked for (the PR's base when create_pr)
    ref: str  # the ref actually written: the branch, or refs/pr/N
    summary: str
    description: str
    files: dict[str, bytes]  # path in repo -> content, regular and LFS files alike
    lfs_paths: frozenset[str]
    create_pr: bool
    oid: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    visibility: str | None  # as sent by the client: "private", "public" or None (Hub default)
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    pr_count: int = 0


@dataclass
class _Failure:
    status: int
    message: str
    echo_token: bool


class _Stop(Exception):
    """Raised inside a handler to send an error response."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class FakeHub:
    """The server and the state it accumulates; use as a context manager or start()/stop()."""

    def __init__(self, *, token: str | None = None, max_requests: int = 200, lifetime_s: float = 60.0,
                 socket_timeout_s: float = 10.0):
        self.token = token  # when set, every /api and LFS batch request must carry "Bearer <token>"
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.socket_timeout_s = socket_timeout_s
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content
        self._failures: dict[str, _Failure] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub
            timeout = hub.socket_timeout_s

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port chosen by the OS
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.lifetime_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def _expire(self) -> None:
        """Lifetime over: stop serving and close the socket, so that clients get refused, not hung."""
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------------

    def fail(self, route: str, status: int, message: str = "injected failure", *, echo_token: bool = False) -> None:
        """Make every call to `route` (see `_ROUTES`) answer `status`; echo_token puts the caller's
        Authorization header in the error body, as a careless proxy might."""
        if route not in _ROUTE_NAMES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(_ROUTE_NAMES)}")
        self._failures[route] = _Failure(status, message, echo_token)

    def routes_called(self) -> list[str]:
        """Route names of the recorded requests, in order (unknown paths as 'unknown')."""
        return [_match(r.method, r.path)[0] for r in self.requests]

    # -- request handling (called from server threads) -------------------------------------------

    def _handle(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(request)
            if len(self.requests) > self.max_requests:
                return _error(400, f"fake hub: request cap of {self.max_requests} reached")
            route, params = _match(request.method, request.path)
            try:
                if route == "unknown":
                    raise _Stop(404, f"fake hub does not serve {request.method} {request.path}")
                failure = self._failures.get(route)
                if failure is not None:
                    message = failure.message
                    if failure.echo_token:
                        message += f" (got Authorization: {request.headers.get('authorization')})"
                    raise _Stop(failure.status, message)
                if route not in _PUBLIC_ROUTES and self.token is not None:
                    if request.headers.get("authorization") != f"Bearer {self.token}":
                        raise _Stop(401, "Invalid credentials in Authorization header")
                payload = getattr(self, f"_route_{route}")(request, **params)
            except _StopWithBody as stop:
                return stop.status, {"Content-Type": "application/json"}, json.dumps(stop.body).encode()
            except _Stop as stop:
                return _error(stop.status, stop.message, stop.error_code)
        return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _Stop(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _ref(self, repo: Repo, revision: str) -> dict[str, bytes]:
        if revision not in repo.refs:
            raise _Stop(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.refs[revision]

    def _route_agent_harnesses(self, request: RecordedRequest) -> dict[str, Any]:
        # huggingface_hub fetches this registry (unauthenticated, once a day per HF_HOME) to tag its
        # user-agent when run by an AI agent; an empty one means "no agent detected".
        return {"standardEnvVars": [], "harnesses": {}}

    def _route_create_repo(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.json()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            # The real Hub answers 409 *with* the url; create_repo(exist_ok=True) reads it.
            raise _StopWithBody(409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = Repo(repo_id, body.get("type") or "model", body.get("visibility"))
        return {"url": url, "name": repo_id}

    def _route_repo_info(self, request: RecordedRequest, repo_id: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        return {"id": repo_id, "private": repo.visibility == "private", "sha": repo.heads["main"]}

    def _route_revision_info(self, request: RecordedRequest, repo_id: str, revision: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        self._ref(repo, revision)
        return {"id": repo_id, "private": repo.visibility == "private", "sha": repo.heads[revision]}

    def _route_create_branch(self, request: RecordedRequest, repo_id: str, branch: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if branch in repo.refs:
            raise _Stop(409, f"Reference already exists: {branch}")
        start = request.json().get("startingPoint") or "main"
        repo.refs[branch] = dict(self._ref(repo, start))
        repo.heads[branch] = repo.heads[start]
        return {}

    def _route_validate_yaml(self, request: RecordedRequest) -> dict[str, Any]:
        return {"errors": [], "warnings": []}

    def _route_preupload(self, request: RecordedRequest, repo_id: str, revision: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        existing = self._ref(repo, revision)
        files = []
        for item in request.json()["files"]:
            lfs = item["path"].endswith(_LFS_SUFFIXES) or item["size"] >= _LFS_MIN_SIZE
            current = existing.get(item["path"])
            # The Hub reports the current oid so that the client can drop unchanged files.
            oid = None if current is None else (hashlib.sha256(current).hexdigest() if lfs else _git_blob_oid(current))
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": repo.heads[revision]}

    def _route_lfs_batch(self, request: RecordedRequest, repo_id: str) -> dict[str, Any]:
        self._repo(repo_id)
        body = request.json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", []):
            raise _Stop(400, "fake hub only supports basic LFS uploads")
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # no actions: the client skips objects we already hold
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/_lfs/verify/{repo_id}", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _route_lfs_upload(self, request: RecordedRequest, oid: str) -> dict[str, Any]:
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise _Stop(400, f"uploaded content does not match oid {oid}")
        self.lfs_objects[oid] = request.body
        return {}

    def _route_lfs_verify(self, request: RecordedRequest, repo_id: str) -> dict[str, Any]:
        body = request.json()
        stored = self.lfs_objects.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            raise _Stop(404, f"LFS object {body['oid']} not found")
        return {}

    def _route_commit(self, request: RecordedRequest, repo_id: str, revision: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if request.headers.get("content-type") != "application/x-ndjson":
            raise _Stop(400, "commit body must be application/x-ndjson")
        create_pr = request.query.get("create_pr") == ["1"]
        base = dict(self._ref(repo, revision))
        header: dict[str, Any] | None = None
        files: dict[str, bytes] = {}
        lfs_paths: set[str] = set()
        for line in request.body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _Stop(400, f"unsupported encoding for {value['path']}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None or value.get("algo") != "sha256" or len(content) != value.get("size", len(content)):
                    raise _Stop(400, f"LFS object for {value['path']} was never uploaded")
                files[value["path"]] = content
                lfs_paths.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                base.pop(value["path"], None)
            else:
                raise _Stop(400, f"unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise _Stop(400, "commit header with a summary is required")
        oid = hashlib.sha1(request.body).hexdigest()
        if create_pr:
            repo.pr_count += 1
            ref = f"refs/pr/{repo.pr_count}"
        else:
            ref = revision
        repo.refs[ref] = {**base, **files}
        repo.heads[ref] = oid
        self.commits.append(Commit(repo_id, revision, ref, header["summary"], header.get("description", ""),
                                   files, frozenset(lfs_paths), create_pr, oid))
        answer: dict[str, Any] = {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{repo.pr_count}"
        return answer


class _StopWithBody(_Stop):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(status, body["error"])
        self.body = body


def _error(status: int, message: str, error_code: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if error_code:
        headers["X-Error-Code"] = error_code
    # Both shapes the Hub uses: {"error": ...} and, for validation endpoints, {"errors": [{"message": ...}]}.
    return status, headers, json.dumps({"error": message, "errors": [{"message": message}]}).encode()


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_SEGMENT = r"[^/]+"
# (route name, method, path regex); matched against the still-quoted path so that a revision like
# "feature%2Fx" stays one segment, then each group is unquoted.
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("agent_harnesses", "GET", re.compile(r"/api/agent-harnesses")),
    ("create_repo", "POST", re.compile(r"/api/repos/create")),
    ("validate_yaml", "POST", re.compile(r"/api/validate-yaml")),
    ("preupload", "POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<revision>{_SEGMENT})")),
    ("commit", "POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<revision>{_SEGMENT})")),
    ("create_branch", "POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>{_SEGMENT})")),
    ("revision_info", "GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<revision>{_SEGMENT})")),
    ("repo_info", "GET", re.compile(rf"/api/models/{_REPO}")),
    ("lfs_batch", "POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch")),
    ("lfs_upload", "PUT", re.compile(r"/_lfs/upload/(?P<oid>[0-9a-f]{64})")),
    ("lfs_verify", "POST", re.compile(rf"/_lfs/verify/{_REPO}")),
]
_ROUTE_NAMES = {name for name, _, _ in _ROUTES}
# The LFS upload URL is pre-signed (S3 in production); the harness registry is public telemetry.
_PUBLIC_ROUTES = {"lfs_upload", "agent_harnesses"}


def _match(method: str, raw_path: str) -> tuple[str, dict[str, str]]:
    for name, route_method, pattern in _ROUTES:
        found = pattern.fullmatch(raw_path)
        if found and method == route_method:
            return name, {key: unquote(value) for key, value in found.groupdict().items()}
    return "unknown", {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # lets the client send chunked bodies; we still close after each answer
    fake_hub: FakeHub

    def _serve(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        request = RecordedRequest(self.command, split.path, parse_qs(split.query),
                                  {k.lower(): v for k, v in self.headers.items()}, body)
        status, headers, payload = self.fake_hub._handle(request)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests are the log; keep pytest output clean

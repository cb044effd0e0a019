"""A Hub-compatible HTTP server on 127.0.0.1 for the tests: the part of the Hugging Face Hub API that
`huggingface_hub` 2.x calls to create a repo, commit files and download them.

Implemented, as the real client sends them (read from `huggingface_hub/hf_api.py`, `_commit_api.py`,
`file_download.py` and `_snapshot_download.py`):
- `POST /api/repos/create`                      {"name", "organization", "private"|"visibility"} -> {"url"}
- `POST /api/validate-yaml`                     a README's YAML front matter -> {"errors", "warnings"}
- `GET  /api/models/{repo}[/revision/{rev}]`    repo info: "sha" and "siblings"
- `POST /api/models/{repo}/preupload/{rev}`     every file is uploaded "regular" (inline in the commit)
- `POST /api/models/{repo}/commit/{rev}`        the NDJSON commit: header, then "file" lines (base64),
                                                "deletedFile"/"deletedFolder"; one commit, all or nothing
- `GET  /api/models/{repo}/tree/{rev}[/{path}]` file listing (snapshot_download)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`       with ETag (git blob sha1), X-Repo-Commit, Content-Length;
                                                404s carry X-Error-Code (RepoNotFound, RevisionNotFound,
                                                EntryNotFound) as the Hub does, so the client raises its own errors.

Auth as on the Hub: a wrong bearer token gets 401 "Invalid credentials in Authorization header"; writing needs a
valid token; a private repo is invisible (401 RepoNotFound) without one. Failures are injected with `fail()` and
a broken repo is made with `remove_file()`. Every handler does bounded work, sockets time out, and `stop()` ends
the server thread.
"""

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

BAD_CREDENTIALS = "Invalid credentials in Authorization header"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
ROUTES = [  # (method, endpoint name, pattern)
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate", re.compile(r"^/api/validate-yaml$")),
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
    ("GET", "info", re.compile(rf"^/api/models/{REPO}(?:/revision/{REV})?$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{REPO}/preupload/{REV}$")),
    ("POST", "commit", re.compile(rf"^/api/models/{REPO}/commit/{REV}$")),
    ("GET", "tree", re.compile(rf"^/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?$")),
    ("HEAD", "resolve", re.compile(rf"^/{REPO}/resolve/{REV}/(?P<path>.+)$")),
    ("GET", "resolve", re.compile(rf"^/{REPO}/resolve/{REV}/(?P<path>.+)$")),
]
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
MAX_BODY = 64 * 2**20


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit(self, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1(f"{self.repo_id}\n{len(self.commits)}\n{message}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        self.commits.append(Commit(digest.hexdigest(), message, dict(files)))
        return self.head

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Fault:
    endpoint: str
    status: int
    path: str | None  # only requests for this file (resolve) or this repo
    times: int


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class HubServer:
    """`with HubServer(tokens={"tok": "alice"}) as hub: ...`; `hub.url` is the endpoint for `HF_ENDPOINT`."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # Life cycle

    def start(self) -> "HubServer":
        handler = type("Handler", (HubRequestHandler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    # Test controls

    def fail(self, endpoint: str, status: int = 500, *, path: str | None = None, times: int = 1) -> None:
        """Answer the next `times` requests to `endpoint` ("create", "preupload", "commit", "resolve", ...) with
        `status`; `path` narrows it to one file (resolve) or one repo."""
        with self.lock:
            self.faults.append(Fault(endpoint, status, path, times))

    def remove_file(self, repo_id: str, path: str) -> None:
        """A new commit without `path`: a repo that lost a file."""
        with self.lock:
            repo = self.repos[repo_id]
            files = dict(repo.head.files)
            del files[path]
            repo.commit(f"Delete {path}", files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo_id].at(revision).files)

    def commits(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return list(self.repos[repo_id].commits)

    # Request handling (called with the request already parsed; returns status, headers, body)

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict, bytes]:
        routes = ((name, pattern.match(path)) for verb, name, pattern in ROUTES if verb == method)
        endpoint, match = next(((name, match) for name, match in routes if match), (None, None))
        if match is None:
            return 404, {}, json.dumps({"error": f"No route for {method} {path}"}).encode()
        params = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
        try:
            with self.lock:
                user = self._authenticate(headers)
                self._inject_fault(endpoint, params)
                return getattr(self, f"_{endpoint}")(method, params, query, user, body)
        except HubError as error:
            response_headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                response_headers["X-Error-Code"] = error.code
            return error.status, response_headers, json.dumps({"error": error.message, **error.extra}).encode()

    def _authenticate(self, headers) -> str | None:
        authorization = headers.get("Authorization")
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, BAD_CREDENTIALS)
        return self.tokens[token]

    def _inject_fault(self, endpoint: str, params: dict) -> None:
        for fault in self.faults:
            targets = (None, params.get("path"), params.get("repo"))
            if fault.endpoint == endpoint and fault.times > 0 and fault.path in targets:
                fault.times -= 1
                raise HubError(fault.status, "Internal Error - We're working hard to fix this as soon as possible!")

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _write_access(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        return self._repo(repo_id, user)

    # Endpoints

    def _create(self, method, params, query, user, body):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server only hosts model repos")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = self.repos[repo_id] = Repo(repo_id, private)
        repo.commit("initial commit", {".gitattributes": GITATTRIBUTES})
        return 200, {}, json.dumps({"url": url, "name": repo_id, "id": repo_id}).encode()

    def _validate(self, method, params, query, user, body):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        status = 400 if errors else 200
        return status, {}, json.dumps({"errors": errors, "warnings": []}).encode()

    def _whoami(self, method, params, query, user, body):
        if user is None:
            raise HubError(401, BAD_CREDENTIALS)
        return 200, {}, json.dumps({"type": "user", "name": user, "orgs": []}).encode()

    def _info(self, method, params, query, user, body):
        repo = self._repo(params["repo"], user)
        commit = self._revision(repo, params.get("rev") or "main")
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        return 200, {}, json.dumps(info).encode()

    def _preupload(self, method, params, query, user, body):
        repo = self._write_access(params["repo"], user)
        commit = self._revision(repo, params["rev"])
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # small files go inline in the commit, as the Hub allows
                "shouldIgnore": False,
                "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None,
            }
            for f in json.loads(body)["files"]
        ]
        return 200, {}, json.dumps({"files": files, "commitOid": commit.oid}).encode()

    def _commit(self, method, params, query, user, body):
        repo = self._write_access(params["repo"], user)
        if query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this server")
        parent = self._revision(repo, params["rev"])
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "A commit has happened since the parent commit")
        files = dict(parent.files)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {value['path']}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"File not found: {value['path']}", "EntryNotFound")
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unsupported commit operation {line['key']!r} (only regular files)")
        commit = repo.commit(header.get("summary", ""), files)
        answer = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }
        return 200, {}, json.dumps(answer).encode()

    def _tree(self, method, params, query, user, body):
        repo = self._repo(params["repo"], user)
        commit = self._revision(repo, params["rev"])
        prefix = (params.get("path") or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(filter(None, [prefix, *parts[:depth]]))
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    oid = git_blob_sha1(folder.encode())
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                content = commit.files[path]
                entries.append({"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path})
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {params['rev']}", "EntryNotFound")
        return 200, {}, json.dumps(entries).encode()

    def _resolve(self, method, params, query, user, body):
        repo = self._repo(params["repo"], user)
        commit = self._revision(repo, params["rev"])
        content = commit.files.get(params["path"])
        if content is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, content


class HubRequestHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
    timeout = 10  # an idle or stalled connection is dropped, never waited on forever

    def _serve(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        status, headers, content = self.hub.handle(self.command, split.path, parse_qs(split.query), self.headers, body)
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path, status))
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while sum(map(len, chunks)) <= MAX_BODY:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(length, MAX_BODY)) if length else b""

    do_GET = do_HEAD = do_POST = _serve

    def log_message(self, format, *args):  # the request log is `hub.requests`
        pass

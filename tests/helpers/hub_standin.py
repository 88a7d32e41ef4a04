"""A stand-in for the Hugging Face Hub endpoints that huggingface_hub calls to create a repo and a
branch, commit files, read a branch's last commit and download a file, served on 127.0.0.1 for the
tests (clients reach it through HF_ENDPOINT). It keeps repos in memory, records every request (method, path, Authorization header)
and can answer the next N requests of a kind (create, preupload, commit, resolve, lfs-upload) with a 503.

Binary files take the Hub's LFS path: the preupload answers `lfs` for them, the client asks the LFS
batch endpoint where to put each object, PUTs it there (basic transfer), verifies it, and the commit
names it by sha256 (`lfsFile`); a binary sent inline is refused, as the Hub refuses it. It does not
speak Xet (hf_xet's storage protocol), so clients push to it with HF_HUB_DISABLE_XET=1: the path
huggingface_hub takes where hf_xet is not installed."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

SECRET = "hf_standin_secret_7f3a9c"  # a token value the tests look for everywhere afterwards (in files and logs)
# the LFS patterns of the .gitattributes the Hub writes into a new model repo
LFS_PATTERNS = re.compile(r".*\.(7z|arrow|bin|bz2|ckpt|ftz|gz|h5|joblib|mlmodel|model|msgpack|npy|npz|onnx|ot|"
                          r"parquet|pb|pickle|pkl|pt|pth|rar|safetensors|tar|tflite|tgz|wasm|xz|zip|zst)$|.*tfevents.*")


@dataclass
class Commit:
    oid: str
    message: str
    description: str
    files: dict[str, bytes]  # every file of the branch after this commit
    added: list[str]  # the paths this commit wrote
    lfs: list[str] = field(default_factory=list)  # those of them it named as LFS objects


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})

    def files(self, branch: str) -> dict[str, bytes]:
        commits = self.branches[branch]
        return dict(commits[-1].files) if commits else {}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_binary(sample: bytes) -> bool:
    """A NUL byte or bytes that are not UTF-8 (a character cut by the sample's end is still text)."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start < len(sample) - 3
    return b"\0" in sample


def takes_lfs(path: str, sample: bytes) -> bool:
    """What the Hub's preupload decides: LFS for a path its .gitattributes track, or a binary file."""
    return bool(LFS_PATTERNS.fullmatch(path.rsplit("/", 1)[-1])) or is_binary(sample)


def oid(path: str, data: bytes) -> str:
    """A file's id as the preupload reports it: the LFS object's sha256, a regular file's git blob sha1."""
    return hashlib.sha256(data).hexdigest() if takes_lfs(path, data[:512]) else git_blob_sha1(data)


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, as uploaded through the batch's href
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail: dict[str, int] = {}  # kind of request -> how many upcoming ones get a 503
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: bytes | dict = b"", headers: dict | None = None):
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding") == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                kind = next((k for k in ("create", "preupload", "commit", "branch", "resolve", "lfs-upload")
                             if k in parts), None)
                if hub.fail.get(kind):
                    hub.fail[kind] -= 1
                    self._body()
                    return self._answer(503, {"error": "Service Unavailable (stand-in)"})
                if self.command == "POST" and path == "/api/repos/create":
                    return self._create_repo(json.loads(self._body()))
                if self.command == "POST" and path == "/api/validate-yaml":
                    self._body()
                    return self._answer(200, {"errors": [], "warnings": []})
                if self.command == "POST" and parts[2:] == ["info", "lfs", "objects", "batch"]:
                    return self._lfs_batch(json.loads(self._body()))
                if self.command == "PUT" and parts[0] == "lfs-upload":
                    return self._lfs_upload(parts[1], self._body())
                if self.command == "POST" and parts[0] == "lfs-verify":
                    request = json.loads(self._body())
                    stored = hub.lfs_objects.get(parts[1])
                    if stored is None or len(stored) != request["size"]:
                        return self._answer(404, {"message": "object not stored"})
                    return self._answer(200, {})
                if self.command == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                    if repo_id not in hub.repos:
                        return self._answer(404, {"error": "Repository not found"},
                                            {"X-Error-Code": "RepoNotFound"})
                    repo = hub.repos[repo_id]
                    if action == "preupload":
                        return self._preupload(repo, revision, json.loads(self._body()))
                    if action == "commit":
                        return self._commit(repo, repo_id, revision, self._body())
                    if action == "branch":
                        self._body()
                        repo.branches.setdefault(revision, list(repo.branches["main"]))
                        return self._answer(200, {})
                if self.command == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                    return self._repo_info("/".join(parts[2:4]), "/".join(parts[5:]))
                if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    return self._download("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                return self._answer(404, {"error": f"the stand-in does not serve {self.command} {path}"})

            def _create_repo(self, request: dict):
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                    else request["name"]
                if repo_id in hub.repos:
                    return self._answer(409, {"error": "You already created this model repo",
                                              "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = Repo(private=request.get("visibility") == "private" or bool(request.get("private")))
                return self._answer(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _preupload(self, repo: Repo, revision: str, request: dict):
                current = repo.files(revision) if revision in repo.branches else {}
                return self._answer(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if takes_lfs(f["path"], base64.b64decode(f["sample"])) else "regular",
                     "oid": oid(f["path"], current[f["path"]]) if f["path"] in current else None}
                    for f in request["files"]]})

            def _lfs_batch(self, request: dict):
                """The git-lfs batch API: where to PUT each object not stored yet, and where to verify it."""
                if request["operation"] != "upload" or "basic" not in request.get("transfers", ["basic"]):
                    return self._answer(422, {"message": "the stand-in takes basic uploads only"})
                objects = []
                for obj in request["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                            "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"}}
                    objects.append(entry)
                return self._answer(200, {"transfer": "basic", "objects": objects},
                                    {"Content-Type": "application/vnd.git-lfs+json"})

            def _lfs_upload(self, sha256: str, data: bytes):
                if hashlib.sha256(data).hexdigest() != sha256:
                    return self._answer(400, {"message": "the content does not match its sha256"})
                hub.lfs_objects[sha256] = data
                return self._answer(200, b"")

            def _commit(self, repo: Repo, repo_id: str, revision: str, body: bytes):
                if revision not in repo.branches:
                    return self._answer(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = repo.files(revision)
                added, lfs = [], []
                for line in lines:
                    if line["key"] == "file":
                        path, data = line["value"]["path"], base64.b64decode(line["value"]["content"])
                        if takes_lfs(path, data[:512]):
                            return self._answer(400, {"error": f"{path}: binary files must be uploaded through "
                                                               "LFS or Xet"})
                        files[path] = data
                        added.append(path)
                    elif line["key"] == "lfsFile":
                        path, sha256 = line["value"]["path"], line["value"]["oid"]
                        if sha256 not in hub.lfs_objects:
                            return self._answer(422, {"error": f"{path}: LFS object {sha256} was not uploaded"})
                        files[path] = hub.lfs_objects[sha256]
                        added.append(path)
                        lfs.append(path)
                    elif line["key"] != "header":
                        return self._answer(400, {"error": f"the stand-in takes no {line['key']} operations"})
                commit_oid = hashlib.sha1(body).hexdigest()
                repo.branches[revision].append(Commit(commit_oid, header["summary"], header.get("description", ""),
                                                      files, added, lfs))
                return self._answer(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit_oid}",
                                          "commitOid": commit_oid, "pullRequestUrl": None})

            def _repo_info(self, repo_id: str, revision: str):
                """What huggingface_hub asks when an upload changes nothing: the branch's last commit."""
                repo = hub.repos.get(repo_id)
                if repo is None or not repo.branches.get(revision):
                    return self._answer(404, {"error": "Repository or revision not found"},
                                        {"X-Error-Code": "RevisionNotFound" if repo else "RepoNotFound"})
                return self._answer(200, {"id": repo_id, "sha": repo.branches[revision][-1].oid,
                                          "private": repo.private,
                                          "siblings": [{"rfilename": name} for name in repo.files(revision)]})

            def _download(self, repo_id: str, revision: str, path: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if revision not in repo.branches:
                    return self._answer(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                files = repo.files(revision)
                if path not in files:
                    return self._answer(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data, commit = files[path], repo.branches[revision][-1].oid
                headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid(path, data)}"',
                           "X-Repo-Commit": commit}
                if takes_lfs(path, data[:512]):
                    headers.update({"X-Linked-Etag": f'"{oid(path, data)}"', "X-Linked-Size": str(len(data))})
                return self._answer(200, data, headers)

            do_GET = do_POST = do_HEAD = do_PUT = _route

        return Handler

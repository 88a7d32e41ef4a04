"""A stand-in for the Hugging Face Hub endpoints that huggingface_hub calls to create a repo and a
branch, commit files, read a branch's last commit and download a file, served on 127.0.0.1 for the
tests (clients reach it through HF_ENDPOINT). It keeps repos in memory, records every request (method, path, Authorization header)
and can answer the next N requests of a kind (create, preupload, commit, resolve) with a 503."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

SECRET = "hf_standin_secret_7f3a9c"  # a token value the tests look for everywhere afterwards (in files and logs)


@dataclass
class Commit:
    oid: str
    message: str
    description: str
    files: dict[str, bytes]  # every file of the branch after this commit
    added: list[str]  # the paths this commit wrote


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})

    def files(self, branch: str) -> dict[str, bytes]:
        commits = self.branches[branch]
        return dict(commits[-1].files) if commits else {}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
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
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                kind = next((k for k in ("create", "preupload", "commit", "branch", "resolve") if k in parts), None)
                if hub.fail.get(kind):
                    hub.fail[kind] -= 1
                    self._body()
                    return self._answer(503, {"error": "Service Unavailable (stand-in)"})
                if self.command == "POST" and path == "/api/repos/create":
                    return self._create_repo(json.loads(self._body()))
                if self.command == "POST" and path == "/api/validate-yaml":
                    self._body()
                    return self._answer(200, {"errors": [], "warnings": []})
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
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None}
                    for f in request["files"]]})

            def _commit(self, repo: Repo, repo_id: str, revision: str, body: bytes):
                if revision not in repo.branches:
                    return self._answer(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = repo.files(revision)
                added = []
                for line in lines:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        added.append(line["value"]["path"])
                    elif line["key"] != "header":
                        return self._answer(400, {"error": f"the stand-in takes no {line['key']} operations"})
                oid = hashlib.sha1(body).hexdigest()
                repo.branches[revision].append(Commit(oid, header["summary"], header.get("description", ""),
                                                      files, added))
                return self._answer(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                          "pullRequestUrl": None})

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
                return self._answer(200, data, {"Content-Type": "application/octet-stream",
                                                "ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit})

            do_GET = do_POST = do_HEAD = _route

        return Handler

"""A local HTTP server that speaks the Hugging Face Hub's file API, enough for huggingface_hub's
HfApi.model_info and hf_hub_download: GET /api/models/{repo}/revision/{rev} (commit sha, siblings with sizes),
HEAD and GET /{repo}/resolve/{rev}/{file} (X-Repo-Commit, ETag, Content-Length, ranges), X-Error-Code headers for
missing repos, revisions, files and gated access. No machine here reaches the real Hub."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from services import free_ports

GOOD_TOKEN = "hf_granted_0123456789"


class Repo:
    def __init__(self, files: dict[str, bytes | Path], *, gated: bool = False, sha: str | None = None) -> None:
        self.files = files
        self.gated = gated
        self.sha = sha or hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()

    def size(self, name: str) -> int:
        f = self.files[name]
        return f.stat().st_size if isinstance(f, Path) else len(f)

    def etag(self, name: str) -> str:
        f = self.files[name]
        return hashlib.sha1(f"{name}:{self.size(name)}".encode() if isinstance(f, Path) else f).hexdigest()


class FakeHub:
    """The Hub's file API, enough for huggingface_hub.HfApi.model_info and hf_hub_download."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, head=False)

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool,
               commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _resolve(self, repo: Repo, rev: str) -> str | None:
        return repo.sha if rev in ("main", repo.sha) else None

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        auth = h.headers.get("Authorization")
        self.requests.append(("HEAD" if head else "GET", path, auth))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._error(h, 401, "RepoNotFound", "Repository not found", head)
            commit = self._resolve(repo, unquote(m.group(2)))
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
            body = json.dumps({
                "_id": "0" * 24, "id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": n, "size": repo.size(n), "blobId": repo.etag(n)} for n in repo.files],
            }).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._error(h, 404, "NotFound", "no such endpoint", head)
        repo = self.repos.get(m.group(1))
        if repo is None:
            return self._error(h, 401, "RepoNotFound", "Repository not found", head)
        commit = self._resolve(repo, unquote(m.group(2)))
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        if repo.gated and auth != f"Bearer {GOOD_TOKEN}":
            return self._error(h, 403 if auth else 401, "GatedRepo",
                               f"Access to model {m.group(1)} is restricted. You must have access to it.", head)
        name = unquote(m.group(3))
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", head, commit)
        f = repo.files[name]
        data = f.read_bytes() if isinstance(f, Path) else f
        start = 0
        rng = h.headers.get("Range")
        if rng and (mr := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(mr.group(1))
        part = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{repo.etag(name)}"')
        h.send_header("Content-Length", str(len(part)))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if not head:
            h.wfile.write(part)


def repo_of_dir(d: Path) -> Repo:
    """A repository serving every file under `d` (read when requested)."""
    return Repo({p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()})

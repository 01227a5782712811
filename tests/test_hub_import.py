"""Import by model id through the real huggingface_hub client, from a local server that speaks the Hub's
file API: GET /api/models/{repo}/revision/{rev} (commit sha, siblings with sizes), HEAD and GET
/{repo}/resolve/{rev}/{file} (X-Repo-Commit, ETag, Content-Length, ranges), X-Error-Code headers for
missing repos, revisions, files and gated access. It serves the real all-MiniLM-L6-v2 files."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from api_support import (  # noqa: F401  (pytest fixtures)
    ApiServer,
    postgres_server,
    raw_safetensors,
    s3_config,
    safetensors_bytes,
    start_server,
)
from services import free_ports
from sqlalchemy import func, select

from api.db.models import Model

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


def _tiny() -> dict[str, bytes | Path]:
    return {"model.safetensors": safetensors_bytes(7), "config.json": b'{"model_type": "llama"}'}


@pytest.fixture(scope="module")
def hub(minilm_dir: Path) -> Iterator[FakeHub]:
    minilm: dict[str, bytes | Path] = {
        p.relative_to(minilm_dir).as_posix(): p for p in minilm_dir.rglob("*") if p.is_file()
    }
    minilm["pytorch_model.bin"] = b"\x80\x04pickle"  # real repos often carry both: the pickle is skipped
    minilm["modeling_extra.py"] = b"import os"
    fake = FakeHub({
        "sentence-transformers/all-MiniLM-L6-v2": Repo(minilm),
        "acme/gated": Repo(_tiny(), gated=True),
        "acme/pickle-only": Repo({"pytorch_model.bin": b"\x80\x04", "config.json": b"{}"}),
        "acme/remote-code": Repo({"model.safetensors": safetensors_bytes(1),
                                  "config.json": json.dumps({"auto_map": {"AutoModel": "m.M"}}).encode()}),
        "acme/no-config": Repo({"model.safetensors": safetensors_bytes(1)}),
        "acme/corrupt": Repo({"model.safetensors": raw_safetensors(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}),
    })
    yield fake
    fake.close()


@pytest.fixture(scope="module", params=["sqlite-local", "postgres-s3"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hub: FakeHub
           ) -> Iterator[ApiServer]:
    srv = start_server(tmp_path_factory.mktemp(request.param), request.param, request, hf_endpoint=hub.url)
    yield srv
    srv.stop()


def _wait(c: Any, mid: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = c.get(f"/v1/models/{mid}").json()
        if m["state"] in ("ready", "failed"):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.2)


def _models(server: ApiServer, tenant_id: str) -> int:
    with server.db() as s:
        return s.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant_id))


def test_import_real_model(server: ApiServer, hub: FakeHub, minilm_dir: Path) -> None:
    t = server.new_tenant()
    c = server.client(t.token)
    repo = hub.repos["sentence-transformers/all-MiniLM-L6-v2"]
    hub.requests.clear()
    r = c.post("/v1/models/import", json={"hub_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "main"})
    assert r.status_code == 202, r.text
    assert r.json()["source"] == "hub" and r.json()["hub_revision"] == repo.sha
    assert r.json()["state"] in ("importing", "ready")
    m = _wait(c, r.json()["id"])
    assert m["state"] == "ready", m
    files = {f["path"]: f for f in m["files"]}
    assert "pytorch_model.bin" not in files and "modeling_extra.py" not in files and "README.md" not in files
    assert {"model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"} <= set(files)
    for name, f in files.items():
        data = (minilm_dir / name).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert m["total_bytes"] == sum(f["size"] for f in files.values())
    # no token was sent: the server's own Hugging Face credentials are never used for a tenant
    assert hub.requests and all(auth is None for _, _, auth in hub.requests)
    # the model can be compressed
    assert c.post("/v1/jobs", json={"model_id": m["id"], "target_bits": 4}).status_code == 201


def test_gated_model_needs_the_callers_token(server: ApiServer, hub: FakeHub) -> None:
    t = server.new_tenant()
    c = server.client(t.token)
    r = c.post("/v1/models/import", json={"hub_id": "acme/gated"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "hub_gated"
    assert "token" in r.json()["error"]["message"]
    r = c.post("/v1/models/import", json={"hub_id": "acme/gated", "token": "hf_not_granted"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "hub_gated"
    assert "not been granted" in r.json()["error"]["message"]
    assert _models(server, t.id) == 0 and server.objects(t.id) == []
    r = c.post("/v1/models/import", json={"hub_id": "acme/gated", "token": GOOD_TOKEN})
    assert r.status_code == 202, r.text
    m = _wait(c, r.json()["id"])
    assert m["state"] == "ready" and m["file_count"] == 2
    assert GOOD_TOKEN not in json.dumps(m)
    with server.db() as s:
        assert GOOD_TOKEN not in json.dumps([str(v) for v in s.get(Model, m["id"]).__dict__.values()])


BAD_IMPORTS = [
    ({"hub_id": "acme/does-not-exist"}, 404, "hub_model_not_found"),
    ({"hub_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "v9.9"}, 404, "hub_revision_not_found"),
    ({"hub_id": "acme/pickle-only"}, 422, "pickle_refused"),
    ({"hub_id": "acme/remote-code"}, 422, "trust_remote_code_refused"),
    ({"hub_id": "acme/no-config"}, 422, "missing_config"),
    ({"hub_id": "acme/x", "endpoint": "http://169.254.169.254"}, 422, "endpoint_not_allowed"),
    ({"hub_id": "../etc"}, 422, "validation_error"),
    ({"hub_id": "acme/x", "revision": "main; rm -rf"}, 422, "validation_error"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_IMPORTS, ids=[json.dumps(b[0]) for b in BAD_IMPORTS])
def test_bad_imports_are_refused(server: ApiServer, body: dict[str, Any], status: int, code: str) -> None:
    t = server.new_tenant()
    r = server.client(t.token).post("/v1/models/import", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert _models(server, t.id) == 0 and server.objects(t.id) == []


def test_import_that_fails_later_cleans_up(server: ApiServer) -> None:
    """A file refused during the background download: the model ends `failed` with the reason, nothing stored."""
    t = server.new_tenant()
    c = server.client(t.token)
    r = c.post("/v1/models/import", json={"hub_id": "acme/corrupt"})
    assert r.status_code == 202, r.text
    m = _wait(c, r.json()["id"])
    assert m["state"] == "failed"
    assert "model.safetensors: not a valid safetensors file" in m["error"] and "acme/corrupt@" in m["error"]
    assert m["file_count"] == 0 and m["total_bytes"] == 0
    assert server.objects(t.id) == []
    assert c.post("/v1/jobs", json={"model_id": m["id"], "target_bits": 4}).json()["error"]["code"] == \
        "model_not_ready"
    assert c.delete(f"/v1/models/{m['id']}").status_code == 204


def test_import_quota(server: ApiServer) -> None:
    t = server.new_tenant(max_storage_bytes=1000)
    r = server.client(t.token).post("/v1/models/import", json={"hub_id": "sentence-transformers/all-MiniLM-L6-v2"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_quota_exceeded"
    assert _models(server, t.id) == 0

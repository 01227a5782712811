"""Import by model id through the real huggingface_hub client, from a local server that speaks the Hub's
file API (tests/fake_hub.py). It serves the real all-MiniLM-L6-v2 files."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import (  # noqa: F401  (pytest fixtures)
    ApiServer,
    postgres_server,
    raw_safetensors,
    s3_config,
    safetensors_bytes,
    start_server,
)
from fake_hub import GOOD_TOKEN, FakeHub, Repo, repo_of_dir
from sqlalchemy import func, select

from api.db.models import Model


def _tiny() -> dict[str, bytes | Path]:
    return {"model.safetensors": safetensors_bytes(7), "config.json": b'{"model_type": "llama"}'}


@pytest.fixture(scope="module")
def hub(minilm_dir: Path) -> Iterator[FakeHub]:
    minilm: dict[str, bytes | Path] = dict(repo_of_dir(minilm_dir).files)
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

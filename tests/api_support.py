"""A real API server for the API tests: uvicorn on a loopback port, over SQLite + the local store or over
PostgreSQL + SeaweedFS S3 (both real, from tests/services.py). The worker is replaced by a
RecordingDispatcher; `finish_job` plays the worker's part where a test needs a finished job.

Use from a test module by importing the fixtures::

    from api_support import postgres_server, s3_config, server  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from safetensors.numpy import save as st_save
from services import S3Config, free_ports, postgres_server, s3_config  # noqa: F401

from api import admin
from api.core.config import Settings
from api.db.models import Artifact, ArtifactKind, Job, JobEvent, JobState
from api.db.session import session_scope
from api.db.types import utcnow
from api.main import create_app
from api.services import keys
from api.services.dispatch import RecordingDispatcher
from api.storage import LocalStore, ObjectStore, S3Store

__all__ = ["ApiServer", "Tenant", "server", "start_server", "safetensors_bytes", "raw_safetensors",
           "tiny_model_files", "postgres_server", "s3_config", "BACKENDS"]

BACKENDS = ["sqlite-local", "postgres-s3"]
MiB = 1 << 20


@dataclass
class Tenant:
    id: str
    token: str
    name: str


@dataclass
class ApiServer:
    backend: str
    base_url: str
    settings: Settings
    app: Any
    dispatcher: RecordingDispatcher
    _server: uvicorn.Server
    _thread: threading.Thread
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def res(self) -> Any:
        return self.app.state.resources

    @property
    def store(self) -> ObjectStore:
        return self.res.store

    @contextlib.contextmanager
    def db(self) -> Iterator[Any]:
        with session_scope(self.res.session_factory) as s:
            yield s

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)
        self._clients.append(c)
        return c

    def new_tenant(self, **limits: Any) -> Tenant:
        name = f"t-{uuid.uuid4().hex[:10]}"
        with self.db() as s:
            t = admin.create_tenant(s, name, **limits)
            _, _, token = admin.create_key(s, t.id)
            tid = t.id
        return Tenant(tid, token, name)

    def objects(self, tenant_id: str) -> list[str]:
        return [o.key for o in self.store.list_objects(keys.tenant_prefix(tenant_id))]

    def open_uploads(self, tenant_id: str) -> list[str]:
        """Multipart uploads still open in the store for this tenant's keys."""
        prefix = keys.tenant_prefix(tenant_id)
        store = self.store
        if isinstance(store, S3Store):
            resp = store._client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
            return [u["Key"] for u in resp.get("Uploads", [])]
        assert isinstance(store, LocalStore)
        out = []
        for d in (store.root / "uploads").iterdir():
            key_file = d / "key"
            if key_file.is_file() and key_file.read_text().startswith(prefix):
                out.append(key_file.read_text())
        return out

    def ready_model(self, tenant: Tenant, files: dict[str, bytes] | None = None) -> str:
        c = self.client(tenant.token)
        mid = c.post("/v1/models", json={"name": "tiny"}).json()["id"]
        for name, data in (files or tiny_model_files()).items():
            r = c.put(f"/v1/models/{mid}/files/{name}", content=data)
            assert r.status_code == 201, r.text
        r = c.post(f"/v1/models/{mid}/finalize")
        assert r.status_code == 200, r.text
        return mid

    def finish_job(self, tenant: Tenant, job_id: str, artifacts: dict[str, tuple[str, bytes]] | None = None,
                   state: JobState = JobState.SUCCEEDED) -> None:
        """Do what the worker does at the end of a job: stage events, artifact objects and rows, final state."""
        artifacts = artifacts if artifacts is not None else {
            "bundle/model.nwc": ("bundle", b"NWC0" + os.urandom(3000)),
            "report.json": ("report", json.dumps({"measured_bits": 4.01, "ppl": {"original": 12.3}}).encode()),
        }
        t0 = utcnow() - timedelta(seconds=30)
        with self.db() as s:
            job = s.get(Job, job_id)
            job.state = JobState.RUNNING
            job.started_at = t0
            for i, stage in enumerate(("fetch", "compress", "verify")):
                at = t0 + timedelta(seconds=10 * i)
                s.add(JobEvent(job_id=job_id, stage=stage, kind="stage", message=f"{stage} started", data={},
                               created_at=at))
                s.add(JobEvent(job_id=job_id, stage=stage, kind="stage", message=f"{stage}ed",
                               data={"seconds": 9.5, "step": i}, created_at=at + timedelta(seconds=9)))
            for name, (kind, data) in artifacts.items():
                key = keys.artifact_key(tenant.id, job_id, name)
                r = self.store.put_stream(key, data)
                s.add(Artifact(tenant_id=tenant.id, job_id=job_id, kind=ArtifactKind(kind), name=name, key=key,
                               size=r.size, sha256=r.sha256))
            job.state = state
            job.stage = "publish"
            job.progress = 1.0 if state == JobState.SUCCEEDED else job.progress
            job.finished_at = utcnow()
            if state == JobState.FAILED:
                job.error = "boom"
            s.add(JobEvent(job_id=job_id, stage="publish", kind="state", message=str(state),
                           data={"state": str(state)}))

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._server.should_exit = True
        self._thread.join(30)


def start_server(tmp: Path, backend: str, request: pytest.FixtureRequest | None = None, **overrides: Any
                 ) -> ApiServer:
    port = free_ports(1)[0]
    base_url = f"http://127.0.0.1:{port}"
    cfg: dict[str, Any] = dict(data_dir=tmp / "data", public_url=base_url,
                               secret_key="test-secret-0123456789")
    store: S3Store | None = None
    if backend == "postgres-s3":
        assert request is not None
        pg = request.getfixturevalue("postgres_server")
        s3: S3Config = request.getfixturevalue("s3_config")
        cfg |= dict(database_url=pg.new_database("api"), **s3.settings())
        # Smallest legal part size, so the store's own multipart paths run with a few MiB.
        store = s3.store(part_size=5 * MiB)
    cfg |= overrides
    settings = Settings(**cfg)
    dispatcher = RecordingDispatcher()
    app = create_app(settings, dispatcher=dispatcher, store=store, migrate=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return ApiServer(backend, base_url, settings, app, dispatcher, srv, thread)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server(tmp_path_factory.mktemp(request.param), request.param, request)
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- files


def safetensors_bytes(seed: int = 0, n: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return st_save({"layer.weight": rng.standard_normal((n, n)).astype(np.float32),
                    "layer.bias": np.zeros(n, np.float16)})


def raw_safetensors(header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A file with this header and data; `length` overrides the header-length field."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def tiny_model_files() -> dict[str, bytes]:
    return {
        "model.safetensors": safetensors_bytes(),
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
        "tokenizer_config.json": json.dumps({"model_max_length": 512}).encode(),
    }

"""The HTTP API against a real uvicorn server, on SQLite + local store and on PostgreSQL + SeaweedFS S3:
auth, the error schema, request ids and logs, tenant isolation of every route, jobs (validation,
idempotency, limits, cancel/retry/delete), artifacts and presigned URLs, ops endpoints, the admin CLI
and the Python client / `nwc remote`."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (  # noqa: F401  (pytest fixtures)
    ApiServer,
    Tenant,
    postgres_server,
    s3_config,
    server,
    tiny_model_files,
)
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.admin import admin_app
from api.client import ApiError, ChecksumError, NWCClient
from api.db.models import Artifact, Job, JobEvent, JobState
from api.logs import configure_logging
from api.main import app as default_app
from api.remote import remote_app
from api.services import keys

# ----------------------------------------------------------------------------- a tenant with one of everything


def _world(server: ApiServer) -> dict[str, Any]:  # noqa: F811
    """Tenant A with a ready model (and file), an open multipart upload on a second model, a finished job with
    artifacts and a report, and a calibration text."""
    a = server.new_tenant()
    c = server.client(a.token)
    mid = server.ready_model(a)
    pending = c.post("/v1/models", json={"name": "pending"}).json()["id"]
    upload = c.post(f"/v1/models/{pending}/uploads", json={"path": "big.safetensors", "size": 6 << 20}).json()
    cal = c.post("/v1/calibration-texts", params={"name": "cal.txt"}, content=b"some calibration text").json()
    job = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}).json()
    server.finish_job(a, job["id"])
    art = c.get(f"/v1/jobs/{job['id']}/artifacts").json()[0]
    return {"tenant": a, "model_id": mid, "pending_model_id": pending, "upload_id": upload["upload_id"],
            "calibration_id": cal["id"], "job_id": job["id"], "artifact_id": art["id"], "path": "config.json"}


@pytest.fixture(scope="module")
def world(server: ApiServer) -> dict[str, Any]:  # noqa: F811
    return _world(server)


# Every route of the app, as (method, path template): the isolation test below must cover each one.
ROUTES = sorted(
    (m.upper(), path) for path, ops in default_app.openapi()["paths"].items() if path.startswith("/v1/")
    for m in ops
)
TENANT_SCOPED = [(m, p) for m, p in ROUTES if "{" in p and not p.startswith("/v1/store/")]
COLLECTION_ROUTES = [(m, p) for m, p in ROUTES if "{" not in p]
# The store routes are authorized by the signed token in the URL, not by a tenant's key (tested below).
TOKEN_ROUTES = [(m, p) for m, p in ROUTES if p.startswith("/v1/store/")]
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/models/{model_id}/uploads"): {"path": "x.safetensors", "size": 100},
    ("POST", "/v1/models/{model_id}/uploads/{upload_id}/parts"): {"part_numbers": [1]},
    ("POST", "/v1/models/{model_id}/uploads/{upload_id}/complete"): {"parts": [{"part_number": 1, "etag": "x"}]},
}


def _url(world: dict[str, Any], template: str, model_key: str = "model_id") -> str:
    ids = dict(world)
    if "{upload_id}" in template:
        model_key = "pending_model_id"
    url = template.replace("{model_id}", ids[model_key])
    for name in ("upload_id", "job_id", "artifact_id", "calibration_id", "path"):
        url = url.replace("{" + name + "}", str(ids[name]))
    assert "{" not in url, url
    return url


def test_route_inventory() -> None:
    """The isolation test is parametrized from the app's own routes, so a new route is covered without editing
    this file; this guards that derivation (a filter gone wrong would quietly test nothing)."""
    assert len(TENANT_SCOPED) >= 18 and len(COLLECTION_ROUTES) >= 4 and len(TOKEN_ROUTES) == 2


@pytest.mark.parametrize(("method", "template"), TENANT_SCOPED, ids=[f"{m} {p}" for m, p in TENANT_SCOPED])
def test_tenant_isolation(server: ApiServer, world: dict[str, Any], method: str, template: str) -> None:  # noqa: F811
    """Tenant B gets 404 (never 403, never A's data) for each of tenant A's ids, on every route, and A's
    resources are untouched."""
    b = server.new_tenant()
    cb = server.client(b.token)
    body = BODIES.get((method, template))
    kw: dict[str, Any] = {}
    if body is not None:
        kw["json"] = body
    elif "/files/" in template and method == "PUT":
        kw["content"] = b"{}"
    url = _url(world, template)
    r = cb.request(method, url, **kw)
    assert r.status_code == 404, (method, template, r.status_code, r.text)
    assert r.json()["error"]["code"] == "not_found"
    # Nothing of A's shows through: the answer names no id of A's other than those B put in the URL.
    others = [v for k, v in world.items() if k.endswith("_id") and v not in url] + [world["tenant"].id]
    assert not [v for v in others if v in r.text], r.text
    # A still sees its things.
    ca = server.client(world["tenant"].token)
    assert ca.get(f"/v1/models/{world['model_id']}").status_code == 200
    assert ca.get(f"/v1/jobs/{world['job_id']}").json()["state"] == "succeeded"
    assert ca.get(f"/v1/jobs/{world['job_id']}/artifacts").json()
    assert ca.get(f"/v1/models/{world['pending_model_id']}/uploads/{world['upload_id']}").status_code == 200
    assert ca.get(f"/v1/calibration-texts/{world['calibration_id']}").status_code == 200


def test_lists_are_scoped(server: ApiServer, world: dict[str, Any]) -> None:  # noqa: F811
    b = server.new_tenant()
    cb = server.client(b.token)
    assert cb.get("/v1/models").json() == {"items": [], "next_cursor": None}
    assert cb.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
    assert cb.get("/v1/jobs", params={"model_id": world["model_id"]}).json()["items"] == []
    assert cb.get("/v1/calibration-texts").json() == []
    # B cannot use A's model or calibration text in a job of its own.
    r = cb.post("/v1/jobs", json={"model_id": world["model_id"], "target_bits": 4})
    assert r.status_code == 404
    own = server.ready_model(b)
    r = cb.post("/v1/jobs", json={"model_id": own, "target_bits": 4, "method": "gptq",
                                  "calibration": world["calibration_id"]})
    assert r.status_code == 404 and "calibration" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- auth, errors, request ids


@pytest.mark.parametrize(("method", "template"), COLLECTION_ROUTES + TENANT_SCOPED[:6])
def test_auth_required(server: ApiServer, world: dict[str, Any], method: str, template: str) -> None:  # noqa: F811
    c = server.client()
    url = _url(world, template) if "{" in template else template
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer nwc_0123456789abcdef_" + "A" * 43}):
        r = c.request(method, url, headers=headers, json={})
        assert r.status_code == 401, (method, url, headers, r.text)
        assert r.json() == {"error": {"code": "unauthorized", "message": r.json()["error"]["message"],
                                      "detail": None}}
        assert "API key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_refused(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    assert c.get("/v1/models").status_code == 200
    from api import admin

    with server.db() as s:
        admin.revoke_key(s, t.token)
    assert c.get("/v1/models").status_code == 401


def test_error_schema_and_request_id(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    r = c.get("/v1/nothing-here", headers={"X-Request-ID": "my-req-42"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "my-req-42"
    assert set(r.json()["error"]) == {"code", "message", "detail"}
    r = c.post("/v1/jobs", json={"target_bits": "four"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error" and isinstance(err["detail"], list) and err["detail"][0]["loc"]
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = c.get("/v1/models", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"
    r = c.delete("/v1/models")  # method not allowed
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_json_logs_carry_request_and_job_ids(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = server.ready_model(t)
    buf = io.StringIO()
    configure_logging(stream=buf)
    try:
        job = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}, headers={"X-Request-ID": "rq-1"}).json()
        c.get(f"/v1/jobs/{job['id']}", headers={"X-Request-ID": "rq-2"})
        time.sleep(0.2)
    finally:
        configure_logging()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    created = [x for x in lines if x["msg"] == "job created"]
    assert created and created[0]["request_id"] == "rq-1" and created[0]["job_id"] == job["id"]
    access = [x for x in lines if x["logger"] == "nwc.api.access" and x["request_id"] == "rq-2"]
    assert access and access[0]["job_id"] == job["id"] and access[0]["tenant_id"] == t.id
    assert access[0]["status"] == 200 and access[0]["route"] == "/v1/jobs/{job_id}"
    assert not any(t.token in line for line in buf.getvalue().splitlines())


def test_openapi_is_complete(server: ApiServer) -> None:  # noqa: F811
    spec = server.client().get("/openapi.json").json()
    assert spec["info"]["version"] and "Bearer" in json.dumps(spec["components"]["securitySchemes"])
    assert "ErrorResponse" in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (method, path)
            if path.startswith("/v1/") and not path.startswith("/v1/store"):
                assert "401" in op["responses"], (method, path)
                for code, resp in op["responses"].items():
                    if code[0] in "45" and code != "422":
                        assert resp["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
            rb = op.get("requestBody")
            if rb:
                content = rb["content"]
                if "application/json" in content:
                    ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                    assert spec["components"]["schemas"][ref].get("examples"), (method, path, ref)
                else:
                    assert "application/octet-stream" in content
    for name in ("ModelOut", "JobDetail", "JobTuning", "ArtifactOut", "UploadOut", "PartUrlsOut"):
        assert spec["components"]["schemas"][name].get("examples"), name


# ----------------------------------------------------------------------------- jobs


def _count_jobs(server: ApiServer, tenant_id: str) -> int:  # noqa: F811
    with server.db() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))


BAD_JOBS = [
    ({"target_bits": 0.5}, 422, "validation_error"),
    ({"target_bits": 9}, 422, "validation_error"),
    ({"target_bits": 4, "method": "gptq", "calibration": "none"}, 422, "validation_error"),
    ({"target_bits": 1.5, "method": "rtn"}, 422, "validation_error"),
    ({"target_bits": 4, "method": "awq"}, 422, "validation_error"),
    ({"target_bits": 4, "calibration": "c4"}, 422, "validation_error"),
    ({"target_bits": 4, "outputs": []}, 422, "validation_error"),
    ({"target_bits": 4, "outputs": ["bundle", "bundle"]}, 422, "validation_error"),
    ({"target_bits": 4, "outputs": ["pickle"]}, 422, "validation_error"),
    ({"target_bits": 4, "webhook_url": "ftp://example.com/x"}, 422, "validation_error"),
    ({"target_bits": 4, "webhook_url": "https://user:pw@example.com/x"}, 422, "validation_error"),
    ({"target_bits": 4, "webhook_url": "javascript:alert(1)"}, 422, "validation_error"),
    ({"target_bits": 4, "surprise": True}, 422, "validation_error"),
    ({"target_bits": 4, "webhook_url": "http://169.254.169.254/latest/meta-data/"}, 422, "webhook_url_not_allowed"),
    ({"target_bits": 4, "webhook_url": "http://127.0.0.1:8000/v1/jobs"}, 422, "webhook_url_not_allowed"),
    ({"target_bits": 4, "webhook_url": "http://redis:6379/"}, 422, "webhook_url_not_allowed"),
    ({"target_bits": 4, "tuning": {"calib_seqs": 0}}, 422, "validation_error"),
    ({"target_bits": 4, "tuning": {"allocation": "greedy"}}, 422, "validation_error"),
    ({"target_bits": 4, "tuning": {"finetune_epochs": -1}}, 422, "validation_error"),
    ({"target_bits": 4, "tuning": {"eval_tokens": 4}}, 422, "validation_error"),
    ({"target_bits": 4, "tuning": {"learning_rate": 1}}, 422, "validation_error"),
    ({"target_bits": 4, "calibration": "cal_" + "0" * 32}, 404, "not_found"),
    ({"target_bits": 4, "model_id": "mdl_doesnotexist"}, 404, "not_found"),
]


@pytest.mark.parametrize(("patch", "status", "code"), BAD_JOBS, ids=[json.dumps(b[0]) for b in BAD_JOBS])
def test_bad_job_bodies(server: ApiServer, patch: dict[str, Any], status: int, code: str) -> None:  # noqa: F811
    t = server.new_tenant()
    mid = server.ready_model(t)
    before = list(server.dispatcher.enqueued)
    r = server.client(t.token).post("/v1/jobs", json={"model_id": mid} | patch)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert _count_jobs(server, t.id) == 0 and server.dispatcher.enqueued == before


def test_job_on_unready_model_is_refused(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = c.post("/v1/models", json={"name": "x"}).json()["id"]
    r = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_ready"
    assert _count_jobs(server, t.id) == 0


def test_create_list_filter_paginate(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant(max_concurrent_jobs=50)
    c = server.client(t.token)
    m1, m2 = server.ready_model(t), server.ready_model(t)
    ids = []
    for i in range(7):
        body = {"model_id": m1 if i % 2 else m2, "target_bits": 3 + i % 3,
                "method": "gptq" if i % 3 == 0 else "nwc"}
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] == "queued" and job["calibration"] == ("wiki" if body["method"] == "gptq" else "none")
        assert job["outputs"] == ["bundle", "dense", "report"]
        ids.append(job["id"])
    assert server.dispatcher.enqueued[-7:] == ids
    with server.db() as s:
        opts = s.get(Job, ids[0]).options
    assert opts["calibration"] == "wiki" and opts["calibration_key"] is None and len(opts["request_sha256"]) == 64
    seen, cursor = [], None
    while True:
        page = c.get("/v1/jobs", params={"limit": 3} | ({"cursor": cursor} if cursor else {})).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert {j["model_id"] for j in c.get("/v1/jobs", params={"model_id": m1}).json()["items"]} == {m1}
    gptq = c.get("/v1/jobs", params={"method": "gptq"}).json()["items"]
    assert len(gptq) == 3 and all(j["method"] == "gptq" for j in gptq)
    assert c.get("/v1/jobs", params={"state": "succeeded"}).json()["items"] == []
    assert c.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 422
    assert c.get("/v1/jobs", params={"state": "exploded"}).status_code == 422


def test_idempotency_key(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = server.ready_model(t)
    body = {"model_id": mid, "target_bits": 4, "webhook_url": "https://hooks.example.com/nwc"}
    r1 = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "release-1"})
    r2 = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "release-1"})
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["id"] == r2.json()["id"] and r1.json()["idempotency_key"] == "release-1"
    r3 = c.post("/v1/jobs", json=body | {"target_bits": 3}, headers={"Idempotency-Key": "release-1"})
    assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_key_reused"
    assert r3.json()["error"]["detail"]["job_id"] == r1.json()["id"]
    assert _count_jobs(server, t.id) == 1 and server.dispatcher.enqueued.count(r1.json()["id"]) == 1
    # Keys are per tenant: another tenant may use the same one.
    u = server.new_tenant()
    other = server.ready_model(u)
    r4 = server.client(u.token).post("/v1/jobs", json={"model_id": other, "target_bits": 4},
                                     headers={"Idempotency-Key": "release-1"})
    assert r4.status_code == 201


def test_concurrent_job_limit(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant(max_concurrent_jobs=2)
    c = server.client(t.token)
    mid = server.ready_model(t)
    jobs = [c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}).json()["id"] for _ in range(2)]
    r = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4})
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrent_job_limit"
    assert r.json()["error"]["detail"] == {"active_jobs": 2, "limit": 2}
    assert _count_jobs(server, t.id) == 2
    c.post(f"/v1/jobs/{jobs[0]}/cancel")
    assert c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}).status_code == 201
    # retry counts too
    assert c.post(f"/v1/jobs/{jobs[0]}/retry").status_code == 429


def test_storage_limit_blocks_jobs(server: ApiServer) -> None:  # noqa: F811
    files = tiny_model_files()
    t = server.new_tenant(max_storage_bytes=sum(len(v) for v in files.values()))
    mid = server.ready_model(t, files)
    r = server.client(t.token).post("/v1/jobs", json={"model_id": mid, "target_bits": 4})
    assert r.status_code == 429 and r.json()["error"]["code"] == "storage_quota_exceeded"
    assert _count_jobs(server, t.id) == 0


def test_queue_unavailable_leaves_no_job(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    mid = server.ready_model(t)
    server.dispatcher.fail = True
    try:
        r = server.client(t.token).post("/v1/jobs", json={"model_id": mid, "target_bits": 4},
                                        headers={"Idempotency-Key": "k"})
    finally:
        server.dispatcher.fail = False
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
    assert _count_jobs(server, t.id) == 0
    r = server.client(t.token).post("/v1/jobs", json={"model_id": mid, "target_bits": 4},
                                    headers={"Idempotency-Key": "k"})
    assert r.status_code == 201


def test_cancel_retry_delete(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    mid = server.ready_model(t)
    jid = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}).json()["id"]
    assert c.post(f"/v1/jobs/{jid}/retry").status_code == 409  # queued: nothing to retry
    r = c.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_active"
    r = c.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    assert jid in server.dispatcher.cancelled
    assert c.post(f"/v1/jobs/{jid}/cancel").status_code == 409
    r = c.post(f"/v1/jobs/{jid}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["finished_at"] is None
    assert server.dispatcher.enqueued.count(jid) == 2
    events = c.get(f"/v1/jobs/{jid}/events").json()
    assert [e["data"].get("state") for e in events if e["kind"] == "state"] == ["queued", "cancelled", "queued"]
    assert c.get(f"/v1/jobs/{jid}/events", params={"after": events[-2]["id"]}).json() == events[-1:]
    # A model with jobs cannot be deleted; a finished job can, with its artifacts.
    assert c.delete(f"/v1/models/{mid}").json()["error"]["code"] == "model_in_use"
    server.finish_job(t, jid)
    job_keys = [k for k in server.objects(t.id) if k.startswith(keys.job_prefix(t.id, jid))]
    assert len(job_keys) == 2
    assert c.delete(f"/v1/jobs/{jid}").status_code == 204
    assert c.get(f"/v1/jobs/{jid}").status_code == 404
    assert not [k for k in server.objects(t.id) if k.startswith(keys.job_prefix(t.id, jid))]
    with server.db() as s:
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == jid)) == 0
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == jid)) == 0
    assert c.delete(f"/v1/models/{mid}").status_code == 204
    assert server.objects(t.id) == []


def test_failed_job_retry(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    jid = c.post("/v1/jobs", json={"model_id": server.ready_model(t), "target_bits": 4}).json()["id"]
    server.finish_job(t, jid, artifacts={}, state=JobState.FAILED)
    job = c.get(f"/v1/jobs/{jid}").json()
    assert job["state"] == "failed" and job["error"] == "boom"
    with server.db() as s:  # the worker gave up after its attempts
        s.get(Job, jid).attempts = 3
    r = c.post(f"/v1/jobs/{jid}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["error"] is None
    assert r.json()["attempts"] == 0  # a retry gets the full budget of attempts again


def test_tuning_reaches_the_worker_options(server: ApiServer) -> None:  # noqa: F811
    from worker.options import JobOptions

    t = server.new_tenant()
    c = server.client(t.token)
    body = {"model_id": server.ready_model(t), "target_bits": 3, "calibration": "wiki",
            "tuning": {"calib_seqs": 8, "calib_len": 128, "finetune_epochs": 2, "allocation": "kl",
                       "allocation_strength": 0.5, "eval_tokens": 512, "seed": 7}}
    job = c.post("/v1/jobs", json=body).json()
    assert job["tuning"] == body["tuning"] | {"act_order": False, "sparsity": None, "pattern": None}
    assert c.get(f"/v1/jobs/{job['id']}").json()["tuning"] == job["tuning"]
    with server.db() as s:
        row = s.get(Job, job["id"])
        opts = JobOptions.parse(row.method, row.target_bits, row.options, t.id)
    assert (opts.calib_seqs, opts.calib_len, opts.finetune_epochs, opts.allocation, opts.allocation_strength,
            opts.eval_tokens, opts.seed) == (8, 128, 2, "kl", 0.5, 512, 7)
    plain = c.post("/v1/jobs", json={"model_id": body["model_id"], "target_bits": 4}).json()
    assert plain["tuning"]["calib_seqs"] == 32 and plain["tuning"]["allocation"] is None  # documented defaults


def test_job_progress_stages_and_metrics(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    jid = c.post("/v1/jobs", json={"model_id": server.ready_model(t), "target_bits": 4}).json()["id"]
    from datetime import timedelta

    from api.db.types import utcnow

    now = utcnow()
    with server.db() as s:
        job = s.get(Job, jid)
        job.state, job.stage, job.progress, job.eta_at = JobState.RUNNING, "compress", 0.4, now + timedelta(minutes=5)
        s.add(JobEvent(job_id=jid, stage="fetch", kind="stage", message="fetch started", data={"attempt": 1},
                       created_at=now - timedelta(seconds=100)))
        s.add(JobEvent(job_id=jid, stage="fetch", kind="stage", message="fetched", data={"files": 3, "bytes": 9},
                       created_at=now - timedelta(seconds=90)))
        s.add(JobEvent(job_id=jid, stage="compress", kind="stage", message="compress started", data={"attempt": 1},
                       created_at=now - timedelta(seconds=60)))
        s.add(JobEvent(job_id=jid, stage="compress", kind="progress", message="", data={"progress": 0.25},
                       created_at=now - timedelta(seconds=20)))
        s.add(JobEvent(job_id=jid, stage="compress", kind="metrics", message="", data={"layers_done": 7},
                       created_at=now - timedelta(seconds=10)))
    job = c.get(f"/v1/jobs/{jid}").json()
    assert job["state"] == "running" and job["stage"] == "compress" and job["progress"] == 0.4
    assert 290 < job["eta_seconds"] <= 300
    fetch, comp = job["stages"]
    assert fetch["name"] == "fetch" and fetch["state"] == "done" and abs(fetch["duration_s"] - 40) < 1
    assert comp["state"] == "running" and comp["progress"] == 0.25 and 170 < comp["eta_seconds"] < 190
    assert job["metrics"] == {"fetch": {"files": 3, "bytes": 9}, "layers_done": 7}
    metrics = server.client().get("/metrics").text
    assert 'nwc_job_stage_duration_seconds_count{stage="fetch"}' in metrics


def test_calibration_texts(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant(max_storage_bytes=sum(len(v) for v in tiny_model_files().values()) + 200)
    c = server.client(t.token)
    url = "/v1/calibration-texts"
    r = c.post(url, params={"name": "notes.md"}, content=b"text")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_calibration_name"
    r = c.post(url, params={"name": "bad.jsonl"}, content=b'{"text": "ok"}\n{"txt": "no"}\n')
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_calibration_text"
    assert "line 2" in r.json()["error"]["message"]
    r = c.post(url, params={"name": "bad.txt"}, content=b"\xff\xfe not utf-8")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_calibration_text"
    assert server.objects(t.id) == []
    mid = server.ready_model(t)
    # the quota leaves 200 bytes: a longer body is refused as it streams (no Content-Length), nothing kept
    r = c.post(url, params={"name": "big.txt"}, content=iter([b"x" * 150, b"y" * 150]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_quota_exceeded"
    assert r.json()["error"]["detail"] == {"max_bytes": 200}
    assert not [k for k in server.objects(t.id) if "/calibration/" in k]
    data = b'{"text": "one"}\n\n{"text": "two"}\n'
    r = c.post(url, params={"name": "good.jsonl"}, content=data)
    assert r.status_code == 201, r.text
    cal = r.json()
    assert (cal["name"], cal["size"], cal["sha256"]) == ("good.jsonl", len(data), hashlib.sha256(data).hexdigest())
    assert c.get(url).json() == [{**cal, "sha256": None}]  # listed from the store, which keeps no digest
    jid = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4, "method": "gptq",
                                   "calibration": cal["id"]}).json()["id"]
    r = c.delete(f"{url}/{cal['id']}")
    assert r.status_code == 409 and r.json()["error"]["detail"] == {"job_ids": [jid]}
    c.post(f"/v1/jobs/{jid}/cancel")
    assert c.delete(f"{url}/{cal['id']}").status_code == 204
    assert c.get(f"{url}/{cal['id']}").status_code == 404


# ----------------------------------------------------------------------------- artifacts, presigned URLs


def test_artifacts_report_and_presigned_download(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    jid = c.post("/v1/jobs", json={"model_id": server.ready_model(t), "target_bits": 4}).json()["id"]
    assert c.get(f"/v1/jobs/{jid}/report").json()["error"]["code"] == "report_not_ready"
    blob = bytes(range(256)) * 5000
    report = {"measured_bits": 4.01, "verification": {"ok": True}}
    server.finish_job(t, jid, {"bundle/model.nwc": ("bundle", blob),
                               "report.json": ("report", json.dumps(report).encode())})
    arts = c.get(f"/v1/jobs/{jid}/artifacts").json()
    assert {a["name"]: a["kind"] for a in arts} == {"bundle/model.nwc": "bundle", "report.json": "report"}
    bundle = next(a for a in arts if a["kind"] == "bundle")
    assert bundle["size"] == len(blob) and bundle["sha256"] == hashlib.sha256(blob).hexdigest()
    plain = httpx.Client(timeout=30)
    r = plain.get(bundle["url"])  # no API key: the URL is the credential
    assert r.status_code == 200 and r.content == blob
    assert "model.nwc" in r.headers["content-disposition"]
    one = c.get(f"/v1/jobs/{jid}/artifacts/{bundle['id']}").json()
    assert one["id"] == bundle["id"] and one["url"]
    assert c.get(f"/v1/jobs/{jid}/report").json() == report
    job = c.get(f"/v1/jobs/{jid}").json()
    assert job["artifact_count"] == 2 and [s["state"] for s in job["stages"]] == ["done"] * 4
    # ttl is capped by the deployment's setting
    assert c.get(f"/v1/jobs/{jid}/artifacts", params={"ttl": 0}).status_code == 422
    plain.close()


def test_presigned_urls_expire(server: ApiServer) -> None:  # noqa: F811
    t = server.new_tenant()
    c = server.client(t.token)
    jid = c.post("/v1/jobs", json={"model_id": server.ready_model(t), "target_bits": 4}).json()["id"]
    server.finish_job(t, jid)
    # 3 s, not 1: expiry is counted from the signing time truncated to the second (S3's X-Amz-Date and the
    # local token alike), so a 1 s URL may have only a few milliseconds left when first used.
    url = c.get(f"/v1/jobs/{jid}/artifacts", params={"ttl": 3}).json()[0]["url"]
    plain = httpx.Client(timeout=30)
    assert plain.get(url).status_code == 200
    time.sleep(3.2)
    r = plain.get(url)
    assert r.status_code == 403, r.text
    if server.backend == "sqlite-local":
        assert r.json()["error"]["code"] == "url_expired"
        # tampered token: refused as well
        assert plain.get(url[:-3] + "AAA").status_code == 403
    plain.close()


def test_local_store_routes(server: ApiServer) -> None:  # noqa: F811
    plain = httpx.Client(timeout=30)
    if server.backend != "sqlite-local":
        assert plain.get(f"{server.base_url}/v1/store/anything").status_code == 404
        return
    store = server.store
    key = "tenants/x/parts-test.bin"
    uid = store.create_multipart(key)
    url = store.presigned_part_url(key, uid, 1, 3)  # 3 s: see test_presigned_urls_expire
    # a part token is not a download token, and vice versa
    assert plain.get(url).status_code == 403
    r = plain.put(url, content=b"abc")
    assert r.status_code == 200 and r.headers["etag"].startswith('"')
    time.sleep(3.2)
    r = plain.put(url, content=b"abc")
    assert r.status_code == 403 and r.json()["error"]["code"] == "url_expired"
    store.abort_multipart(key, uid)
    plain.close()


# ----------------------------------------------------------------------------- ops


def test_health_ready_metrics(server: ApiServer) -> None:  # noqa: F811
    c = server.client()
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert checks["database"]["status"] == "ok" and checks["store"]["status"] == "ok"
    # the worker package is installed here: the broker checked is the one of the server's own settings
    assert checks["broker"]["status"] == "ok" and (server.settings.data_dir / "broker" / "queue").is_dir()
    text = c.get("/metrics").text
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert f'nwc_jobs{{state="{state}"}}' in text
    assert 'nwc_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert "nwc_http_request_duration_seconds_bucket" in text


def test_readyz_reports_a_broken_store(tmp_path: Path) -> None:
    from api_support import start_server

    class BrokenStore:
        def ping(self) -> None:
            from api.storage import StoreUnavailable

            raise StoreUnavailable("bucket gone")

        def __getattr__(self, name: str) -> Any:
            raise AttributeError(name)

    srv = start_server(tmp_path, "sqlite-local")
    try:
        srv.res.__dict__["store"] = BrokenStore()
        r = srv.client().get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert r.json()["checks"]["store"] == {"status": "error", "detail": "bucket gone"}
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- admin CLI, client, nwc remote


def test_admin_cli(server: ApiServer) -> None:  # noqa: F811
    runner = CliRunner()
    url = server.settings.db_url
    name = f"cli-{time.monotonic_ns()}"
    r = runner.invoke(admin_app, ["--database-url", url, "create-tenant", name, "--max-concurrent-jobs", "3"])
    assert r.exit_code == 0, r.output
    tenant_id = r.stdout.strip()
    assert tenant_id.startswith("ten_")
    r = runner.invoke(admin_app, ["--database-url", url, "create-key", "--tenant", name, "--name", "ci"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("nwc_")
    c = server.client(token)
    assert c.get("/v1/models").status_code == 200
    r = runner.invoke(admin_app, ["--database-url", url, "list-keys", "--tenant", name])
    key_id = token.split("_")[1]
    assert key_id in r.stdout and token.split("_", 2)[2] not in r.stdout
    r = runner.invoke(admin_app, ["--database-url", url, "revoke-key", key_id])
    assert r.exit_code == 0
    assert c.get("/v1/models").status_code == 401
    r = runner.invoke(admin_app, ["--database-url", url, "create-key", "--tenant", "no-such-tenant"])
    assert r.exit_code == 1 and "no tenant" in r.output
    r = runner.invoke(admin_app, ["--database-url", url, "create-tenant", name])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(admin_app, ["--database-url", url, "create-key", "--tenant", name + "-new", "--create-tenant"])
    assert r.exit_code == 0 and r.stdout.strip().startswith("nwc_")


def _model_dir(tmp: Path) -> Path:
    d = tmp / "tiny-model"
    d.mkdir()
    for name, data in tiny_model_files().items():
        (d / name).write_bytes(data)
    (d / ".hidden.json").write_text("{}")
    (d / "README.md").write_text("not uploaded")
    return d


def test_client_and_remote_cli(server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    t = server.new_tenant()
    d = _model_dir(tmp_path)
    monkeypatch.setenv("NWC_API_URL", server.base_url)
    monkeypatch.setenv("NWC_API_KEY", t.token)
    runner = CliRunner()
    r = runner.invoke(remote_app, ["submit", str(d), "--bits", "4", "--output", "bundle", "--output", "report"])
    assert r.exit_code == 0, r.output
    jid = r.stdout.strip().splitlines()[-1]
    assert jid.startswith("job_") and jid in server.dispatcher.enqueued
    with NWCClient() as nwc:
        job = nwc.get_job(jid)
        assert job.outputs == ["bundle", "report"]
        model = nwc.get_model(job.model_id)
        assert model.state == "ready" and sorted(f.path for f in model.files) == sorted(tiny_model_files())
        r = runner.invoke(remote_app, ["status", jid])
        assert r.exit_code == 0 and "queued" in r.stdout
        server.finish_job(t, jid)
        r = runner.invoke(remote_app, ["status", jid, "--json"])
        assert json.loads(r.stdout)["state"] == "succeeded"
        r = runner.invoke(remote_app, ["download", jid, "-o", str(tmp_path / "out")])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "out" / "bundle" / "model.nwc").is_file()
        assert json.loads((tmp_path / "out" / "report.json").read_text())["measured_bits"] == 4.01
        assert nwc.get_report(jid)["measured_bits"] == 4.01
        # a corrupted artifact is caught by the sha256 check and leaves no file behind
        with server.db() as s:
            art = s.scalars(select(Artifact).where(Artifact.job_id == jid, Artifact.name == "report.json")).one()
            server.store.put_stream(art.key, b'{"tampered": true}')
        with pytest.raises(ChecksumError):
            nwc.download_artifacts(jid, tmp_path / "again", kinds=["report"])
        assert not list((tmp_path / "again").rglob("*.part")) and not (tmp_path / "again" / "report.json").exists()
        with pytest.raises(ApiError) as e:
            nwc.get_job("job_nope")
        assert e.value.status == 404 and e.value.code == "not_found" and e.value.request_id
        assert [j.id for j in nwc.iter_jobs()] == [jid]
    r = runner.invoke(remote_app, ["status", "job_missing"])
    assert r.exit_code == 1 and "404 not_found" in r.output

"""Unversioned operational endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.deps import ResourcesDep
from api.metrics import CONTENT_TYPE
from api.services import health

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness: the process answers",
            responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database, broker and object store",
    description="503 when the database or the store fails, or the broker fails; a broker that cannot be checked "
    "(no worker package installed) is reported as `unknown` and does not fail readiness.",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready", "checks": {
            "database": {"status": "ok"}, "broker": {"status": "ok"}, "store": {"status": "ok"}}}}}},
        503: {"content": {"application/json": {"example": {"status": "not_ready", "checks": {
            "database": {"status": "ok"}, "broker": {"status": "error", "detail": "ConnectionError: …"},
            "store": {"status": "ok"}}}}}},
    },
)
def readyz(res: ResourcesDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    for name, (status, detail) in (
        ("database", health.check_database(res.engine)),
        ("broker", health.check_broker(res.settings)),
        ("store", health.check_store(res.store)),
    ):
        checks[name] = {"status": status} | ({"detail": detail} if detail else {})
    ok = all(c["status"] in ("ok", "unknown") for c in checks.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"example": 'nwc_jobs{state="running"} 2.0\n'}}}})
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

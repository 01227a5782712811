"""/v1/jobs: create, list, inspect, cancel, retry, delete; artifacts and the evaluation report."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select

from api.db.models import Artifact, ArtifactKind
from api.db.scoping import get_for_tenant
from api.db.types import utcnow
from api.deps import DbDep, DispatcherDep, PrincipalDep, ResourcesDep
from api.errors import ApiError, error_responses
from api.schemas.common import Page
from api.schemas.jobs import ArtifactOut, EventOut, JobCreate, JobDetail, JobOut, JobStateName, Method
from api.services import jobs as svc
from api.services.pagination import DEFAULT_LIMIT, MAX_LIMIT
from api.storage import ObjectNotFound, ObjectStore, read_all

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_REPORT_BYTES = 64 << 20
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
        description="Repeat a create safely: the same key with the same body returns the job created first "
        "(200); the same key with another body is a 409.",
        examples=["release-2026-11-23-smollm2-4bit"],
    ),
]


@router.post(
    "", status_code=201, response_model=JobDetail, responses=error_responses(401, 404, 409, 422, 429, 503),
    summary="Create a compression job",
    description="Validates the request, checks the tenant's limits (concurrent jobs, storage) and queues the job. "
    "201 with the new job; 200 with the existing one when an Idempotency-Key is repeated with the same body.",
)
def create_job(
    body: JobCreate, response: Response, principal: PrincipalDep, db: DbDep, res: ResourcesDep,
    dispatcher: DispatcherDep, idempotency_key: IdempotencyKey = None,
) -> JobDetail:
    job, created = svc.create_job(db, res.store, res.settings, dispatcher, principal.tenant_id, body,
                                  idempotency_key)
    if not created:
        response.status_code = 200
    return svc.job_detail(db, job)


@router.get("", response_model=Page[JobOut], responses=error_responses(401, 422), summary="List jobs")
def list_jobs(
    principal: PrincipalDep,
    db: DbDep,
    state: JobStateName | None = None,
    model_id: str | None = None,
    method: Method | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[JobOut]:
    items, nxt = svc.list_jobs(db, principal.tenant_id, state=state, model_id=model_id, method=method,
                               cursor=cursor, limit=limit)
    return Page[JobOut](items=items, next_cursor=nxt)


@router.get("/{job_id}", response_model=JobDetail, responses=error_responses(401, 404),
            summary="A job: state, stage, per-stage progress and ETA, metrics so far")
def get_job(job_id: str, principal: PrincipalDep, db: DbDep) -> Response:
    # The hot path of status polling: serialized once here, not validated again against the response model.
    detail = svc.job_detail(db, svc.get_job(db, principal.tenant_id, job_id))
    return Response(detail.model_dump_json(), media_type="application/json")


@router.get("/{job_id}/events", response_model=list[EventOut], responses=error_responses(401, 404),
            summary="A job's events in order (pass the last id seen as `after` to follow)")
def list_events(
    job_id: str, principal: PrincipalDep, db: DbDep, after: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[EventOut]:
    return svc.list_events(db, principal.tenant_id, job_id, after, limit)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(401, 404, 409),
             summary="Cancel a queued or running job")
def cancel_job(job_id: str, principal: PrincipalDep, db: DbDep, dispatcher: DispatcherDep) -> JobOut:
    return svc.job_out(svc.cancel_job(db, dispatcher, principal.tenant_id, job_id))


@router.post("/{job_id}/retry", response_model=JobOut, responses=error_responses(401, 404, 409, 429, 503),
             summary="Queue a failed or cancelled job again")
def retry_job(
    job_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep, dispatcher: DispatcherDep
) -> JobOut:
    return svc.job_out(svc.retry_job(db, res.store, res.settings, dispatcher, principal.tenant_id, job_id))


@router.delete("/{job_id}", status_code=204, responses=error_responses(401, 404, 409),
               summary="Delete a finished job, its events and its artifacts (also from the object store)")
def delete_job(job_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Response:
    svc.delete_job(db, res.store, principal.tenant_id, job_id)
    return Response(status_code=204)


def _artifact_out(store: ObjectStore, a: Artifact, ttl: int) -> ArtifactOut:
    return ArtifactOut(
        id=a.id, kind=str(a.kind), name=a.name, size=a.size, sha256=a.sha256,  # type: ignore[arg-type]
        created_at=a.created_at, url=store.presigned_get(a.key, ttl, download_name=a.name),
        url_expires_at=utcnow() + timedelta(seconds=ttl),
    )


def _ttl(res: ResourcesDep, ttl: int | None) -> int:
    return min(ttl or res.settings.presign_ttl_seconds, res.settings.presign_ttl_seconds)


TtlQuery = Annotated[int | None, Query(ge=1, description="URL lifetime in seconds (at most the deployment's "
                                       "NWC_PRESIGN_TTL_SECONDS, which is also the default)")]


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=error_responses(401, 404),
            summary="A job's artifacts with sizes, sha256 and short-lived download URLs")
def list_artifacts(
    job_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep, ttl: TtlQuery = None
) -> list[ArtifactOut]:
    job = svc.get_job(db, principal.tenant_id, job_id)
    seconds = _ttl(res, ttl)
    return [_artifact_out(res.store, a, seconds) for a in job.artifacts]


@router.get("/{job_id}/artifacts/{artifact_id}", response_model=ArtifactOut, responses=error_responses(401, 404),
            summary="One artifact with a fresh download URL")
def get_artifact(
    job_id: str, artifact_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep, ttl: TtlQuery = None
) -> ArtifactOut:
    svc.get_job(db, principal.tenant_id, job_id)
    a = get_for_tenant(db, Artifact, principal.tenant_id, artifact_id)
    if a.job_id != job_id:
        raise ApiError(404, "not_found", f"artifact {artifact_id!r} not found")
    return _artifact_out(res.store, a, _ttl(res, ttl))


@router.get(
    "/{job_id}/report", response_model=dict[str, Any], responses=error_responses(401, 404),
    summary="The job's evaluation report (report.json) as JSON",
)
def get_report(job_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Any:
    job = svc.get_job(db, principal.tenant_id, job_id)
    art = db.scalars(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == ArtifactKind.REPORT)
        .order_by(Artifact.created_at.desc())
    ).first()
    if art is None:
        raise ApiError(404, "report_not_ready", f"job {job.id} has no report yet (state: {job.state})")
    if art.size > MAX_REPORT_BYTES:
        raise ApiError(409, "report_too_large", "the report is too large to return inline; download the artifact")
    try:
        data = read_all(res.store, art.key, MAX_REPORT_BYTES + 1)
    except ObjectNotFound:
        raise ApiError(404, "report_not_ready", f"the report object of job {job.id} is missing") from None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(500, "report_unreadable", f"the stored report is not JSON: {e}") from None

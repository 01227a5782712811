"""/v1/calibration-texts: text a tenant uploads to calibrate its jobs (`calibration: "cal_…"`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.db.models import Job
from api.deps import DbDep, PrincipalDep, ResourcesDep
from api.errors import ApiError, error_responses
from api.routes.models import RAW_BODY
from api.schemas.jobs import CalibrationOut
from api.services import calibration as svc
from api.services import keys
from api.services.models import discard
from api.services.streams import content_length, receive_body
from api.services.usage import ACTIVE_JOB_STATES, storage_left

router = APIRouter(prefix="/v1/calibration-texts", tags=["calibration"])


@router.post(
    "", status_code=201, response_model=CalibrationOut, responses=error_responses(401, 413, 422),
    openapi_extra=RAW_BODY, summary="Upload a calibration text (.txt, or .jsonl with a \"text\" field per line)",
    description=f"Streamed to the object store; at most {svc.MAX_CALIBRATION_BYTES >> 20} MiB of UTF-8. Use the "
    "returned id as a job's `calibration`.",
)
async def upload_calibration(
    request: Request, principal: PrincipalDep, db: DbDep, res: ResourcesDep,
    name: Annotated[str, Query(description="File name ending in .txt or .jsonl", examples=["tickets.jsonl"])],
) -> CalibrationOut:
    svc.check_name(name)
    store = res.store
    quota_left = await run_in_threadpool(storage_left, db, store, res.settings, principal.tenant_id)
    max_bytes = min(svc.MAX_CALIBRATION_BYTES, quota_left)
    too_large = ApiError(413, "upload_too_large" if max_bytes == svc.MAX_CALIBRATION_BYTES
                         else "storage_quota_exceeded", f"{name}: over the limit of {max(max_bytes, 0)} bytes",
                         {"max_bytes": max(max_bytes, 0)})
    declared = content_length(request)
    if max_bytes <= 0 or (declared is not None and declared > max_bytes):
        raise too_large
    cal_id = svc.new_calibration_id()
    key = keys.calibration_key(principal.tenant_id, cal_id, name)
    result = await receive_body(request, store, key, max_bytes, too_large)
    try:
        await run_in_threadpool(svc.check_text, store, key, name)
    except BaseException:
        await run_in_threadpool(discard, store, key)
        raise
    return svc.to_out(result)


@router.get("", response_model=list[CalibrationOut], responses=error_responses(401),
            summary="List calibration texts")
def list_calibration(principal: PrincipalDep, res: ResourcesDep) -> list[CalibrationOut]:
    return svc.list_calibration(res.store, principal.tenant_id)


@router.get("/{calibration_id}", response_model=CalibrationOut, responses=error_responses(401, 404),
            summary="One calibration text")
def get_calibration(calibration_id: str, principal: PrincipalDep, res: ResourcesDep) -> CalibrationOut:
    return svc.to_out(svc.find_calibration(res.store, principal.tenant_id, calibration_id))


@router.delete("/{calibration_id}", status_code=204, responses=error_responses(401, 404, 409),
               summary="Delete a calibration text (refused while a queued or running job uses it)")
def delete_calibration(calibration_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Response:
    obj = svc.find_calibration(res.store, principal.tenant_id, calibration_id)
    active = db.scalars(
        select(Job).where(Job.tenant_id == principal.tenant_id, Job.state.in_(ACTIVE_JOB_STATES))
    ).all()
    users = [j.id for j in active if (j.options or {}).get("calibration") == calibration_id]
    if users:
        raise ApiError(409, "calibration_in_use", "queued or running jobs use this text", {"job_ids": users})
    res.store.delete(obj.key)
    return Response(status_code=204)

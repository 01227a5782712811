"""/v1/models: create, stream files in (single request or multipart), finalize, import from the Hub."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import DbDep, PrincipalDep, ResourcesDep
from api.errors import error_responses
from api.logs import bind
from api.schemas.common import Page
from api.schemas.models import (
    HubImport,
    ModelCreate,
    ModelDetail,
    ModelFileOut,
    ModelOut,
    PartUrlsOut,
    PartUrlsRequest,
    UploadComplete,
    UploadCreate,
    UploadOut,
)
from api.services import hub
from api.services import models as svc
from api.services.pagination import DEFAULT_LIMIT, MAX_LIMIT
from api.services.streams import content_length, receive_body

router = APIRouter(prefix="/v1/models", tags=["models"])

RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes, streamed (Content-Length recommended; chunked encoding accepted).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("", status_code=201, response_model=ModelOut, responses=error_responses(401, 422),
             summary="Create a model to upload files into")
def create_model(body: ModelCreate, principal: PrincipalDep, db: DbDep) -> ModelOut:
    m = svc.create_model(db, principal.tenant_id, body.name)
    bind(model_id=m.id)
    return svc.to_out(m, 0)


@router.post(
    "/import", status_code=202, response_model=ModelOut,
    responses=error_responses(401, 403, 404, 413, 422, 502, 503),
    summary="Import a model from the Hugging Face Hub by id and revision",
    description="Checks the repository now (revision, gating, safetensors weights, config.json without custom "
    "code, sizes) and answers 202 with the model in state `importing`; the download continues in the "
    "background and the model becomes `ready` or `failed` (with `error`). Poll GET /v1/models/{id}.",
)
def import_model(
    body: HubImport, background: BackgroundTasks, principal: PrincipalDep, db: DbDep, res: ResourcesDep
) -> ModelOut:
    tmp_root = res.settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    m, plan = hub.plan_import(db, res.store, res.settings, principal.tenant_id, body, tmp_root)
    bind(model_id=m.id)
    background.add_task(hub.run_import, res.session_factory, res.store, res.settings, principal.tenant_id, m.id,
                        plan, tmp_root)
    return svc.to_out(m, 0)


@router.get("", response_model=Page[ModelOut], responses=error_responses(401, 422), summary="List models")
def list_models(
    principal: PrincipalDep,
    db: DbDep,
    state: Literal["uploading", "importing", "ready", "failed"] | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[ModelOut]:
    items, nxt = svc.list_models(db, principal.tenant_id, state=state, cursor=cursor, limit=limit)
    return Page[ModelOut](items=items, next_cursor=nxt)


@router.get("/{model_id}", response_model=ModelDetail, responses=error_responses(401, 404),
            summary="A model with its files and parameter count")
def get_model(model_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> ModelDetail:
    return svc.to_detail(svc.get_model(db, principal.tenant_id, model_id), res.store)


@router.delete("/{model_id}", status_code=204, responses=error_responses(401, 404, 409),
               summary="Delete a model and its files (refused while jobs use it)")
def delete_model(model_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Response:
    svc.delete_model(db, res.store, principal.tenant_id, model_id)
    return Response(status_code=204)


@router.put(
    "/{model_id}/files/{path:path}",
    status_code=201,
    response_model=ModelFileOut,
    responses=error_responses(400, 401, 404, 409, 413, 422),
    openapi_extra=RAW_BODY,
    summary="Upload one file (streamed to the object store)",
    description="The body is streamed to the object store, never held in memory, and refused with 413 past the "
    "size limit (weights: NWC_UPLOAD_MAX_BYTES; other files: 64 MiB; and the tenant's storage quota). The file "
    "is validated on arrival: names are sanitized, pickle files refused, safetensors headers checked against "
    "the file size, config JSON parsed and models needing trust_remote_code refused. A refused file leaves "
    "nothing behind. Uploading a name again replaces the file. For files over a few GiB use multipart uploads.",
)
async def upload_file(
    model_id: str, path: str, request: Request, principal: PrincipalDep, db: DbDep, res: ResourcesDep
) -> ModelFileOut:
    bind(model_id=model_id)
    store = res.store
    plan = await run_in_threadpool(svc.plan_upload, db, store, res.settings, principal.tenant_id, model_id, path,
                                   content_length(request))
    result = await receive_body(request, store, plan.key, plan.max_bytes, plan.too_large())
    try:
        await run_in_threadpool(svc.validate_stored, store, plan.path, plan.key, result.size)
        row = await run_in_threadpool(svc.record_file, db, store, plan, result)
    except BaseException:
        await run_in_threadpool(svc.discard, store, plan.key)
        raise
    return ModelFileOut.model_validate(row)


@router.delete("/{model_id}/files/{path:path}", status_code=204, responses=error_responses(401, 404, 409),
               summary="Remove a file from a model that is still being uploaded")
def delete_file(model_id: str, path: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Response:
    svc.delete_file(db, res.store, principal.tenant_id, model_id, path)
    return Response(status_code=204)


@router.post(
    "/{model_id}/finalize", response_model=ModelDetail, responses=error_responses(401, 404, 409, 422),
    summary="Check the uploaded directory and make the model ready",
    description="Needs at least one .safetensors file and a top-level config.json; a shard index must name only "
    "uploaded shards, and no multipart upload may be open. On a 422 nothing changes: upload what is missing "
    "and finalize again.",
)
def finalize_model(model_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> ModelDetail:
    bind(model_id=model_id)
    return svc.to_detail(svc.finalize(db, res.store, principal.tenant_id, model_id), res.store)


@router.post(
    "/{model_id}/uploads", status_code=201, response_model=UploadOut,
    responses=error_responses(400, 401, 404, 409, 413, 422),
    summary="Start a resumable multipart upload of one big file",
    description="Then ask for presigned part URLs (any time, as often as needed: an interrupted upload resumes "
    "by re-sending the missing parts), PUT each part's bytes to its URL, keep each response's ETag, and "
    "complete with the list of (part_number, etag).",
)
def create_upload(
    model_id: str, body: UploadCreate, principal: PrincipalDep, db: DbDep, res: ResourcesDep
) -> UploadOut:
    bind(model_id=model_id)
    return svc.create_upload(db, res.store, res.settings, principal.tenant_id, model_id, body)


@router.get("/{model_id}/uploads/{upload_id}", response_model=UploadOut, responses=error_responses(401, 404),
            summary="An open multipart upload (to resume it: its part size and count)")
def get_upload(model_id: str, upload_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> UploadOut:
    return svc.get_upload(db, res.store, principal.tenant_id, model_id, upload_id)


@router.post("/{model_id}/uploads/{upload_id}/parts", response_model=PartUrlsOut,
             responses=error_responses(401, 404, 409, 422), summary="Presigned URLs for parts of an upload")
def part_urls(
    model_id: str, upload_id: str, body: PartUrlsRequest, principal: PrincipalDep, db: DbDep, res: ResourcesDep
) -> PartUrlsOut:
    return svc.part_urls(db, res.store, res.settings, principal.tenant_id, model_id, upload_id, body.part_numbers)


@router.post("/{model_id}/uploads/{upload_id}/complete", status_code=201, response_model=ModelFileOut,
             responses=error_responses(401, 404, 409, 413, 422),
             summary="Assemble the parts, validate the file and add it to the model")
def complete_upload(
    model_id: str, upload_id: str, body: UploadComplete, principal: PrincipalDep, db: DbDep, res: ResourcesDep
) -> ModelFileOut:
    bind(model_id=model_id)
    row = svc.complete_upload(db, res.store, principal.tenant_id, model_id, upload_id, body)
    return ModelFileOut.model_validate(row)


@router.delete("/{model_id}/uploads/{upload_id}", status_code=204, responses=error_responses(401, 404),
               summary="Abort a multipart upload and drop its parts")
def abort_upload(model_id: str, upload_id: str, principal: PrincipalDep, db: DbDep, res: ResourcesDep) -> Response:
    svc.abort_upload(db, res.store, principal.tenant_id, model_id, upload_id)
    return Response(status_code=204)

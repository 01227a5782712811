"""/v1/store/{token}: what the local object store's presigned URLs point at (embedded mode).

The token is the credential (HMAC-signed by the store, expiring), so these routes take no API
key. With the S3 backend presigned URLs point at S3 itself and these routes answer 404.
"""

from __future__ import annotations

from functools import partial

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import ResourcesDep
from api.errors import ApiError, error_responses
from api.routes.models import RAW_BODY
from api.services.streams import SyncBody
from api.storage import LocalStore, ObjectNotFound, UploadNotFound
from api.storage.base import CHUNK, InvalidPart, content_disposition

router = APIRouter(prefix="/v1/store", tags=["store"])

__all__ = ["router"]


def _local(res: ResourcesDep) -> LocalStore:
    store = res.store
    if not isinstance(store, LocalStore):
        raise ApiError(404, "not_found", "this deployment's presigned URLs point at its S3 store, not here")
    return store


@router.get(
    "/{token}", responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(403, 404)},
    response_class=StreamingResponse,
    summary="Download through a presigned URL (local store)",
)
def download(token: str, res: ResourcesDep) -> StreamingResponse:
    store = _local(res)
    grant = store.verify(token, "get")
    try:
        size = store.size(grant.key)
        f = store.open(grant.key)
    except ObjectNotFound:
        raise ApiError(404, "not_found", "the object behind this URL no longer exists") from None

    def chunks():
        try:
            while chunk := f.read(CHUNK):
                yield chunk
        finally:
            f.close()

    headers = {"Content-Length": str(size), "Cache-Control": "private, no-store"}
    if grant.download_name:
        headers["Content-Disposition"] = content_disposition(grant.download_name)
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


@router.put(
    "/{token}", responses={200: {"description": "Part stored; its ETag is in the ETag header"},
                           **error_responses(403, 404, 413)},
    openapi_extra=RAW_BODY, summary="Upload one multipart part through a presigned URL (local store)",
)
async def upload_part(token: str, request: Request, res: ResourcesDep) -> Response:
    store = _local(res)
    await run_in_threadpool(store.verify, token, "put_part")  # refuse before reading the body
    body = SyncBody(request.stream())
    try:
        etag = await anyio.to_thread.run_sync(partial(store.put_part_by_token, token, body))
    except UploadNotFound:
        raise ApiError(404, "not_found", "this multipart upload was completed or aborted") from None
    except InvalidPart as e:
        raise ApiError(422, "invalid_part", str(e)) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the part upload was interrupted") from None
    return Response(status_code=200, headers={"ETag": etag})

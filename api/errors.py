"""One error shape for every failure: ``{"error": {"code", "message", "detail"}}``.

Routes and services raise ApiError (or one of the domain exceptions mapped below); the handlers
installed by install_error_handlers turn everything, including FastAPI's own validation errors
and unexpected exceptions, into that body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import AuthError
from api.db.scoping import NotFound
from api.schemas.common import ErrorResponse
from api.storage import AccessDenied, InvalidKey, StoreUnavailable, TokenExpired

__all__ = [
    "ApiError",
    "Unauthorized",
    "error_body",
    "install_error_handlers",
    "error_responses",
]

log = logging.getLogger("nwc.api")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "limit_exceeded",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An HTTP error with a stable code; `detail` is any JSON-able extra information."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


class Unauthorized(ApiError):
    def __init__(self, message: str = "missing or invalid API key: send 'Authorization: Bearer nwc_…'") -> None:
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": jsonable_encoder(detail)}}


def _response(status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None):
    return JSONResponse(error_body(code, message, detail), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(NotFound)
    async def _not_found(_req: Request, exc: NotFound) -> JSONResponse:
        return _response(404, "not_found", str(exc))

    @app.exception_handler(AuthError)
    async def _auth(_req: Request, _exc: AuthError) -> JSONResponse:
        e = Unauthorized()
        return _response(e.status, e.code, e.message, headers=e.headers)

    @app.exception_handler(TokenExpired)
    async def _expired(_req: Request, exc: TokenExpired) -> JSONResponse:
        return _response(403, "url_expired", "this presigned URL has expired: ask the API for a new one")

    @app.exception_handler(AccessDenied)
    async def _denied(_req: Request, exc: AccessDenied) -> JSONResponse:
        return _response(403, "forbidden", f"presigned URL rejected: {exc}")

    @app.exception_handler(InvalidKey)
    async def _bad_key(_req: Request, exc: InvalidKey) -> JSONResponse:
        return _response(400, "invalid_path", str(exc))

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_req: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("object store unavailable: %s", exc)
        return _response(503, "store_unavailable", "the object store cannot be reached; try again later")

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
        return _response(422, "validation_error", f"invalid request: {where}: {first['msg']}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        return _response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return _response(500, "internal_error", "internal server error; the request id identifies it in the logs")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error body for these statuses."""
    descriptions = {
        400: "Bad request (e.g. an unsafe file name)",
        401: "Missing or invalid API key",
        403: "Forbidden (presigned URL expired or forged; gated Hub model without access)",
        404: "Not found (also for ids that belong to another tenant)",
        409: "Conflict with the current state",
        413: "Too large (upload size limit or storage quota)",
        422: "Validation failed",
        429: "A per-tenant limit was reached",
        503: "A dependency (queue, object store, Hub) is unavailable",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}

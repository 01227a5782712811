"""Structured JSON logs with the request id (and job id where a request or task concerns one).

The ids live in context variables: the request-id middleware sets `request_id` for the whole
request, routes call bind(job_id=...) once they know the job, and every record logged meanwhile
carries them. One JSON object per line on stderr.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "JsonFormatter",
    "RequestIdMiddleware",
    "bind",
    "bound",
    "configure_logging",
    "REQUEST_ID_HEADER",
]

REQUEST_ID_HEADER = "X-Request-ID"
# One mutable dict per request (or task): a route running in a worker thread binds ids into the same
# dict the middleware created, so they also reach the access-log record written after the response.
_ctx: ContextVar[dict[str, str] | None] = ContextVar("nwc_log_ctx", default=None)
# A client-supplied request id is echoed only when it is short and plain (it ends up in logs).
_RID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Attributes every LogRecord has; anything else passed via `extra=` goes into the JSON object.
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

access_log = logging.getLogger("nwc.api.access")


def bind(**fields: str | None) -> None:
    """Attach ids (job_id, model_id, tenant_id) to every log record of the current request or task."""
    ctx = _ctx.get()
    if ctx is None:
        ctx = {}
        _ctx.set(ctx)
    ctx.update({k: v for k, v in fields.items() if v is not None})


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """A fresh log context for a block (background tasks, worker code), with these ids, restored after."""
    parent = _ctx.get() or {}
    tok = _ctx.set({**parent, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _ctx.reset(tok)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_ctx.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: int | str = logging.INFO, stream: Any = None) -> None:
    """JSON lines on stderr for the `nwc` loggers (idempotent; leaves other loggers alone)."""
    logger = logging.getLogger("nwc")
    for h in list(logger.handlers):
        if getattr(h, "_nwc_json", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._nwc_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class RequestIdMiddleware:
    """Pure ASGI (no body buffering, streaming untouched): request id in, out, and in every log record.

    Also writes one access-log record per request with method, route, status and duration.
    """

    def __init__(self, app: ASGIApp, on_response: Any = None) -> None:
        self.app = app
        self.on_response = on_response  # callable(scope, status, seconds): the metrics hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _RID_RE.match(candidate):
                    rid = candidate
                break
        rid = rid or uuid.uuid4().hex
        tok = _ctx.set({"request_id": rid})
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path_template = getattr(route, "path", None) or "unmatched"
            if self.on_response is not None:
                self.on_response(scope["method"], path_template, status, elapsed)
            if path_template not in ("/healthz", "/metrics"):
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    scope.get("path", ""),
                    status,
                    extra={"method": scope["method"], "route": path_template, "status": status,
                           "duration_ms": round(elapsed * 1000, 2)},
                )
            _ctx.reset(tok)

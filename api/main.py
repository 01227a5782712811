"""The FastAPI application: `uvicorn api.main:app`, or create_app(settings, ...) to build one explicitly.

Everything under /v1 needs an API key (`Authorization: Bearer nwc_…`) and is scoped to its tenant;
/healthz, /readyz and /metrics are unversioned and open (keep /metrics off the public network);
/v1/store/{token} is authorized by the signed token it carries. The web dashboard (/ui, api/dashboard/) is a
client of the /v1 routes like any other: its pages call them from the browser with the user's key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import make_url
from starlette.concurrency import run_in_threadpool

from api import dashboard
from api.core.config import Settings, get_settings
from api.deps import Resources
from api.errors import install_error_handlers
from api.logs import RequestIdMiddleware, configure_logging
from api.metrics import ApiMetrics
from api.routes import calibration as calibration_routes
from api.routes import jobs as jobs_routes
from api.routes import models as models_routes
from api.routes import ops as ops_routes
from api.routes import store as store_routes
from api.services.dispatch import Dispatcher
from api.storage import ObjectStore

__all__ = ["create_app", "app", "API_VERSION"]

API_VERSION = "1.0.0"

DESCRIPTION = """
Compression as a service for neural-network weights (NWC, GPTQ, RTN).

**Flow.** Bring a model (upload its safetensors shards and config/tokenizer files, or import it from the
Hugging Face Hub), create a job (method, target bits, calibration, outputs), poll it, then download its
artifacts through short-lived presigned URLs.

**Auth.** Every `/v1` route needs `Authorization: Bearer <API key>`. Keys belong to a tenant; every id is
scoped to it, and another tenant's id answers 404 exactly like a missing one.

**Errors.** Every 4xx/5xx body is `{"error": {"code": "...", "message": "...", "detail": ...}}`; `code` is
stable, `message` is for people. Each response carries an `X-Request-ID` header (send your own to
correlate logs).
"""

TAGS = [
    {"name": "models", "description": "Upload or import the weights to compress."},
    {"name": "jobs", "description": "Compression jobs, their progress, artifacts and reports."},
    {"name": "calibration", "description": "Your own calibration text for Hessian-guided compression."},
    {"name": "store", "description": "Presigned URLs of the embedded (local) object store."},
    {"name": "ops", "description": "Health, readiness and Prometheus metrics."},
]


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_app(
    settings: Settings | None = None,
    *,
    store: ObjectStore | None = None,
    dispatcher: Dispatcher | None = None,
    migrate: bool | None = None,
    configure_logs: bool = True,
) -> FastAPI:
    """An app over `settings` (default: the environment).

    `store` / `dispatcher` replace the configured object store / the worker dispatcher (tests);
    `migrate` runs the database migrations at start-up (default: only for SQLite, i.e. embedded
    mode; production runs `nwc db upgrade` once per deployment instead).
    """
    settings = settings or get_settings()
    resources = Resources(settings, store=store, dispatcher=dispatcher)
    run_migrations = _is_sqlite(settings.db_url) if migrate is None else migrate

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if configure_logs:
            configure_logging()
        if run_migrations:
            from api.db.migrate import upgrade

            await run_in_threadpool(upgrade, settings.db_url)
        try:
            yield
        finally:
            resources.close()

    app = FastAPI(
        title="NWC compression service",
        version=API_VERSION,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.resources = resources
    app.state.metrics = ApiMetrics(resources)
    install_error_handlers(app)
    for module in (models_routes, jobs_routes, calibration_routes, store_routes, ops_routes):
        app.include_router(module.router)
    dashboard.install(app)  # /ui: pages whose scripts call the /v1 routes above with the user's key
    app.add_middleware(RequestIdMiddleware, on_response=app.state.metrics.observe_request)
    return app


app = create_app()

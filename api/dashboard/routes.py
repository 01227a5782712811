"""Routes of the dashboard: the page shells, its static files and the vendored Plotly.js."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.core.config import Settings
from api.schemas.jobs import METHOD_BITS, MODEL_FREE_METHODS, PRUNE_METHODS

__all__ = ["install", "router", "PAGES"]

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)

# path -> (template, title); the fast test walks this table.
PAGES = {
    "/ui/": ("jobs.html", "Jobs"),
    "/ui/signin": ("signin.html", "Sign in"),
    "/ui/models": ("models.html", "Models"),
    "/ui/jobs/new": ("new_job.html", "New job"),
}


@lru_cache(maxsize=1)
def _plotly() -> tuple[Path, str]:
    """plotly.min.js inside the installed `plotly` package (a project dependency) and its version."""
    import plotly

    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise RuntimeError(f"plotly {plotly.__version__} has no package_data/plotly.min.js")
    return path, plotly.__version__


def _csp(settings: Settings) -> str:
    """Scripts only from this origin (an injected inline script cannot read the key from sessionStorage).
    Part uploads go to the presigned URLs: this origin with the local store, the S3 endpoint with S3."""
    connect = ["'self'"]
    if settings.store_backend == "s3":
        endpoint = settings.s3_presign_endpoint_url or settings.s3_endpoint_url
        if endpoint:
            u = urlsplit(endpoint)
            connect.append(f"{u.scheme}://{u.netloc}")
        else:  # AWS: bucket-specific host names
            connect.append("https:")
    # Plotly sets inline styles on the elements it draws, hence 'unsafe-inline' for styles only.
    return ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            f"connect-src {' '.join(connect)}; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


def _render(request: Request, template: str, title: str, **context: Any) -> Response:
    settings: Settings = request.app.state.resources.settings
    _, plotly_version = _plotly()
    resp = templates.TemplateResponse(
        request, template,
        {"title": title, "plotly_url": f"/ui/static/vendor/plotly.min.js?v={plotly_version}",
         "method_bits": json.dumps(METHOD_BITS), "prune_methods": json.dumps(PRUNE_METHODS),
         "model_free_methods": json.dumps(MODEL_FREE_METHODS), **context},
    )
    resp.headers["Content-Security-Policy"] = _csp(settings)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"  # never leak page addresses to the object store
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def _page(template: str, title: str):
    def view(request: Request) -> Response:
        return _render(request, template, title)

    return view


for _path, (_template, _title) in PAGES.items():
    router.add_api_route(_path.removeprefix("/ui"), _page(_template, _title), methods=["GET"],
                         response_class=Response, name=f"ui:{_template}")


@router.get("/jobs", response_class=RedirectResponse)
def jobs_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/jobs/{job_id}", response_class=Response)
def job_page(job_id: str, request: Request) -> Response:
    return _render(request, "job.html", "Job", job_id=job_id)


@router.get("/static/vendor/plotly.min.js", response_class=FileResponse)
def plotly_js() -> FileResponse:
    path, _ = _plotly()
    # Versioned URL (?v=), so browsers may keep it: 4.8 MB that only changes with the plotly package.
    return FileResponse(path, media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=604800, immutable"})


class _RevalidatedStatic(StaticFiles):
    """The dashboard's own files: always revalidated (ETag), so an upgrade never runs stale scripts."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        resp = super().file_response(*args, **kwargs)
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp


def install(app: FastAPI) -> None:
    """Mount the dashboard on `app`: /ui pages, /ui/static files; / and /ui redirect to /ui/."""

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.include_router(router)  # before the mount: /ui/static/vendor/... is a route, the rest are files
    app.mount("/ui/static", _RevalidatedStatic(directory=HERE / "static"), name="ui-static")

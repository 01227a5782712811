"""Import a model from the Hugging Face Hub (or a Hub-compatible endpoint) by id and revision.

In the request (so a bad import is refused with a 4xx before anything is stored): resolve the
revision to a commit and list the files (HfApi.model_info), refuse gated models without a token,
pickle-only repos and repos without config.json, fetch config.json and refuse trust_remote_code,
check sizes against the limits. Then a background task downloads the accepted files one at a
time (hf_hub_download, pinned to the resolved commit, so at most one file sits on local disk),
validates each like an upload, streams it into the object store and finally marks the model
ready, or failed with the reason after deleting whatever it had stored.

The caller's token is used for this import only and never written anywhere. Without one the
server passes token=False, so its own Hugging Face credentials (HF_TOKEN, a saved login) are
never used on a tenant's behalf.

That is also why the download runs in the API process and not as a worker task: a task's arguments
sit in the broker (Redis, or files in embedded mode), and the token must not. The price is that an
API process that dies mid-import cannot finish it; so the import touches its model row every
`lease_heartbeat_seconds`, and the workers' reaper fails an import silent for `lease_seconds`
(`fail_interrupted_imports`) and deletes what it had stored: the user sees a clear error and imports
again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.core.config import Settings
from api.db.models import Model, ModelFile, ModelSource, ModelState
from api.db.types import utcnow
from api.errors import ApiError
from api.logs import bound
from api.schemas.models import MODEL_FILE_SUFFIXES, PICKLE_SUFFIXES, HubImport
from api.services import keys
from api.services.models import check_directory, discard_prefix
from api.services.usage import storage_left
from api.services.validation import (
    MAX_JSON_READ,
    check_content,
    check_json_file,
    is_safetensors,
    max_bytes_for,
    sanitize_path,
)
from api.storage import ObjectStore

__all__ = ["ImportPlan", "plan_import", "run_import", "fail_interrupted_imports"]

log = logging.getLogger("nwc.api.hub")


@dataclass
class ImportPlan:
    hub_id: str
    commit: str
    endpoint: str | None
    token: str | bool = field(repr=False)
    files: list[tuple[str, int | None]]  # (path, size)


def _hub_error(e: Exception, hub_id: str, revision: str, has_token: bool) -> ApiError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        hint = "your token has not been granted access to it" if has_token else "pass `token` with a Hugging Face " \
            "token that has been granted access"
        return ApiError(403, "hub_gated", f"{hub_id} is a gated model on the Hub: {hint}")
    if isinstance(e, RevisionNotFoundError):
        return ApiError(404, "hub_revision_not_found", f"{hub_id} has no revision {revision!r} on the Hub")
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if has_token else " (for a private model, pass `token`)"
        return ApiError(404, "hub_model_not_found", f"{hub_id} was not found on the Hub{hint}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return ApiError(403, "hub_access_denied", f"the Hub refused access to {hub_id} (HTTP {status}); "
                            "check the token")
        return ApiError(502, "hub_error", f"the Hub answered HTTP {status} for {hub_id}")
    return ApiError(503, "hub_unavailable", f"the Hub could not be reached: {type(e).__name__}: {e}")


def plan_import(db: Session, store: ObjectStore, settings: Settings, tenant_id: str, body: HubImport,
                tmp_root: Path) -> tuple[Model, ImportPlan]:
    """Synchronous checks, then the model row (state pending, shown as `importing`)."""
    from huggingface_hub import HfApi, hf_hub_download

    if body.endpoint is not None and body.endpoint != settings.hf_endpoint and not settings.hf_allow_request_endpoint:
        raise ApiError(422, "endpoint_not_allowed", "this deployment does not accept a Hub endpoint per request; "
                       "leave `endpoint` out to use the configured one")
    endpoint = (body.endpoint or settings.hf_endpoint or None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ApiError(422, "endpoint_not_allowed", "the Hub endpoint must be an http(s) URL")
    token: str | bool = body.token.get_secret_value() if body.token is not None else False
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(body.hub_id, revision=body.revision, files_metadata=True, token=token)
    except Exception as e:
        raise _hub_error(e, body.hub_id, body.revision, bool(token)) from None
    if info.gated and not token:
        raise ApiError(403, "hub_gated", f"{body.hub_id} is a gated model on the Hub: pass `token` with a Hugging "
                       "Face token that has been granted access")
    commit = info.sha or body.revision
    siblings = [(s.rfilename, s.size) for s in (info.siblings or [])]
    files: list[tuple[str, int | None]] = []
    for name, size in siblings:
        if not name.lower().endswith(MODEL_FILE_SUFFIXES) or name.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            files.append((sanitize_path(name), size))
        except ApiError:
            continue  # names we would refuse on upload are skipped, not imported
    names = {p for p, _ in files}
    if not any(is_safetensors(p) for p in names):
        pickles = sorted(n for n, _ in siblings if Path(n).suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ApiError(422, "pickle_refused", f"{body.hub_id} has only pickle weights ({', '.join(pickles[:5])}); "
                           "pickle files can run arbitrary code when loaded and are refused: use a safetensors "
                           "revision of the model")
        raise ApiError(422, "missing_weights", f"{body.hub_id} has no .safetensors weight files")
    if "config.json" not in names:
        raise ApiError(422, "missing_config", f"{body.hub_id} has no config.json at its top level")
    # config.json now: it is small, it settles trust_remote_code, and it proves the token can read files.
    tmp = Path(tempfile.mkdtemp(prefix="cfg-", dir=tmp_root))
    try:
        try:
            cfg_path = hf_hub_download(body.hub_id, "config.json", revision=commit, local_dir=tmp, endpoint=endpoint,
                                       token=token)
        except Exception as e:
            raise _hub_error(e, body.hub_id, body.revision, bool(token)) from None
        with open(cfg_path, "rb") as f:
            check_json_file("config.json", f.read(MAX_JSON_READ + 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path, size in files:
        if size is not None and size > max_bytes_for(path, settings.upload_max_bytes):
            raise ApiError(413, "upload_too_large", f"{body.hub_id}: {path} is {size} bytes, over the limit of "
                           f"{max_bytes_for(path, settings.upload_max_bytes)}")
    total = sum(s or 0 for _, s in files)
    remaining = storage_left(db, store, settings, tenant_id)
    if total > remaining:
        raise ApiError(413, "storage_quota_exceeded", f"{body.hub_id} needs {total} bytes; the tenant's storage "
                       f"quota leaves {max(remaining, 0)}", {"needed": total, "available": max(remaining, 0)})
    m = Model(tenant_id=tenant_id, name=body.name or body.hub_id, source=ModelSource.HUB, hub_id=body.hub_id,
              hub_revision=commit, state=ModelState.PENDING)
    db.add(m)
    db.commit()
    return m, ImportPlan(body.hub_id, commit, endpoint, token, files)


def run_import(
    session_factory: sessionmaker[Session], store: ObjectStore, settings: Settings, tenant_id: str, model_id: str,
    plan: ImportPlan, tmp_root: Path,
) -> None:
    """The background part: download, validate, store, one file at a time; ready or failed at the end."""
    from huggingface_hub import hf_hub_download

    tmp = Path(tempfile.mkdtemp(prefix="import-", dir=tmp_root))
    alive = _Heartbeat(session_factory, model_id, settings.lease_heartbeat_seconds)
    alive.start()
    with bound(tenant_id=tenant_id, model_id=model_id):
        log.info("hub import started", extra={"hub_id": plan.hub_id, "commit": plan.commit, "files": len(plan.files)})
        try:
            for path, _size in plan.files:
                local = Path(hf_hub_download(plan.hub_id, path, revision=plan.commit, local_dir=tmp,
                                             endpoint=plan.endpoint, token=plan.token))
                size = local.stat().st_size
                limit = max_bytes_for(path, settings.upload_max_bytes)
                if size > limit:
                    raise ApiError(413, "upload_too_large", f"{path} is {size} bytes, over the limit of {limit}")
                check_content(path, partial(local.open, "rb"), size)
                key = keys.model_file_key(tenant_id, model_id, f"hub/{path}")
                with local.open("rb") as f:
                    result = store.put_stream(key, f, max_bytes=limit)
                local.unlink()
                with session_factory() as db:
                    m = db.get(Model, model_id)
                    if m is None:
                        raise _Gone()
                    db.add(ModelFile(model_id=model_id, path=path, key=key, size=result.size, sha256=result.sha256))
                    m.total_bytes += result.size
                    db.commit()
            with session_factory() as db:
                m = db.get(Model, model_id)
                if m is None:
                    raise _Gone()
                check_directory(store, {f.path: f for f in m.files})
                m.state = ModelState.READY
                m.updated_at = utcnow()
                db.commit()
            log.info("hub import finished", extra={"hub_id": plan.hub_id})
        except _Gone:
            log.info("model deleted during its import; removing what was stored")
            discard_prefix(store, keys.model_files_prefix(tenant_id, model_id))
        except Exception as e:
            message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            log.warning("hub import failed: %s", message)
            discard_prefix(store, keys.model_files_prefix(tenant_id, model_id))
            with session_factory() as db:
                m = db.get(Model, model_id)
                if m is not None:
                    for f in list(m.files):
                        db.delete(f)
                    m.state = ModelState.FAILED
                    m.total_bytes = 0
                    m.error = f"import of {plan.hub_id}@{plan.commit} failed: {message}"
                    db.commit()
        finally:
            alive.stop()
            shutil.rmtree(tmp, ignore_errors=True)


class _Gone(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Touches the importing model's updated_at every `interval` seconds: the sign of life the reaper reads."""

    def __init__(self, session_factory: sessionmaker[Session], model_id: str, interval: float) -> None:
        super().__init__(name=f"import-heartbeat-{model_id}", daemon=True)
        self.sf, self.model_id, self.interval = session_factory, model_id, interval
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with self.sf() as db:
                    db.execute(update(Model).where(Model.id == self.model_id, Model.state == ModelState.PENDING)
                               .values(updated_at=utcnow()).execution_options(synchronize_session=False))
                    db.commit()
            except Exception:  # a missed beat is harmless; lease_seconds spans many of them
                log.warning("import heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def fail_interrupted_imports(session_factory: sessionmaker[Session], store: Callable[[], ObjectStore],
                             settings: Settings) -> list[str]:
    """Hub imports with no heartbeat for `lease_seconds` (their API process is gone): failed with a clear error,
    their stored files deleted. Returns the model ids. Conditional UPDATEs: concurrent reapers are safe. `store`
    is called only when there is something to delete (the reaper runs this every pass; most find nothing)."""
    cutoff = utcnow() - timedelta(seconds=settings.lease_seconds)
    with session_factory() as db:
        stale = list(db.execute(select(Model.id, Model.tenant_id).where(
            Model.source == ModelSource.HUB, Model.state == ModelState.PENDING, Model.updated_at < cutoff)))
    failed: list[str] = []
    opened: ObjectStore | None = None
    for model_id, tenant_id in stale:
        with session_factory() as db:
            res = db.execute(update(Model).where(
                Model.id == model_id, Model.state == ModelState.PENDING, Model.updated_at < cutoff,
            ).values(state=ModelState.FAILED, total_bytes=0, updated_at=utcnow(),
                     error="the import was interrupted (the API process stopped); import the model again"
                     ).execution_options(synchronize_session=False))
            if res.rowcount != 1:
                continue
            db.execute(delete(ModelFile).where(ModelFile.model_id == model_id))
            db.commit()
        opened = opened or store()
        discard_prefix(opened, keys.model_files_prefix(tenant_id, model_id))
        log.warning("hub import %s interrupted: failed", model_id)
        failed.append(model_id)
    return failed

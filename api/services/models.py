"""Models: create, upload files (streamed or multipart), finalize, list, delete.

Every file is validated when it arrives (name, type, safetensors header, config JSON): a bad file
is deleted from the store at once and no row is written, so a refused upload leaves nothing
behind. Finalize then checks the directory as a whole (weights and config.json present, shard
index consistent) and makes the model `ready`; until then files may be added or replaced.

Objects live under keys.model_files_prefix with a per-upload nonce directory, so a replacement
or a concurrent upload of the same name never overwrites bytes that a row still points at.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import Job, Model, ModelFile, ModelSource, ModelState
from api.db.scoping import get_for_tenant, tenant_select
from api.db.types import utcnow
from api.errors import ApiError
from api.schemas.models import (
    ModelDetail,
    ModelFileOut,
    ModelOut,
    PartUrl,
    PartUrlsOut,
    UploadComplete,
    UploadCreate,
    UploadOut,
)
from api.services import keys
from api.services.pagination import paginate
from api.services.usage import storage_left
from api.services.validation import (
    MAX_AUX_BYTES,
    MAX_HEADER_BYTES,
    check_content,
    check_json_file,
    is_safetensors,
    max_bytes_for,
    read_exact,
    sanitize_path,
)
from api.storage import (
    CompletedPart,
    InvalidPart,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    PutResult,
    UploadNotFound,
    hash_object,
    read_all,
)
from api.storage.base import MAX_PART_NUMBER, MIN_PART_SIZE

__all__ = [
    "UploadPlan",
    "state_name",
    "to_out",
    "to_detail",
    "parameter_count",
    "create_model",
    "list_models",
    "get_model",
    "plan_upload",
    "validate_stored",
    "record_file",
    "discard",
    "discard_prefix",
    "delete_file",
    "finalize",
    "delete_model",
    "create_upload",
    "get_upload",
    "part_urls",
    "complete_upload",
    "abort_upload",
    "check_directory",
]

log = logging.getLogger("nwc.api.models")

DEFAULT_PART_SIZE = 64 << 20
_UPLOAD_ID_RE = re.compile(r"^upl_[0-9a-f]{32}$")
MAX_MARKER_BYTES = 1 << 16  # an open upload's marker object (a small JSON record)


# ----------------------------------------------------------------------------- views


def state_name(m: Model) -> str:
    if m.state == ModelState.PENDING:
        return "importing" if m.source == ModelSource.HUB else "uploading"
    return str(m.state)


def to_out(m: Model, file_count: int) -> ModelOut:
    return ModelOut(
        id=m.id,
        name=m.name,
        source=str(m.source),  # type: ignore[arg-type]
        hub_id=m.hub_id,
        hub_revision=m.hub_revision,
        state=state_name(m),  # type: ignore[arg-type]
        total_bytes=m.total_bytes,
        file_count=file_count,
        error=m.error,
        created_at=m.created_at,
        updated_at=m.updated_at,
    )


def to_detail(m: Model, store: ObjectStore | None = None) -> ModelDetail:
    """The model with its files; with `store`, also its parameter count (read from the safetensors headers)."""
    files = [ModelFileOut.model_validate(f) for f in m.files]
    params = parameter_count(store, m.files) if store is not None else None
    return ModelDetail(**to_out(m, len(files)).model_dump(), files=files, parameter_count=params)


# Parameters per safetensors file, keyed by the file's sha256: content-addressed, so an entry never goes stale
# and a model's detail reads each header once per process (a header is small, but a shard is a store request).
_PARAMS_BY_SHA: dict[str, int] = {}
_PARAMS_CACHE_MAX = 4096


def _header_params(store: ObjectStore, key: str) -> int:
    f = store.open(key)
    try:
        (n,) = struct.unpack("<Q", read_exact(f.read, 8))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"safetensors header of {n} bytes")
        header = json.loads(read_exact(f.read, n))
    finally:
        f.close()
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def parameter_count(store: ObjectStore, files: list[ModelFile]) -> int | None:
    """Sum of the tensor sizes in the safetensors headers of `files` (validated on upload, so readable); None when
    there are none or a header cannot be read now (an optional view must not fail the request)."""
    total, seen = 0, False
    for f in files:
        if not is_safetensors(f.path):
            continue
        n = _PARAMS_BY_SHA.get(f.sha256)
        if n is None:
            try:
                n = _header_params(store, f.key)
            except Exception as e:
                log.warning("parameter count of %s: %s", f.key, e)
                return None
            if len(_PARAMS_BY_SHA) >= _PARAMS_CACHE_MAX:
                _PARAMS_BY_SHA.clear()
            _PARAMS_BY_SHA[f.sha256] = n
        total, seen = total + n, True
    return total if seen else None


# ----------------------------------------------------------------------------- CRUD


def create_model(db: Session, tenant_id: str, name: str) -> Model:
    m = Model(tenant_id=tenant_id, name=name, source=ModelSource.UPLOAD, state=ModelState.PENDING)
    db.add(m)
    db.commit()
    return m


def get_model(db: Session, tenant_id: str, model_id: str, *, for_update: bool = False) -> Model:
    return get_for_tenant(db, Model, tenant_id, model_id, for_update=for_update)


def list_models(
    db: Session, tenant_id: str, *, state: str | None, cursor: str | None, limit: int
) -> tuple[list[ModelOut], str | None]:
    stmt = tenant_select(Model, tenant_id)
    if state is not None:
        if state in ("uploading", "importing"):
            src = ModelSource.UPLOAD if state == "uploading" else ModelSource.HUB
            stmt = stmt.where(Model.state == ModelState.PENDING, Model.source == src)
        else:
            stmt = stmt.where(Model.state == ModelState(state))
    rows, nxt = paginate(db, stmt, Model, cursor, limit)
    counts: dict[str, int] = {}
    if rows:
        counts = dict(
            db.execute(
                select(ModelFile.model_id, func.count())
                .where(ModelFile.model_id.in_([r.id for r in rows]))
                .group_by(ModelFile.model_id)
            ).all()  # type: ignore[arg-type]
        )
    return [to_out(r, counts.get(r.id, 0)) for r in rows], nxt


def _require_uploading(m: Model) -> None:
    if m.source != ModelSource.UPLOAD or m.state != ModelState.PENDING:
        raise ApiError(
            409,
            "model_not_uploading",
            f"model {m.id} is {state_name(m)}: files can be added only to an uploaded model before it is finalized",
        )


# ----------------------------------------------------------------------------- single-request upload


@dataclass(frozen=True, slots=True)
class UploadPlan:
    tenant_id: str
    model_id: str
    path: str
    key: str
    max_bytes: int
    limited_by: str  # "size" (per-file limit) or "quota" (tenant storage left)

    def too_large(self) -> ApiError:
        if self.limited_by == "quota":
            return ApiError(
                413,
                "storage_quota_exceeded",
                f"{self.path}: the tenant's storage quota leaves room for {self.max_bytes} more bytes; "
                "delete models or jobs, or ask for a larger quota",
                {"max_bytes": self.max_bytes},
            )
        what = "weight files" if is_safetensors(self.path) else "non-weight files"
        return ApiError(
            413,
            "upload_too_large",
            f"{self.path}: larger than the limit of {self.max_bytes} bytes for {what}",
            {"max_bytes": self.max_bytes},
        )


def plan_upload(
    db: Session,
    store: ObjectStore,
    settings: Settings,
    tenant_id: str,
    model_id: str,
    raw_path: str,
    declared_size: int | None,
) -> UploadPlan:
    """Checks before a byte is read: the model accepts files, the name is safe, the size fits the limits."""
    m = get_model(db, tenant_id, model_id)
    _require_uploading(m)
    path = sanitize_path(raw_path)
    size_limit = max_bytes_for(path, settings.upload_max_bytes)
    remaining = storage_left(db, store, settings, tenant_id)
    limited_by, max_bytes = ("size", size_limit) if size_limit <= remaining else ("quota", max(remaining, 0))
    plan = UploadPlan(tenant_id, model_id, path, _new_key(tenant_id, model_id, path), max_bytes, limited_by)
    if max_bytes <= 0 or (declared_size is not None and declared_size > max_bytes):
        raise plan.too_large()
    return plan


def _new_key(tenant_id: str, model_id: str, path: str) -> str:
    return keys.model_file_key(tenant_id, model_id, f"{secrets.token_hex(6)}/{path}")


def validate_stored(store: ObjectStore, path: str, key: str, size: int) -> None:
    """Check a stored file's content (safetensors header; config JSON). Raises ApiError; the caller deletes."""
    check_content(path, lambda: store.open(key), size)


def record_file(db: Session, store: ObjectStore, plan: UploadPlan, result: PutResult) -> ModelFile:
    """Write (or replace) the file's row; the model must still accept files. Deletes a replaced object."""
    m = get_model(db, plan.tenant_id, plan.model_id, for_update=True)
    _require_uploading(m)
    old = db.scalars(select(ModelFile).where(ModelFile.model_id == m.id, ModelFile.path == plan.path)).one_or_none()
    old_key = None
    if old is not None:
        old_key = old.key
        m.total_bytes -= old.size
        old.key, old.size, old.sha256, old.created_at = plan.key, result.size, result.sha256, utcnow()
        row = old
    else:
        row = ModelFile(model_id=m.id, path=plan.path, key=plan.key, size=result.size, sha256=result.sha256)
        db.add(row)
    m.total_bytes += result.size
    try:
        db.commit()
    except IntegrityError:  # a concurrent upload of the same name won the insert
        db.rollback()
        raise ApiError(409, "upload_conflict", f"{plan.path} was uploaded concurrently; retry") from None
    if old_key is not None and old_key != plan.key:
        discard(store, old_key)
    return row


def discard(store: ObjectStore, key: str) -> None:
    """Delete an object we no longer want; a failure is logged, never raised over the real error."""
    try:
        store.delete(key)
    except Exception:
        log.exception("could not delete %s", key)


def discard_prefix(store: ObjectStore, prefix: str) -> None:
    """Delete every object under `prefix` (a model's or a job's); a failure is logged, never raised."""
    try:
        store.delete_prefix(prefix)
    except Exception:
        log.exception("could not delete the objects under %s", prefix)


def delete_file(db: Session, store: ObjectStore, tenant_id: str, model_id: str, raw_path: str) -> None:
    m = get_model(db, tenant_id, model_id, for_update=True)
    row = db.scalars(select(ModelFile).where(ModelFile.model_id == m.id, ModelFile.path == raw_path)).one_or_none()
    if row is None:
        raise ApiError(404, "not_found", f"model {model_id} has no file {raw_path!r}")
    _require_uploading(m)
    m.total_bytes -= row.size
    key = row.key
    db.delete(row)
    db.commit()
    discard(store, key)


# ----------------------------------------------------------------------------- directory checks, finalize


def check_directory(store: ObjectStore, files: dict[str, ModelFile]) -> None:
    """The model as a whole: weights and config.json present, config safe, shard index consistent."""

    def read_small(row: ModelFile) -> bytes:
        return read_all(store, row.key, MAX_AUX_BYTES + 1)

    shards = sorted(p for p in files if is_safetensors(p))
    if not shards:
        raise ApiError(422, "missing_weights", "the model has no .safetensors weight files",
                       {"files": sorted(files)})
    if "config.json" not in files:
        raise ApiError(422, "missing_config", "the model has no config.json at its top level",
                       {"files": sorted(files)})
    check_json_file("config.json", read_small(files["config.json"]))
    index_name = "model.safetensors.index.json"
    if index_name in files:
        index = check_json_file(index_name, read_small(files[index_name]))
        missing = sorted(set(index["weight_map"].values()) - set(shards))
        if missing:
            raise ApiError(422, "missing_shards", f"{index_name} names shards that were not uploaded: {missing}",
                           {"missing": missing})


def finalize(db: Session, store: ObjectStore, tenant_id: str, model_id: str) -> Model:
    m = get_model(db, tenant_id, model_id, for_update=True)
    _require_uploading(m)
    open_uploads = [o.key for o in store.list_objects(keys.uploads_prefix(tenant_id, model_id))]
    if open_uploads:
        raise ApiError(409, "uploads_open", f"{len(open_uploads)} multipart upload(s) still open: complete or "
                       "abort them first", {"upload_ids": [k.rsplit("/", 1)[1].removesuffix(".json")
                                                           for k in open_uploads]})
    check_directory(store, {f.path: f for f in m.files})
    m.state = ModelState.READY
    m.total_bytes = sum(f.size for f in m.files)
    m.error = None
    db.commit()
    return m


def delete_model(db: Session, store: ObjectStore, tenant_id: str, model_id: str) -> None:
    m = get_model(db, tenant_id, model_id, for_update=True)
    job_ids = list(db.scalars(select(Job.id).where(Job.model_id == m.id).limit(5)))
    if job_ids:
        raise ApiError(409, "model_in_use", f"model {model_id} has jobs; delete them first", {"job_ids": job_ids})
    markers = list(store.list_objects(keys.uploads_prefix(tenant_id, model_id)))
    db.delete(m)
    db.commit()
    for obj in markers:
        try:
            marker = json.loads(read_all(store, obj.key, MAX_MARKER_BYTES))
            store.abort_multipart(marker["key"], marker["store_upload_id"])
        except Exception:
            log.exception("could not abort upload %s", obj.key)
    discard_prefix(store, keys.model_prefix(tenant_id, model_id))


# ----------------------------------------------------------------------------- multipart upload


def _load_upload(store: ObjectStore, tenant_id: str, model_id: str, upload_id: str) -> dict[str, Any]:
    if not _UPLOAD_ID_RE.match(upload_id):
        raise ApiError(404, "not_found", f"upload {upload_id!r} not found")
    try:
        return json.loads(read_all(store, keys.upload_marker_key(tenant_id, model_id, upload_id), MAX_MARKER_BYTES))
    except ObjectNotFound:
        raise ApiError(404, "not_found", f"upload {upload_id!r} not found (completed, aborted or never started)") \
            from None


def _part_size(size: int) -> int:
    ps = max(DEFAULT_PART_SIZE, MIN_PART_SIZE)
    if math.ceil(size / ps) > MAX_PART_NUMBER:
        ps = math.ceil(size / MAX_PART_NUMBER / (1 << 20)) << 20
    return ps


def create_upload(
    db: Session, store: ObjectStore, settings: Settings, tenant_id: str, model_id: str, body: UploadCreate
) -> UploadOut:
    plan = plan_upload(db, store, settings, tenant_id, model_id, body.path, body.size)
    store_upload_id = store.create_multipart(plan.key)
    upload_id = f"upl_{secrets.token_hex(16)}"
    part_size = _part_size(body.size)
    marker = {
        "upload_id": upload_id, "path": plan.path, "key": plan.key, "store_upload_id": store_upload_id,
        "size": body.size, "part_size": part_size, "max_bytes": plan.max_bytes, "limited_by": plan.limited_by,
        "created_at": utcnow().isoformat(),
    }
    try:
        store.put_stream(keys.upload_marker_key(tenant_id, model_id, upload_id), json.dumps(marker).encode())
    except BaseException:
        store.abort_multipart(plan.key, store_upload_id)
        raise
    return UploadOut(upload_id=upload_id, path=plan.path, size=body.size, part_size=part_size,
                     part_count=max(1, math.ceil(body.size / part_size)))


def get_upload(db: Session, store: ObjectStore, tenant_id: str, model_id: str, upload_id: str) -> UploadOut:
    get_model(db, tenant_id, model_id)
    m = _load_upload(store, tenant_id, model_id, upload_id)
    return UploadOut(upload_id=upload_id, path=m["path"], size=m["size"], part_size=m["part_size"],
                     part_count=max(1, math.ceil(m["size"] / m["part_size"])))


def part_urls(
    db: Session, store: ObjectStore, settings: Settings, tenant_id: str, model_id: str, upload_id: str,
    part_numbers: list[int],
) -> PartUrlsOut:
    _require_uploading(get_model(db, tenant_id, model_id))
    marker = _load_upload(store, tenant_id, model_id, upload_id)
    count = max(1, math.ceil(marker["size"] / marker["part_size"]))
    bad = [n for n in part_numbers if not 1 <= n <= count]
    if bad:
        raise ApiError(422, "invalid_part_number", f"part numbers must be 1..{count} for this upload", {"bad": bad})
    ttl = settings.presign_ttl_seconds
    expires = utcnow() + timedelta(seconds=ttl)
    parts = [
        PartUrl(part_number=n, url=store.presigned_part_url(marker["key"], marker["store_upload_id"], n, ttl),
                expires_at=expires)
        for n in sorted(set(part_numbers))
    ]
    return PartUrlsOut(parts=parts)


def complete_upload(
    db: Session, store: ObjectStore, tenant_id: str, model_id: str, upload_id: str, body: UploadComplete
) -> ModelFile:
    _require_uploading(get_model(db, tenant_id, model_id))
    marker = _load_upload(store, tenant_id, model_id, upload_id)
    marker_key = keys.upload_marker_key(tenant_id, model_id, upload_id)
    plan = UploadPlan(tenant_id, model_id, marker["path"], marker["key"], marker["max_bytes"], marker["limited_by"])
    parts = [CompletedPart(p.part_number, p.etag) for p in body.parts]
    try:
        info = store.complete_multipart(plan.key, marker["store_upload_id"], parts, max_bytes=plan.max_bytes)
    except ObjectTooLarge:
        discard(store, marker_key)  # the store aborted the upload
        raise plan.too_large() from None
    except InvalidPart as e:
        raise ApiError(422, "invalid_parts", f"{plan.path}: {e}; the upload stays open") from None
    except UploadNotFound:
        discard(store, marker_key)
        raise ApiError(404, "not_found", f"upload {upload_id!r} no longer exists in the store") from None
    try:
        if info.size != marker["size"]:
            raise ApiError(422, "size_mismatch", f"{plan.path}: the parts hold {info.size} bytes, the upload "
                           f"was declared as {marker['size']}", {"declared": marker["size"], "received": info.size})
        validate_stored(store, plan.path, plan.key, info.size)
        result = hash_object(store, plan.key)
        row = record_file(db, store, plan, result)
    except BaseException:
        discard(store, plan.key)
        discard(store, marker_key)
        raise
    discard(store, marker_key)
    return row


def abort_upload(db: Session, store: ObjectStore, tenant_id: str, model_id: str, upload_id: str) -> None:
    get_model(db, tenant_id, model_id)
    marker = _load_upload(store, tenant_id, model_id, upload_id)
    store.abort_multipart(marker["key"], marker["store_upload_id"])
    store.delete(keys.upload_marker_key(tenant_id, model_id, upload_id))

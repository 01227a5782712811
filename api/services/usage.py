"""Per-tenant limits: storage (model files, artifacts, calibration texts) and concurrent jobs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import Artifact, Job, JobState, Model, ModelFile, Tenant
from api.services import keys
from api.storage import ObjectStore

__all__ = ["Limits", "tenant_limits", "storage_used", "storage_left", "active_jobs", "ACTIVE_JOB_STATES"]

ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_jobs: int
    max_storage_bytes: int


def tenant_limits(db: Session, settings: Settings, tenant_id: str) -> Limits:
    tenant = db.get(Tenant, tenant_id)
    jobs = tenant.max_concurrent_jobs if tenant and tenant.max_concurrent_jobs is not None else None
    storage = tenant.max_storage_bytes if tenant and tenant.max_storage_bytes is not None else None
    return Limits(
        max_concurrent_jobs=jobs if jobs is not None else settings.tenant_max_concurrent_jobs,
        max_storage_bytes=storage if storage is not None else settings.tenant_max_storage_bytes,
    )


def storage_used(db: Session, store: ObjectStore, tenant_id: str) -> int:
    """Bytes the tenant holds: model files and artifacts (from the tables), calibration texts (from the store)."""
    files = db.scalar(
        select(func.coalesce(func.sum(ModelFile.size), 0)).join(Model).where(Model.tenant_id == tenant_id)
    )
    arts = db.scalar(select(func.coalesce(func.sum(Artifact.size), 0)).where(Artifact.tenant_id == tenant_id))
    calib = sum(o.size for o in store.list_objects(keys.calibration_prefix(tenant_id)))
    return int(files or 0) + int(arts or 0) + calib


def storage_left(db: Session, store: ObjectStore, settings: Settings, tenant_id: str) -> int:
    """Bytes the tenant may still store under its quota (negative once over it)."""
    return tenant_limits(db, settings, tenant_id).max_storage_bytes - storage_used(db, store, tenant_id)


def active_jobs(db: Session, tenant_id: str) -> int:
    return int(
        db.scalar(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_JOB_STATES))
        )
        or 0
    )

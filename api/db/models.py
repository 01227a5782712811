"""Tables of the service (SQLAlchemy 2 typed declarative).

The job table, not the broker, is the source of truth for work: a running job holds a lease
(`lease_owner`, `lease_expires_at`) renewed by heartbeats, and a reaper re-enqueues jobs whose
lease expired. Rows that clients address by id carry a `tenant_id` so every lookup can be
scoped by tenant (see api.db.scoping); child rows (files, events) are reached through them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from api.db.types import BigIntPK, JSONType, UTCDateTime, new_id, str_enum, utcnow

__all__ = [
    "Base",
    "ModelSource",
    "ModelState",
    "JobState",
    "ArtifactKind",
    "TERMINAL_JOB_STATES",
    "Tenant",
    "ApiKey",
    "Model",
    "ModelFile",
    "Job",
    "JobEvent",
    "Artifact",
]

# Deterministic constraint names: Alembic can drop/alter them by name, and SQLite batch
# migrations (table copy) need named constraints to carry them over.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class ModelSource(enum.StrEnum):
    UPLOAD = "upload"
    HUB = "hub"


class ModelState(enum.StrEnum):
    PENDING = "pending"  # row exists, files still arriving (upload or hub import)
    READY = "ready"
    FAILED = "failed"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ArtifactKind(enum.StrEnum):
    BUNDLE = "bundle"  # the compressed container
    DENSE = "dense"  # decoded safetensors model directory (archive)
    REPORT = "report"  # verification / evaluation report (JSON)
    PLOT = "plot"


def _id(prefix: str) -> Mapped[str]:
    return mapped_column(String(40), primary_key=True, default=partial(new_id, prefix))


def _tenant_fk() -> Mapped[str]:
    return mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)


def _created() -> Mapped[datetime]:
    return mapped_column(nullable=False, default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = _id("ten")
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # None = the deployment default from Settings.
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", passive_deletes=True)


class ApiKey(Base):
    """Only the sha256 of the secret is kept; the full key is shown once at creation (api.auth)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = _id("key")
    tenant_id: Mapped[str] = _tenant_fk()
    key_id: Mapped[str] = mapped_column(String(32), unique=True)  # public prefix, used for lookup
    secret_hash: Mapped[str] = mapped_column(String(64))  # hex sha256
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = _created()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")

    __table_args__ = (Index("ix_api_keys_tenant_id", "tenant_id"),)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = _id("mdl")
    tenant_id: Mapped[str] = _tenant_fk()
    name: Mapped[str] = mapped_column(String(300))
    source: Mapped[ModelSource] = mapped_column(str_enum(ModelSource, name="model_source"))
    hub_id: Mapped[str | None] = mapped_column(String(300))
    hub_revision: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[ModelState] = mapped_column(str_enum(ModelState, name="model_state"), default=ModelState.PENDING)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    files: Mapped[list[ModelFile]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True, order_by="ModelFile.path"
    )

    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "created_at"),)


class ModelFile(Base):
    __tablename__ = "model_files"

    id: Mapped[str] = _id("mfl")
    model_id: Mapped[str] = mapped_column(String(40), ForeignKey("models.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))  # relative path inside the model directory
    key: Mapped[str] = mapped_column(String(1024))  # object-store key holding the bytes
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()

    model: Mapped[Model] = relationship(back_populates="files")

    __table_args__ = (UniqueConstraint("model_id", "path"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = _id("job")
    tenant_id: Mapped[str] = _tenant_fk()
    # RESTRICT: a model with job history is not deleted behind the jobs' back; the API decides.
    model_id: Mapped[str] = mapped_column(String(40), ForeignKey("models.id", ondelete="RESTRICT"))
    # A string, not an enum: the codec registry owns the list of methods (nwc, gptq, rtn, nowag-vq, ...).
    method: Mapped[str] = mapped_column(String(32))
    target_bits: Mapped[float | None] = mapped_column(Float)  # None: a pruning method (no rate target)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[JobState] = mapped_column(str_enum(JobState, name="job_state"), default=JobState.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    eta_at: Mapped[datetime | None]  # absolute, so it does not go stale between polls
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    model: Mapped[Model] = relationship()
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="JobEvent.id"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="Artifact.created_at"
    )

    __table_args__ = (
        # NULL keys never collide (both Postgres and SQLite treat NULLs as distinct).
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_tenant_state", "tenant_id", "state"),  # per-tenant concurrency limit
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),  # the reaper's scan
        Index("ix_jobs_model_id", "model_id"),  # the RESTRICT check when a model is deleted
    )


class JobEvent(Base):
    __tablename__ = "job_events"

    # Auto-increment: the id is the event order (timestamps can tie).
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # e.g. state, progress, log, error
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _created()

    job: Mapped[Job] = relationship(back_populates="events")

    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = _id("art")
    # Denormalized from the job so an artifact id is scoped by tenant without a join.
    tenant_id: Mapped[str] = _tenant_fk()
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[ArtifactKind] = mapped_column(str_enum(ArtifactKind, name="artifact_kind"))
    name: Mapped[str] = mapped_column(String(300))  # download file name
    key: Mapped[str] = mapped_column(String(1024))  # object-store key
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()

    job: Mapped[Job] = relationship(back_populates="artifacts")

    __table_args__ = (
        Index("ix_artifacts_job_id", "job_id"),
        Index("ix_artifacts_tenant_id", "tenant_id"),  # per-tenant storage accounting
    )

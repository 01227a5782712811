"""Jobs: create (idempotent, within the tenant's limits), list, inspect, cancel, retry, delete.

The job row is the source of truth. The API writes `queued` rows and hands their ids to the
dispatcher; the worker moves them on and writes `JobEvent`s. Conventions the API reads from events
(see docs/API.md): `stage` names the stage an event belongs to; `data.progress` (0..1) is progress
within that stage; `kind == "metrics"` events carry metrics in `data`, merged in arrival order.

What the worker finds in `Job.options`: calibration ("wiki" | "none" | "cal_…"), calibration_key
(object key of an uploaded text, else null), outputs (list), request_sha256 (idempotency).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import TERMINAL_JOB_STATES, Artifact, Job, JobEvent, JobState, Model, ModelState, Tenant
from api.db.scoping import get_for_tenant, tenant_select
from api.db.types import utcnow
from api.egress import BlockedDestination, check_url
from api.errors import ApiError
from api.logs import bind
from api.schemas.jobs import EventOut, JobCreate, JobDetail, JobOut, JobTuning, StageOut
from api.services import keys
from api.services.calibration import find_calibration
from api.services.dispatch import Dispatcher, DispatchError
from api.services.models import discard_prefix
from api.services.pagination import paginate
from api.services.usage import active_jobs, storage_used, tenant_limits
from api.storage import ObjectStore

__all__ = [
    "create_job",
    "list_jobs",
    "get_job",
    "job_out",
    "job_detail",
    "list_events",
    "cancel_job",
    "retry_job",
    "delete_job",
    "request_hash",
]

log = logging.getLogger("nwc.api.jobs")

# SQLite has no row locks: one process-wide lock makes "count active jobs, then insert" atomic there.
# (PostgreSQL additionally locks the tenant row, which serializes several API processes.)
_admission_lock = threading.Lock()


def request_hash(body: JobCreate) -> str:
    canon = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _eta_seconds(job: Job, now: datetime) -> float | None:
    if job.eta_at is None or job.state in TERMINAL_JOB_STATES:
        return None
    return max(0.0, (job.eta_at - now).total_seconds())


def job_out(job: Job, now: datetime | None = None) -> JobOut:
    now = now or utcnow()
    opts = job.options or {}
    return JobOut(
        id=job.id,
        model_id=job.model_id,
        method=job.method,
        target_bits=job.target_bits,
        calibration=opts.get("calibration", "none"),
        outputs=list(opts.get("outputs", [])),
        tuning=JobTuning.model_validate({k: v for k in JobTuning.model_fields if (v := opts.get(k)) is not None}),
        webhook_url=job.webhook_url,
        idempotency_key=job.idempotency_key,
        state=str(job.state),  # type: ignore[arg-type]
        stage=job.stage,
        progress=job.progress,
        eta_at=job.eta_at,
        eta_seconds=_eta_seconds(job, now),
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _stages(job: Job, events: list[JobEvent], now: datetime) -> list[StageOut]:
    """Stages in the order they started, from the events' `stage` column; a stage ends when the next begins."""
    stages: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.stage is None:
            continue
        st = by_name.get(ev.stage)
        if st is None:
            if stages and stages[-1]["finished_at"] is None:
                stages[-1]["finished_at"] = ev.created_at
            st = {"name": ev.stage, "started_at": ev.created_at, "finished_at": None, "progress": None}
            stages.append(st)
            by_name[ev.stage] = st
        p = (ev.data or {}).get("progress") if ev.kind != "stage" else None
        if isinstance(p, int | float) and not isinstance(p, bool):
            st["progress"] = float(min(max(p, 0.0), 1.0))
        if (ev.data or {}).get("status") in ("finished", "done"):
            st["finished_at"] = st["finished_at"] or ev.created_at
    out: list[StageOut] = []
    terminal = job.state in TERMINAL_JOB_STATES
    if stages and job.state == JobState.RUNNING and stages[-1]["name"] == job.stage and stages[-1]["progress"] is None:
        stages[-1]["progress"] = _running_stage_progress(job)
    for st in stages:
        end = st["finished_at"]
        if end is None and terminal:
            end = job.finished_at or job.updated_at
            state = "done" if job.state == JobState.SUCCEEDED else "stopped"
        else:
            state = "done" if end is not None else "running"
        duration = ((end or now) - st["started_at"]).total_seconds()
        eta = None
        p = st["progress"]
        if state == "running" and p is not None and 0 < p < 1:
            eta = duration * (1 - p) / p
        if state == "done" and job.state == JobState.SUCCEEDED and p is None:
            p = 1.0
        out.append(StageOut(name=st["name"], state=state, started_at=st["started_at"], finished_at=end,
                            duration_s=max(duration, 0.0), progress=p, eta_seconds=eta))
    return out


def _metrics(events: list[JobEvent]) -> dict[str, Any]:
    """Stage results (the worker's `stage` events other than "… started") by stage, plus `metrics` events."""
    merged: dict[str, Any] = {}
    for ev in events:
        if not isinstance(ev.data, dict) or not ev.data:
            continue
        if ev.kind == "metrics":
            merged.update(ev.data)
        elif ev.kind == "stage" and ev.stage and not ev.message.endswith("started"):
            merged.setdefault(ev.stage, {}).update(ev.data)
    return merged


@functools.cache
def _stage_weights() -> dict[str, float] | None:
    """The worker's share of overall progress per stage, when the worker package is installed."""
    try:
        from worker.jobs import STAGE_WEIGHTS, STAGES
    except ImportError:
        return None
    return {s: STAGE_WEIGHTS[s] for s in STAGES}


def _running_stage_progress(job: Job) -> float | None:
    """Progress within the running stage, from the job's overall progress and the worker's stage weights."""
    weights = _stage_weights()
    if not weights or job.stage not in weights or weights[job.stage] <= 0:
        return None
    before = 0.0
    for name, w in weights.items():
        if name == job.stage:
            break
        before += w
    return min(max((job.progress - before) / weights[job.stage], 0.0), 1.0)


def job_detail(db: Session, job: Job) -> JobDetail:
    now = utcnow()
    events = list(db.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)))
    n_art = db.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job.id)) or 0
    base = job_out(job, now)
    stages = _stages(job, events, now)
    if base.eta_seconds is None and job.state == JobState.RUNNING and stages and stages[-1].eta_seconds is not None:
        base.eta_seconds = stages[-1].eta_seconds  # the worker gave no overall ETA: the running stage's estimate
    return JobDetail(**base.model_dump(), stages=stages, metrics=_metrics(events), artifact_count=int(n_art))


def get_job(db: Session, tenant_id: str, job_id: str, *, for_update: bool = False) -> Job:
    job = get_for_tenant(db, Job, tenant_id, job_id, for_update=for_update)
    bind(job_id=job.id)
    return job


def list_jobs(
    db: Session, tenant_id: str, *, state: str | None, model_id: str | None, method: str | None,
    cursor: str | None, limit: int,
) -> tuple[list[JobOut], str | None]:
    stmt = tenant_select(Job, tenant_id)
    if state is not None:
        stmt = stmt.where(Job.state == JobState(state))
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if method is not None:
        stmt = stmt.where(Job.method == method)
    rows, nxt = paginate(db, stmt, Job, cursor, limit)
    now = utcnow()
    return [job_out(r, now) for r in rows], nxt


def list_events(db: Session, tenant_id: str, job_id: str, after: int | None, limit: int) -> list[EventOut]:
    get_job(db, tenant_id, job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    return [EventOut.model_validate(e) for e in db.scalars(stmt.order_by(JobEvent.id).limit(limit))]


def _admit(db: Session, store: ObjectStore, settings: Settings, tenant_id: str) -> None:
    """The per-tenant limits a new (or retried) job must fit in; locks the tenant row on PostgreSQL."""
    db.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).one_or_none()
    limits = tenant_limits(db, settings, tenant_id)
    running = active_jobs(db, tenant_id)
    if running >= limits.max_concurrent_jobs:
        raise ApiError(
            429,
            "concurrent_job_limit",
            f"the tenant already has {running} queued or running jobs, its limit is {limits.max_concurrent_jobs}; "
            "wait for one to finish or cancel one",
            {"active_jobs": running, "limit": limits.max_concurrent_jobs},
        )
    used = storage_used(db, store, tenant_id)
    if used >= limits.max_storage_bytes:
        raise ApiError(
            429,
            "storage_quota_exceeded",
            f"the tenant uses {used} of its {limits.max_storage_bytes} bytes of storage, so a job could not store "
            "its results; delete models or jobs first",
            {"used_bytes": used, "limit": limits.max_storage_bytes},
        )


def _existing_for_key(db: Session, tenant_id: str, key: str, digest: str) -> Job | None:
    job = db.scalars(tenant_select(Job, tenant_id).where(Job.idempotency_key == key)).one_or_none()
    if job is None:
        return None
    if (job.options or {}).get("request_sha256") != digest:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different job request; use a new key",
            {"job_id": job.id},
        )
    bind(job_id=job.id)
    return job


def _check_with_worker(body: JobCreate, options: dict[str, Any], tenant_id: str) -> None:
    """The worker's own option parser, when installed, so a job it would refuse is a 422 now, not a failed job."""
    try:
        from worker.options import InvalidJobOptions, JobOptions
    except ImportError:
        return
    try:
        JobOptions.parse(body.method, body.target_bits, options, tenant_id)
    except InvalidJobOptions as e:
        raise ApiError(422, "invalid_job_options", str(e)) from None


def create_job(
    db: Session, store: ObjectStore, settings: Settings, dispatcher: Dispatcher, tenant_id: str, body: JobCreate,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """(job, created). With a known Idempotency-Key and the same body, the existing job and False."""
    digest = request_hash(body)
    if idempotency_key is not None and (job := _existing_for_key(db, tenant_id, idempotency_key, digest)):
        return job, False
    model = get_for_tenant(db, Model, tenant_id, body.model_id)
    if model.state != ModelState.READY:
        raise ApiError(409, "model_not_ready", f"model {model.id} is not ready (finalize the upload or wait for "
                       "the import)")
    if body.webhook_url is not None and not settings.webhook_allow_private:
        try:
            check_url(body.webhook_url)
        except BlockedDestination as e:
            raise ApiError(422, "webhook_url_not_allowed", f"{e} (NWC_WEBHOOK_ALLOW_PRIVATE lifts this)") from None
    cal_key = None
    if body.calibration is not None and body.calibration.startswith("cal_"):
        cal_key = find_calibration(store, tenant_id, body.calibration).key
    options = {"calibration": body.calibration, "calibration_key": cal_key, "outputs": list(body.outputs),
               **body.tuning.model_dump(exclude_none=True), "request_sha256": digest}
    _check_with_worker(body, options, tenant_id)
    with _admission_lock:
        _admit(db, store, settings, tenant_id)
        job = Job(
            tenant_id=tenant_id,
            model_id=model.id,
            method=body.method,
            target_bits=body.target_bits,
            options=options,
            state=JobState.QUEUED,
            idempotency_key=idempotency_key,
            webhook_url=body.webhook_url,
        )
        db.add(job)
        try:
            db.flush()
            db.add(JobEvent(job_id=job.id, kind="state", message="queued", data={"state": "queued"}))
            db.commit()
        except IntegrityError:
            db.rollback()
            # Another request with the same Idempotency-Key committed first.
            if idempotency_key is not None and (existing := _existing_for_key(db, tenant_id, idempotency_key, digest)):
                return existing, False
            raise
    bind(job_id=job.id)
    try:
        dispatcher.enqueue(job.id)
    except DispatchError as e:
        log.error("enqueue failed, job withdrawn: %s", e)
        db.delete(job)
        db.commit()
        raise ApiError(503, "queue_unavailable", "the job queue is unavailable; nothing was created, try again") \
            from None
    log.info("job created", extra={"method": job.method, "target_bits": job.target_bits})
    return job, True


def cancel_job(db: Session, dispatcher: Dispatcher, tenant_id: str, job_id: str) -> Job:
    """Cancel through the dispatcher (the worker's cancel_job marks the row and sends the webhook); if the
    dispatcher cannot, or leaves the row as it was, the API marks it cancelled itself (the worker stops at its
    next check of the row)."""
    job = get_job(db, tenant_id, job_id)
    if job.state in TERMINAL_JOB_STATES:
        raise ApiError(409, "job_finished", f"job {job.id} is already {job.state}; nothing to cancel")
    db.commit()  # end the read transaction: the dispatcher writes the row in its own
    try:
        dispatcher.cancel(job.id)
    except DispatchError as e:
        log.warning("dispatcher could not cancel, marking the row: %s", e)
    db.refresh(job)
    if job.state not in TERMINAL_JOB_STATES:
        now = utcnow()
        res = db.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.not_in(list(TERMINAL_JOB_STATES)))
            .values(state=JobState.CANCELLED, finished_at=now, updated_at=now, eta_at=None,
                    error="cancelled by request")
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1:
            db.add(JobEvent(job_id=job.id, stage=None, kind="state", message="cancelled",
                            data={"state": "cancelled"}))
        db.commit()
        db.refresh(job)
    return job


def retry_job(
    db: Session, store: ObjectStore, settings: Settings, dispatcher: Dispatcher, tenant_id: str, job_id: str
) -> Job:
    job = get_job(db, tenant_id, job_id, for_update=True)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ApiError(409, "job_not_retryable", f"job {job.id} is {job.state}; only failed or cancelled jobs can "
                       "be retried")
    model = db.get(Model, job.model_id)
    if model is None or model.state != ModelState.READY:
        raise ApiError(409, "model_not_ready", f"model {job.model_id} is not ready")
    previous = job.state
    with _admission_lock:
        _admit(db, store, settings, tenant_id)
        saved = {k: getattr(job, k) for k in ("state", "stage", "progress", "eta_at", "error", "finished_at",
                                              "started_at", "attempts")}
        job.state = JobState.QUEUED
        job.stage = None
        job.progress = 0.0
        job.eta_at = None
        job.error = None
        job.finished_at = None
        job.started_at = None
        job.attempts = 0  # a retry gets the full budget of attempts again (worker: job_max_attempts)
        job.lease_owner = None
        job.lease_expires_at = None
        db.add(JobEvent(job_id=job.id, kind="state", message="retried by the API",
                        data={"state": "queued", "from": str(previous)}))
        db.commit()
    try:
        dispatcher.enqueue(job.id)
    except DispatchError as e:
        log.error("enqueue failed on retry: %s", e)
        for k, v in saved.items():
            setattr(job, k, v)
        db.add(JobEvent(job_id=job.id, kind="error", message="retry failed: queue unavailable", data={}))
        db.commit()
        raise ApiError(503, "queue_unavailable", "the job queue is unavailable; the job was not retried") from None
    return job


def delete_job(db: Session, store: ObjectStore, tenant_id: str, job_id: str) -> None:
    job = get_job(db, tenant_id, job_id, for_update=True)
    if job.state not in TERMINAL_JOB_STATES:
        raise ApiError(409, "job_active", f"job {job.id} is {job.state}; cancel it before deleting it")
    db.delete(job)
    db.commit()
    discard_prefix(store, keys.job_prefix(tenant_id, job_id))  # the artifacts live under it (keys.artifact_key)

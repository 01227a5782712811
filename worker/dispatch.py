"""The interface between the API and the workers: enqueue a job, cancel a job; and every other task sent.

    from worker.dispatch import enqueue_job, cancel_job, notify_job

    enqueue_job(job.id)   # after the Job row (state queued) is COMMITTED: the worker reads it from the DB
    cancel_job(job.id)    # queued → cancelled at once; running → cancelled, and the worker stops at its next check
    notify_job(job.id)    # a terminal job's webhook, if it has one (the worker and the reaper call this)

The job table is the source of truth (docs/DEPLOY.md): the broker message only says "look at job X".
Sending the same job twice is harmless (a second task finds the job taken or finished and does nothing).
None of them imports torch or talks to a GPU; all are cheap enough to call inside a request.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from api.core.config import Settings, get_settings
from api.db.models import TERMINAL_JOB_STATES, Job, JobEvent, JobState
from api.db.types import utcnow

__all__ = ["enqueue_job", "cancel_job", "notify_job", "get_celery"]

log = logging.getLogger(__name__)

_apps: dict[tuple, object] = {}


def get_celery(settings: Settings | None = None):
    """The Celery app for these settings (cached), to send tasks with."""
    from worker.celery_app import make_celery

    settings = settings or get_settings()
    key = (settings.broker_url, str(settings.data_dir), settings.job_time_limit, settings.job_soft_time_limit)
    app = _apps.get(key)
    if app is None:
        app = _apps[key] = make_celery(settings)
    return app


def _send(task: str, queue: str, job_id: str, settings: Settings | None, countdown: float | None = None) -> None:
    get_celery(settings).send_task(task, args=[job_id], queue=queue, routing_key=queue, countdown=countdown)


def enqueue_job(job_id: str, *, settings: Settings | None = None, countdown: float | None = None) -> None:
    """Send task ``nwc.run_job(job_id)`` to the ``gpu`` queue (after `countdown` seconds). Commit the Job row first."""
    from worker.celery_app import GPU_QUEUE, RUN_JOB

    _send(RUN_JOB, GPU_QUEUE, job_id, settings, countdown)


def notify_job(job_id: str, *, settings: Settings | None = None) -> None:
    """Queue the job's webhook (task ``nwc.send_webhook`` on the ``cpu`` queue) if it has one. Best effort: a broker
    error is logged, never raised (the job's state is already recorded)."""
    from worker.celery_app import CPU_QUEUE, SEND_WEBHOOK
    from worker.db import session_factory

    settings = settings or get_settings()
    try:
        with session_factory(settings)() as s:
            url = s.scalar(select(Job.webhook_url).where(Job.id == job_id))
        if url:
            _send(SEND_WEBHOOK, CPU_QUEUE, job_id, settings)
    except Exception:
        log.exception("could not queue the webhook of job %s", job_id)


def cancel_job(job_id: str, *, settings: Settings | None = None) -> bool:
    """Mark the job cancelled (a terminal state) unless it already finished; True if this call cancelled it.
    Also queues the job's webhook when the job is cancelled (whether by this call or by the caller just before).

    A queued job never starts (its task finds it cancelled); a running job's worker sees the state at its next
    progress callback or stage boundary (within seconds), stops, discards its scratch space and releases the
    lease. The webhook, if any, is sent by a ``cpu`` task.
    """
    from api.db.session import session_scope
    from worker.celery_app import CPU_QUEUE, SEND_WEBHOOK
    from worker.db import session_factory

    settings = settings or get_settings()
    now = utcnow()
    with session_scope(session_factory(settings)) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.not_in(list(TERMINAL_JOB_STATES)))
            .values(state=JobState.CANCELLED, finished_at=now, updated_at=now, eta_at=None, lease_owner=None,
                    lease_expires_at=None, error="cancelled by request")
            .execution_options(synchronize_session=False)
        )
        changed = res.rowcount == 1
        if changed:
            s.add(JobEvent(job_id=job_id, stage=None, kind="state", message="cancelled",
                           data={"state": "cancelled"}))
        row = s.execute(select(Job.state, Job.webhook_url).where(Job.id == job_id)).one_or_none()
    # The API may have set the state itself before calling here: the webhook is still due (the webhook task
    # skips a delivery that already succeeded, so asking twice is harmless).
    if row is not None and row[0] == JobState.CANCELLED and row[1]:
        _send(SEND_WEBHOOK, CPU_QUEUE, job_id, settings)
    return changed

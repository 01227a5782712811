"""The interface between the API and the workers: enqueue a job, cancel a job.

    from worker.dispatch import enqueue_job, cancel_job

    enqueue_job(job.id)   # after the Job row (state queued) is COMMITTED: the worker reads it from the DB
    cancel_job(job.id)    # queued → cancelled at once; running → cancelled, and the worker stops at its next check

The job table is the source of truth (docs/DEPLOY.md): the broker message only says "look at job X".
Sending the same job twice is harmless (a second task finds the job taken or finished and does nothing).
Neither call imports torch or talks to a GPU; both are cheap enough to call inside a request.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.core.config import Settings, get_settings
from api.db.models import TERMINAL_JOB_STATES, Job, JobEvent, JobState

__all__ = ["enqueue_job", "cancel_job", "get_celery"]

_apps: dict[tuple, object] = {}


def get_celery(settings: Settings | None = None):
    """The Celery app for these settings (cached; the worker's own app is worker.celery_app.app)."""
    from worker.celery_app import make_celery

    settings = settings or get_settings()
    key = (settings.broker_url, str(settings.data_dir), settings.job_time_limit, settings.job_soft_time_limit)
    app = _apps.get(key)
    if app is None:
        app = _apps[key] = make_celery(settings)
    return app


def enqueue_job(job_id: str, *, settings: Settings | None = None) -> None:
    """Send task ``nwc.run_job(job_id)`` to the ``gpu`` queue. Commit the Job row first."""
    from worker.celery_app import GPU_QUEUE, RUN_JOB

    get_celery(settings).send_task(RUN_JOB, args=[job_id], queue=GPU_QUEUE, routing_key=GPU_QUEUE)


def cancel_job(job_id: str, *, settings: Settings | None = None, session: Session | None = None) -> bool:
    """Mark the job cancelled (a terminal state) unless it already finished; True if this call cancelled it.
    Also queues the job's webhook when the job is cancelled (whether by this call or by the caller just before).

    A queued job never starts (its task finds it cancelled); a running job's worker sees the state at its next
    progress callback or stage boundary (within seconds), stops, discards its scratch space and releases the
    lease. The webhook, if any, is sent by a ``cpu`` task. With `session`, the update joins the caller's
    transaction and the caller commits (the webhook is then sent only if the job had a webhook_url; call
    after commit is not required because the webhook task re-reads the row and waits for it to be terminal).
    """
    from worker.celery_app import CPU_QUEUE, SEND_WEBHOOK

    settings = settings or get_settings()
    now = datetime.now(UTC)

    def _cancel(s: Session) -> tuple[bool, bool]:
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
        return changed, row is not None and row[0] == JobState.CANCELLED and bool(row[1])

    if session is not None:
        changed, has_hook = _cancel(session)
    else:
        from api.db.session import session_scope
        from worker.db import session_factory

        with session_scope(session_factory(settings)) as s:
            changed, has_hook = _cancel(s)
    if has_hook:
        get_celery(settings).send_task(SEND_WEBHOOK, args=[job_id], queue=CPU_QUEUE, routing_key=CPU_QUEUE,
                                       countdown=1 if session is not None else None)
    return changed

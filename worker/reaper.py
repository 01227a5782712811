"""The reaper: finds jobs whose worker is gone and puts them back in the queue (and fails Hub imports whose API
process is gone: api/services/hub.py).

Embedded brokers have no visibility timeout and a SIGKILLed worker's message is simply lost, so recovery is
driven by the job table: a running job whose lease has expired (no heartbeat for `lease_seconds`) is set back
to queued and re-enqueued, or failed once it has been started `job_max_attempts` times. A queued job that has
waited `queued_resend_seconds` without being claimed is sent again (its message may have been lost between a
commit and a broker outage); duplicates are harmless because only one task can claim a job.

Every worker runs it at start and every `reaper_interval_seconds` (worker/tasks.py); the conditional UPDATEs
make concurrent reapers safe (each job is requeued by exactly one of them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update

from api.core.config import Settings, get_settings
from api.db.models import Job, JobEvent, JobState
from api.db.session import session_scope
from api.db.types import utcnow
from worker.db import session_factory
from worker.dispatch import enqueue_job, notify_job

__all__ = ["reap", "ReaperThread"]

log = logging.getLogger(__name__)


def reap(settings: Settings | None = None, *, enqueue: Callable[[str], None] | None = None,
         notify: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """One pass; returns the ids it requeued, failed and re-sent."""
    settings = settings or get_settings()
    if enqueue is None:
        def enqueue(job_id: str) -> None:
            enqueue_job(job_id, settings=settings)
    if notify is None:
        def notify(job_id: str) -> None:
            notify_job(job_id, settings=settings)

    sf = session_factory(settings)
    t = utcnow()
    requeued: list[str] = []
    failed: list[str] = []
    resent: list[str] = []
    with sf() as s:
        expired = list(s.execute(select(Job.id, Job.attempts, Job.lease_owner).where(
            Job.state == JobState.RUNNING, Job.lease_expires_at < t)))
        stale = list(s.scalars(select(Job.id).where(
            Job.state == JobState.QUEUED, Job.updated_at < t - timedelta(seconds=settings.queued_resend_seconds))))
    for job_id, attempts, owner in expired:
        give_up = attempts >= settings.job_max_attempts
        with session_scope(sf) as s:
            res = s.execute(update(Job).where(
                Job.id == job_id, Job.state == JobState.RUNNING, Job.attempts == attempts,
                Job.lease_expires_at < t,
            ).values(
                state=JobState.FAILED if give_up else JobState.QUEUED, lease_owner=None, lease_expires_at=None,
                eta_at=None, updated_at=t,
                **({"finished_at": t, "error": f"worker lost {attempts} times; gave up"} if give_up else {}),
            ).execution_options(synchronize_session=False))
            if res.rowcount != 1:
                continue
            msg = (f"lease of {owner} expired; failed after {attempts} attempts" if give_up
                   else f"lease of {owner} expired; requeued")
            s.add(JobEvent(job_id=job_id, kind="state", message=msg,
                           data={"state": "failed" if give_up else "queued", "attempts": attempts, "worker": owner}))
        (failed if give_up else requeued).append(job_id)
        log.warning("reaper: job %s %s", job_id, "failed" if give_up else "requeued")
    for job_id in stale:
        with session_scope(sf) as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED,
                                              Job.updated_at < t - timedelta(seconds=settings.queued_resend_seconds))
                            .values(updated_at=t).execution_options(synchronize_session=False))
            if res.rowcount == 1:
                resent.append(job_id)
    for job_id in requeued + resent:
        enqueue(job_id)
    for job_id in failed:
        notify(job_id)
    from api.services.hub import fail_interrupted_imports
    from api.storage import make_store

    imports = fail_interrupted_imports(sf, lambda: make_store(settings), settings)
    return {"requeued": requeued, "failed": failed, "resent": resent, "imports_failed": imports}


class ReaperThread(threading.Thread):
    """Runs `reap` now and then every `interval` seconds until stopped (in the worker's parent process)."""

    def __init__(self, settings: Settings | None = None, interval: float | None = None) -> None:
        super().__init__(name="nwc-reaper", daemon=True)
        self.settings = settings or get_settings()
        self.interval = interval or self.settings.reaper_interval_seconds
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                out = reap(self.settings)
                if any(out.values()):
                    log.info("reaper: %s", out)
            except Exception:
                log.exception("reaper pass failed")
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()

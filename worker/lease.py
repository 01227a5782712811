"""Claiming a job and holding its lease.

The job table is the source of truth (docs/DEPLOY.md). A task runs a job only after *claiming* it: one
conditional UPDATE that succeeds for exactly one claimant (the row's `attempts` acts as a version number), so a
message delivered twice, or re-enqueued by the reaper while the old message is redelivered, runs the job once.
While it runs, a heartbeat thread renews `lease_expires_at` and flushes the latest progress; when it finds the
row no longer leased to this worker it raises the flag that the job's next progress callback turns into
JobCancelled (state cancelled) or LeaseLost (another worker took over after this one stalled).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import TERMINAL_JOB_STATES, Job, JobEvent, JobState
from api.db.session import session_scope
from api.db.types import utcnow

__all__ = ["JobCancelled", "LeaseLost", "Claim", "Lease", "claim_job", "worker_identity"]

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled (cancel_job) while this worker ran it."""


class LeaseLost(Exception):
    """The job is no longer leased to this worker (it stalled past its lease and another worker took over)."""


def worker_identity() -> str:
    """host/pid/random: unique per task execution, readable in the job row."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    owner: str
    attempt: int
    progress: float  # the job's progress when claimed (progress never goes back)


def claim_job(sf: sessionmaker[Session], job_id: str, owner: str, lease_s: float, max_attempts: int
              ) -> Claim | str:
    """Take the job if it is queued, or running on an expired lease; returns a Claim, or why not (a string)."""
    with session_scope(sf) as s:
        job = s.get(Job, job_id)
        if job is None:
            return "no such job"
        t = utcnow()
        if job.state in TERMINAL_JOB_STATES:
            return f"job is {job.state.value}"
        if job.state == JobState.RUNNING and job.lease_expires_at is not None and job.lease_expires_at > t:
            return f"job is leased to {job.lease_owner} until {job.lease_expires_at.isoformat()}"
        cond = [Job.id == job_id, Job.state == job.state, Job.attempts == job.attempts]
        # Only an abandoned run counts against the limit here; a queued job was put there on purpose (the reaper
        # and the retry path check the limit before requeueing; the API's retry starts a fresh count).
        if job.state == JobState.RUNNING and job.attempts >= max_attempts:
            res = s.execute(update(Job).where(*cond).values(
                state=JobState.FAILED, lease_owner=None, lease_expires_at=None, finished_at=t, updated_at=t,
                error=f"gave up after {job.attempts} attempts").execution_options(synchronize_session=False))
            if res.rowcount == 1:
                s.add(JobEvent(job_id=job_id, kind="state", message=f"failed: gave up after {job.attempts} attempts",
                               data={"state": "failed"}))
                return "failed: too many attempts"
            return "lost the race to claim it"
        attempt = job.attempts + 1
        res = s.execute(update(Job).where(*cond).values(
            state=JobState.RUNNING, lease_owner=owner, lease_expires_at=t + timedelta(seconds=lease_s),
            attempts=attempt, started_at=job.started_at or t, updated_at=t, error=None,
        ).execution_options(synchronize_session=False))
        if res.rowcount != 1:
            return "lost the race to claim it"
        s.add(JobEvent(job_id=job_id, kind="state", message=f"running (attempt {attempt}) on {owner}",
                       data={"state": "running", "attempt": attempt, "worker": owner}))
        return Claim(job_id, owner, attempt, float(job.progress or 0.0))


class Lease:
    """Heartbeat thread: renews the lease every `interval` seconds and writes the latest progress with it."""

    def __init__(self, sf: sessionmaker[Session], claim: Claim, lease_s: float, interval: float) -> None:
        self.sf, self.claim, self.lease_s, self.interval = sf, claim, lease_s, interval
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name=f"lease-{claim.job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)

    # -- called from the job's thread

    def set_progress(self, **values: Any) -> None:
        """Fields (stage, progress, eta_at) for the next heartbeat to write."""
        with self._lock:
            self._pending.update(values)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.claim.job_id)
        if self.lost.is_set():
            raise LeaseLost(self.claim.job_id)

    def owned(self) -> list:
        """WHERE clauses that hold only while this worker owns the running job."""
        return [Job.id == self.claim.job_id, Job.lease_owner == self.claim.owner, Job.state == JobState.RUNNING]

    def write(self, s: Session, **values: Any) -> bool:
        """Conditional update of the job row (only while owned); also renews the lease. False: not owned."""
        t = utcnow()
        with self._lock:
            pending, self._pending = self._pending, {}
        vals = {**pending, "lease_expires_at": t + timedelta(seconds=self.lease_s), "updated_at": t, **values}
        res = s.execute(update(Job).where(*self.owned()).values(**vals).execution_options(synchronize_session=False))
        if res.rowcount == 1:
            return True
        state = s.scalar(select(Job.state).where(Job.id == self.claim.job_id))
        (self.cancelled if state == JobState.CANCELLED else self.lost).set()
        return False

    def beat(self) -> None:
        with session_scope(self.sf) as s:
            self.write(s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a DB hiccup: the next beat retries; the lease has slack for a few misses
                log.exception("lease heartbeat for %s failed", self.claim.job_id)
            if self.cancelled.is_set() or self.lost.is_set():
                return

    def release(self) -> None:
        """Give up the lease (after a terminal state or a cancellation); harmless if no longer owned."""
        with session_scope(self.sf) as s:
            s.execute(update(Job).where(Job.id == self.claim.job_id, Job.lease_owner == self.claim.owner)
                      .values(lease_owner=None, lease_expires_at=None)
                      .execution_options(synchronize_session=False))

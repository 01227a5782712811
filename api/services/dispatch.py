"""How the API hands jobs to the worker: a small interface, injectable for tests.

The default implementation imports `worker.dispatch` lazily, at the first call, so the API starts
(and its tests run) without the worker package or a broker; tests pass a RecordingDispatcher.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

__all__ = ["Dispatcher", "DispatchError", "WorkerDispatcher", "RecordingDispatcher"]


class DispatchError(RuntimeError):
    """The job could not be handed to the queue (the API answers 503 and keeps nothing)."""


@runtime_checkable
class Dispatcher(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...


class WorkerDispatcher:
    """worker.dispatch.enqueue_job / cancel_job, imported on first use."""

    def enqueue(self, job_id: str) -> None:
        try:
            from worker.dispatch import enqueue_job
        except ImportError as e:
            raise DispatchError(f"the worker package is not installed ({e})") from e
        try:
            enqueue_job(job_id)
        except Exception as e:  # broker down, misconfigured, ...
            raise DispatchError(f"could not enqueue job {job_id}: {e}") from e

    def cancel(self, job_id: str) -> None:
        try:
            from worker.dispatch import cancel_job
        except ImportError as e:
            raise DispatchError(f"the worker package is not installed ({e})") from e
        try:
            cancel_job(job_id)
        except Exception as e:
            raise DispatchError(f"could not cancel job {job_id}: {e}") from e


class RecordingDispatcher:
    """Remembers what it was asked to do (tests, and a dry-run mode); `fail` makes enqueue raise."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.cancelled: list[str] = []
        self.fail = False
        self._lock = threading.Lock()

    def enqueue(self, job_id: str) -> None:
        if self.fail:
            raise DispatchError("queue unavailable (test)")
        with self._lock:
            self.enqueued.append(job_id)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self.cancelled.append(job_id)

"""How the API hands jobs to the worker: a small interface, injectable for tests.

The default implementation imports `worker.dispatch` lazily, at the first call, so the API starts
(and its tests run) without the worker package or a broker; tests pass a RecordingDispatcher.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

from api.core.config import Settings

__all__ = ["Dispatcher", "DispatchError", "WorkerDispatcher", "RecordingDispatcher"]


class DispatchError(RuntimeError):
    """The job could not be handed to the queue (the API answers 503 and keeps nothing)."""


@runtime_checkable
class Dispatcher(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...


class WorkerDispatcher:
    """worker.dispatch.enqueue_job / cancel_job with the app's settings (broker, database), imported on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def enqueue(self, job_id: str) -> None:
        self._call("enqueue_job", job_id)

    def cancel(self, job_id: str) -> None:
        self._call("cancel_job", job_id)

    def _call(self, name: str, job_id: str) -> None:
        try:
            import worker.dispatch
        except ImportError as e:
            raise DispatchError(f"the worker package is not installed ({e})") from e
        try:
            getattr(worker.dispatch, name)(job_id, settings=self.settings)
        except Exception as e:  # broker down, misconfigured, ...
            raise DispatchError(f"{name}({job_id}) failed: {e}") from e


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

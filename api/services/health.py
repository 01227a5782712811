"""Readiness checks (database, broker, object store) and the broker's queue depth.

The broker is reached through the worker's Celery app for the API's own settings
(worker.dispatch.get_celery, imported lazily): without the worker package its status is
"unknown" (not a failure), so the API can run and be probed on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text

from api.core.config import Settings
from api.storage import StoreError

__all__ = ["check_database", "check_store", "check_broker", "queue_depth", "celery_app"]

log = logging.getLogger("nwc.api.health")
_TIMEOUT_S = 2.0


def celery_app(settings: Settings) -> Any | None:
    """The Celery app the workers of these settings listen on, or None when the worker package is absent."""
    try:
        from worker.dispatch import get_celery

        return get_celery(settings)
    except ImportError:
        return None


def check_database(engine: Any) -> tuple[str, str | None]:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok", None
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def check_store(store: Any) -> tuple[str, str | None]:
    try:
        store.ping()
        return "ok", None
    except StoreError as e:
        return "error", str(e)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def check_broker(settings: Settings) -> tuple[str, str | None]:
    app = celery_app(settings)
    if app is None:
        return "unknown", "worker package not installed; broker not checked"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=_TIMEOUT_S)
        return "ok", None
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def queue_depth(settings: Settings) -> dict[str, int] | None:
    """Messages waiting per queue (Redis: LLEN; filesystem transport: files), None when it cannot be asked."""
    app = celery_app(settings)
    if app is None:
        return None
    try:
        names = [q.name for q in (app.conf.task_queues or ())] or [app.conf.task_default_queue or "celery"]
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=_TIMEOUT_S)
            channel = conn.default_channel
            return {n: int(channel.queue_declare(queue=n, passive=True).message_count) for n in names}
    except Exception as e:
        log.debug("queue depth unavailable: %s", e)
        return None

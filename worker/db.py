"""Database access for worker-side code: one engine per (process, database URL).

Celery's prefork pool forks children from the worker's parent; a connection must never cross a fork,
so engines are keyed by the process id as well as the URL.
"""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.core.config import Settings
from api.db.session import make_engine, make_session_factory

__all__ = ["session_factory", "engine_for"]

_lock = threading.Lock()
_engines: dict[tuple[int, str], tuple[Engine, sessionmaker[Session]]] = {}


def _after_fork_in_child() -> None:
    # A fork while another thread (the reaper) held the lock would leave it locked forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _get(url: str) -> tuple[Engine, sessionmaker[Session]]:
    key = (os.getpid(), url)
    with _lock:
        hit = _engines.get(key)
        if hit is None:
            engine = make_engine(url)
            hit = (engine, make_session_factory(engine))
            _engines[key] = hit
        return hit


def engine_for(settings: Settings) -> Engine:
    return _get(settings.db_url)[0]


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return _get(settings.db_url)[1]

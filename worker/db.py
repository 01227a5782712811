"""Database access for worker-side code: one engine per (process, database URL).

Celery's prefork pool forks children from the worker's parent; a connection must never cross a fork,
so engines are keyed by the process id as well as the URL.
"""

from __future__ import annotations

import os
import threading

from sqlalchemy.orm import Session, sessionmaker

from api.core.config import Settings
from api.db.session import make_engine, make_session_factory

__all__ = ["session_factory"]

_lock = threading.Lock()
_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


def _after_fork_in_child() -> None:
    # A fork while another thread (the reaper) held the lock would leave it locked forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    key = (os.getpid(), settings.db_url)
    with _lock:
        sf = _factories.get(key)
        if sf is None:
            sf = _factories[key] = make_session_factory(make_engine(settings.db_url))
        return sf

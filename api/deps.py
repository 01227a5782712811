"""FastAPI dependencies: settings, database session, object store, dispatcher, the authenticated tenant.

Everything hangs off `app.state.resources` (built by api.main.create_app), created lazily so that
importing the app touches neither the database nor the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, make_url, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth import AuthError, Principal, authenticate
from api.core.config import Settings
from api.db.models import ApiKey
from api.db.session import make_engine, make_session_factory
from api.db.types import utcnow
from api.errors import Unauthorized
from api.logs import bind
from api.services.dispatch import Dispatcher, WorkerDispatcher
from api.storage import ObjectStore, make_store

__all__ = [
    "Resources",
    "get_resources",
    "ResourcesDep",
    "get_db",
    "get_dispatcher",
    "get_principal",
    "DbDep",
    "DispatcherDep",
    "PrincipalDep",
]

# last_used_at is written at most this often per key, so status polling does not turn into writes.
LAST_USED_RESOLUTION_S = 60.0


class Resources:
    """Process-wide handles of one app: engine, sessions, store, dispatcher."""

    def __init__(
        self, settings: Settings, *, store: ObjectStore | None = None, dispatcher: Dispatcher | None = None
    ) -> None:
        self.settings = settings
        if store is not None:
            self.__dict__["store"] = store
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else WorkerDispatcher(settings)
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()

    @cached_property
    def engine(self) -> Engine:
        url = self.settings.db_url
        kw = {}
        if make_url(url).get_backend_name() == "postgresql":
            # Routes run in a thread pool of up to 40 threads; a pool of 5 would make them queue.
            kw = {"pool_size": 20, "max_overflow": 20}
        return make_engine(url, **kw)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return make_store(self.settings)

    def should_touch_key(self, key_row_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last_used.get(key_row_id)
            if last is not None and now - last < LAST_USED_RESOLUTION_S:
                return False
            self._last_used[key_row_id] = now
            return True

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


# The trivial dependencies are `async def` on purpose: FastAPI runs a sync dependency in the thread pool,
# one hop per dependency per request, which costs more than these functions themselves.


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_db(res: ResourcesDep) -> AsyncIterator[Session]:
    """A session per request. Creating one does no I/O (it connects at its first query, in the route's
    thread); closing returns the connection to the pool, rolling back whatever was not committed."""
    session = res.session_factory()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


async def get_dispatcher(res: ResourcesDep) -> Dispatcher:
    return res.dispatcher


_bearer = HTTPBearer(auto_error=False, description="An NWC API key: `Authorization: Bearer nwc_<id>_<secret>`.")


def get_principal(
    res: ResourcesDep,
    db: Annotated[Session, Depends(get_db)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The tenant behind the request's API key; 401 (same body for every reason) otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized()
    try:
        principal = authenticate(db, credentials.credentials)
    except AuthError:
        raise Unauthorized() from None
    if res.should_touch_key(principal.api_key_id):
        db.execute(update(ApiKey).where(ApiKey.id == principal.api_key_id).values(last_used_at=utcnow()))
        db.commit()
    bind(tenant_id=principal.tenant_id)
    return principal


DbDep = Annotated[Session, Depends(get_db)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]

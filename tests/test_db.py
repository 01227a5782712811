"""Schema, migrations and model behaviour on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from services import PostgresServer, postgres_server  # noqa: F401  (pytest fixture)
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from api.db import migrate
from api.db.models import (
    ApiKey,
    Artifact,
    ArtifactKind,
    Base,
    Job,
    JobEvent,
    JobState,
    Model,
    ModelFile,
    ModelSource,
    ModelState,
    Tenant,
)
from api.db.scoping import NotFound, get_for_tenant, tenant_select
from api.db.session import make_engine, make_session_factory, session_scope

TABLES = {"tenants", "api_keys", "models", "model_files", "jobs", "job_events", "artifacts"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a fresh SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'nwc.db'}"  # the parent directory does not exist yet on purpose
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database("t")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrate.upgrade(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with make_session_factory(engine)() as s:
        yield s


def _tables(url: str) -> set[str]:
    eng = make_engine(url, null_pool=True)
    try:
        return set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


# ----------------------------------------------------------------------------- migrations


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == migrate.head_revision()
    assert _tables(db_url) == TABLES | {"alembic_version"}
    migrate.downgrade(db_url, "base")
    assert migrate.current_revision(db_url) is None
    assert _tables(db_url) == {"alembic_version"}
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == migrate.head_revision()
    migrate.upgrade(db_url)  # already at head: a no-op
    assert _tables(db_url) == TABLES | {"alembic_version"}


def test_models_match_migrations(engine: Engine) -> None:
    """What autogenerate would write for a new revision: nothing, while models and migrations agree."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_alembic_cli_takes_url_argument(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert migrate.current_revision(url) == migrate.head_revision()


# ----------------------------------------------------------------------------- models


def _tenant(session: Session, name: str) -> Tenant:
    t = Tenant(name=name)
    session.add(t)
    session.flush()
    return t


def _model(session: Session, tenant: Tenant, name: str = "smollm2") -> Model:
    m = Model(tenant_id=tenant.id, name=name, source=ModelSource.HUB, hub_id="org/smollm2", hub_revision="main")
    session.add(m)
    session.flush()
    return m


def _job(session: Session, model: Model, **kw: object) -> Job:
    j = Job(tenant_id=model.tenant_id, model_id=model.id, method="nwc", target_bits=3.0, **kw)
    session.add(j)
    session.flush()
    return j


def test_full_graph_round_trip(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        t = _tenant(s, "acme")
        s.add(ApiKey(tenant_id=t.id, key_id="abcd1234abcd1234", secret_hash="0" * 64, name="ci"))
        m = _model(s, t)
        m.files.append(ModelFile(path="model.safetensors", key=f"t/{t.id}/m/{m.id}/model.safetensors", size=10,
                                 sha256="a" * 64))
        j = _job(s, m, options={"calib": {"sequences": 64}, "finetune": False}, idempotency_key="req-1",
                 webhook_url="https://hooks.example/x")
        j.events.append(JobEvent(stage="calibrate", kind="progress", message="block 3/30", data={"block": 3}))
        j.events.append(JobEvent(stage="calibrate", kind="progress", message="block 4/30", data={"block": 4}))
        j.artifacts.append(Artifact(tenant_id=t.id, kind=ArtifactKind.BUNDLE, name="model.nwc", key="k", size=5,
                                    sha256="b" * 64))
        ids = (t.id, m.id, j.id)

    with factory() as s:
        tid, mid, jid = ids
        job = s.get(Job, jid)
        assert job is not None
        assert job.state is JobState.QUEUED and job.progress == 0.0 and job.attempts == 0
        assert job.options == {"calib": {"sequences": 64}, "finetune": False}
        assert [e.data["block"] for e in job.events] == [3, 4]  # ordered by the auto-increment id
        assert job.artifacts[0].kind is ArtifactKind.BUNDLE
        model = s.get(Model, mid)
        assert model is not None and model.state is ModelState.PENDING and model.files[0].size == 10
        for ts in (job.created_at, job.updated_at, job.events[0].created_at, model.created_at):
            assert ts.tzinfo is not None and ts.utcoffset() == timedelta(0)
        # Ids are opaque and random, with a readable kind prefix.
        assert tid.startswith("ten_") and mid.startswith("mdl_") and jid.startswith("job_") and len(jid) == 36
        # Enums are stored as their values, as plain strings (no native Postgres enum types to migrate).
        assert s.execute(text("SELECT state FROM jobs")).scalar_one() == "queued"
        assert s.execute(text("SELECT source FROM models")).scalar_one() == "hub"


def test_timestamps_are_aware_utc_and_naive_is_refused(session: Session) -> None:
    t = _tenant(session, "tz")
    m = _model(session, t)
    lease = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    j = _job(session, m, lease_expires_at=lease.astimezone(ZoneInfo("Asia/Tokyo")))
    session.commit()
    session.expire_all()
    got = session.get(Job, j.id)
    assert got is not None and got.lease_expires_at == lease and got.lease_expires_at.tzinfo == UTC
    # Comparisons in SQL work across the stored values (the reaper's query).
    expired = session.scalars(select(Job.id).where(Job.lease_expires_at < datetime(2031, 1, 1, tzinfo=UTC))).all()
    assert expired == [j.id]
    got.lease_expires_at = datetime(2030, 1, 1)  # naive
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_idempotency_key_unique_per_tenant(session: Session) -> None:
    a, b = _tenant(session, "a"), _tenant(session, "b")
    ma, mb = _model(session, a), _model(session, b)
    _job(session, ma, idempotency_key="k1")
    _job(session, mb, idempotency_key="k1")  # another tenant may use the same key
    _job(session, ma)
    _job(session, ma)  # no key: never collides
    session.commit()
    with pytest.raises(IntegrityError):
        _job(session, ma, idempotency_key="k1")
    session.rollback()


def test_foreign_keys_and_cascades(session: Session) -> None:
    with pytest.raises(IntegrityError):  # SQLite enforces this only with PRAGMA foreign_keys=ON
        _job(session, Model(id="mdl_missing", tenant_id="ten_missing"))
    session.rollback()

    t = _tenant(session, "c")
    m = _model(session, t)
    j = _job(session, m)
    session.add(JobEvent(job_id=j.id, kind="state", message="queued"))
    session.commit()
    # A model with jobs cannot be deleted from under them (RESTRICT) ...
    with pytest.raises(IntegrityError):
        session.execute(text("DELETE FROM models WHERE id = :id"), {"id": m.id})
        session.flush()
    session.rollback()
    # ... but deleting the tenant removes everything it owns, in the database itself.
    session.execute(text("DELETE FROM tenants WHERE id = :id"), {"id": t.id})
    session.commit()
    for table in TABLES:
        assert session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table


def test_sqlite_pragmas(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with eng.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() >= 1000
    finally:
        eng.dispose()


# ----------------------------------------------------------------------------- tenant scoping


def test_tenant_scoped_queries(session: Session) -> None:
    a, b = _tenant(session, "alpha"), _tenant(session, "beta")
    ja = _job(session, _model(session, a))
    jb = _job(session, _model(session, b))
    session.commit()

    assert get_for_tenant(session, Job, a.id, ja.id).id == ja.id
    # Another tenant's id behaves exactly like an id that does not exist.
    with pytest.raises(NotFound, match=f"job '{jb.id}' not found"):
        get_for_tenant(session, Job, a.id, jb.id)
    with pytest.raises(NotFound):
        get_for_tenant(session, Job, a.id, "job_doesnotexist")
    assert session.scalars(tenant_select(Job, a.id)).all() == [ja]
    assert session.scalars(tenant_select(Model, b.id).where(Model.name == "smollm2")).one().tenant_id == b.id
    locked = get_for_tenant(session, Job, b.id, jb.id, for_update=True)
    assert locked.id == jb.id


def test_session_scope_rolls_back(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with pytest.raises(RuntimeError), session_scope(factory) as s:
        _tenant(s, "ghost")
        raise RuntimeError("boom")
    with factory() as s:
        assert s.scalars(select(Tenant).where(Tenant.name == "ghost")).all() == []

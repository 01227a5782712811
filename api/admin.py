"""Operator commands: tenants and API keys (`nwc admin …`).

`admin_app` is a typer app; codec/cli.py mounts it with `app.add_typer(admin_app, name="admin")`.
The functions below it do the work on a Session and are what tests and scripts call.
The database is NWC_DATABASE_URL (or the embedded SQLite default), or `--database-url`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import typer
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import issue_api_key
from api.core.config import GiB
from api.db.models import ApiKey, Tenant
from api.db.types import utcnow

__all__ = [
    "admin_app",
    "AdminError",
    "KeyInfo",
    "create_tenant",
    "find_tenant",
    "create_key",
    "revoke_key",
    "list_keys",
    "set_limits",
    "bootstrap_local_key",
]


class AdminError(ValueError):
    pass


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant_id: str
    tenant_name: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


# ----------------------------------------------------------------------------- operations


def create_tenant(
    db: Session, name: str, *, max_concurrent_jobs: int | None = None, max_storage_bytes: int | None = None
) -> Tenant:
    if not name.strip():
        raise AdminError("tenant name must not be empty")
    t = Tenant(name=name, max_concurrent_jobs=max_concurrent_jobs, max_storage_bytes=max_storage_bytes)
    db.add(t)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise AdminError(f"a tenant named {name!r} already exists") from None
    return t


def find_tenant(db: Session, name_or_id: str) -> Tenant:
    t = db.scalars(select(Tenant).where(or_(Tenant.id == name_or_id, Tenant.name == name_or_id))).first()
    if t is None:
        raise AdminError(f"no tenant {name_or_id!r}")
    return t


def create_key(db: Session, tenant: str, name: str = "", *, create: bool = False) -> tuple[Tenant, str, str]:
    """(tenant, key id, full key). The full key exists only in this return value."""
    try:
        t = find_tenant(db, tenant)
    except AdminError:
        if not create:
            raise
        t = create_tenant(db, tenant)
    row, gen = issue_api_key(db, t.id, name)
    return t, row.key_id, gen.token


def revoke_key(db: Session, key_id: str) -> ApiKey:
    """Revoke by public key id (the 16 hex digits after `nwc_`) or by the full key's prefix."""
    key_id = key_id.removeprefix("nwc_").split("_", 1)[0]
    row = db.scalars(select(ApiKey).where(or_(ApiKey.key_id == key_id, ApiKey.id == key_id))).one_or_none()
    if row is None:
        raise AdminError(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def list_keys(db: Session, tenant: str | None = None) -> list[KeyInfo]:
    stmt = select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant_id == find_tenant(db, tenant).id)
    return [
        KeyInfo(k.key_id, t.id, t.name, k.name, k.created_at, k.last_used_at, k.revoked_at)
        for k, t in db.execute(stmt).all()
    ]


def set_limits(
    db: Session, tenant: str, *, max_concurrent_jobs: int | None, max_storage_bytes: int | None
) -> Tenant:
    t = find_tenant(db, tenant)
    t.max_concurrent_jobs = max_concurrent_jobs
    t.max_storage_bytes = max_storage_bytes
    return t


def bootstrap_local_key(db: Session, key_file: Path) -> str | None:
    """Embedded mode's first start: with no API key in the database yet, create tenant "local" and a key, write
    the key to `key_file` (mode 0600, the user's own data directory) and return it; otherwise None. Keys stay
    hash-only in the database; the file is the one copy, which the user may delete once saved elsewhere."""
    if db.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    _, _, token = create_key(db, "local", "created by nwc serve", create=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


# ----------------------------------------------------------------------------- CLI

admin_app = typer.Typer(help="Operator commands: tenants and API keys.", no_args_is_help=True)
_db_url: dict[str, str | None] = {"url": None}


@admin_app.callback()
def _options(
    database_url: str = typer.Option(None, "--database-url", envvar="NWC_DATABASE_URL",
                                     help="database (default: NWC_DATABASE_URL, else the embedded SQLite file)"),
) -> None:
    _db_url["url"] = database_url


def _url() -> str:
    if _db_url["url"]:
        return _db_url["url"]
    from api.core.config import get_settings

    return get_settings().db_url


@contextmanager
def _session() -> Iterator[Session]:
    from api.db.session import make_engine, make_session_factory, session_scope

    engine = make_engine(_url(), null_pool=True)
    try:
        with session_scope(make_session_factory(engine)) as s:
            yield s
    except AdminError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _gib_to_bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * GiB)


def _fmt(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M") if ts else "-"


@admin_app.command("create-tenant")
def create_tenant_cmd(
    name: str,
    max_concurrent_jobs: int = typer.Option(None, min=1, help="default: NWC_TENANT_MAX_CONCURRENT_JOBS"),
    max_storage_gb: float = typer.Option(None, min=0, help="default: NWC_TENANT_MAX_STORAGE_BYTES"),
) -> None:
    """Create a tenant; prints its id."""
    with _session() as db:
        t = create_tenant(db, name, max_concurrent_jobs=max_concurrent_jobs,
                          max_storage_bytes=_gib_to_bytes(max_storage_gb))
        typer.echo(t.id)


@admin_app.command("create-key")
def create_key_cmd(
    tenant: str = typer.Option(..., "--tenant", "-t", help="tenant name or id"),
    name: str = typer.Option("", "--name", help="label for the key"),
    create_tenant_too: bool = typer.Option(False, "--create-tenant", help="create the tenant if it does not exist"),
) -> None:
    """Issue an API key. The key is printed once, on stdout; only its hash is stored."""
    with _session() as db:
        t, key_id, token = create_key(db, tenant, name, create=create_tenant_too)
    typer.echo(f"tenant {t.name} ({t.id}), key id {key_id}: store the key now, it cannot be shown again", err=True)
    typer.echo(token)


@admin_app.command("revoke-key")
def revoke_key_cmd(key_id: str = typer.Argument(..., help="the key id (16 hex digits) or the whole key")) -> None:
    """Revoke an API key; requests with it get 401 from now on."""
    with _session() as db:
        row = revoke_key(db, key_id)
        typer.echo(f"revoked {row.key_id}", err=True)


@admin_app.command("list-keys")
def list_keys_cmd(tenant: str = typer.Option(None, "--tenant", "-t", help="only this tenant (name or id)")) -> None:
    """API keys (ids and dates only; secrets are never stored)."""
    with _session() as db:
        rows = list_keys(db, tenant)
    typer.echo(f"{'key id':<18} {'tenant':<24} {'name':<20} {'created':<17} {'last used':<17} revoked")
    for r in rows:
        typer.echo(f"{r.key_id:<18} {r.tenant_name[:24]:<24} {r.name[:20]:<20} {_fmt(r.created_at):<17} "
                   f"{_fmt(r.last_used_at):<17} {_fmt(r.revoked_at)}")


@admin_app.command("list-tenants")
def list_tenants_cmd() -> None:
    """Tenants and their limits ('-' = the deployment default)."""
    with _session() as db:
        rows = list(db.scalars(select(Tenant).order_by(Tenant.created_at)))
        typer.echo(f"{'id':<38} {'name':<24} {'max jobs':>8} {'max storage':>14}")
        for t in rows:
            jobs = "-" if t.max_concurrent_jobs is None else str(t.max_concurrent_jobs)
            storage = "-" if t.max_storage_bytes is None else str(t.max_storage_bytes)
            typer.echo(f"{t.id:<38} {t.name[:24]:<24} {jobs:>8} {storage:>14}")


@admin_app.command("set-limits")
def set_limits_cmd(
    tenant: str,
    max_concurrent_jobs: int = typer.Option(None, min=1, help="omit for the deployment default"),
    max_storage_gb: float = typer.Option(None, min=0, help="omit for the deployment default"),
) -> None:
    """Set (or reset to the defaults) a tenant's limits."""
    with _session() as db:
        set_limits(db, tenant, max_concurrent_jobs=max_concurrent_jobs,
                   max_storage_bytes=_gib_to_bytes(max_storage_gb))

"""Tenant scoping: the one way routes look rows up, so a foreign id behaves exactly like a missing one."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

__all__ = ["NotFound", "TenantOwned", "tenant_select", "get_for_tenant"]


class NotFound(LookupError):
    """No row with this id for this tenant (the API answers 404, whether it is absent or belongs to another tenant)."""

    def __init__(self, kind: str, id_: str) -> None:
        super().__init__(f"{kind} {id_!r} not found")
        self.kind = kind
        self.id = id_


class TenantOwned(Protocol):
    id: Any
    tenant_id: Any


T = TypeVar("T", bound=TenantOwned)


def tenant_select(model: type[T], tenant_id: str) -> Select[tuple[T]]:
    """``SELECT model WHERE tenant_id = :tenant_id``; add filters and ordering to it."""
    return select(model).where(model.tenant_id == tenant_id)


def get_for_tenant(session: Session, model: type[T], tenant_id: str, id_: str, *, for_update: bool = False) -> T:
    """The row `id_` if it belongs to `tenant_id`, else NotFound; `for_update` locks it (Postgres)."""
    stmt = tenant_select(model, tenant_id).where(model.id == id_)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound(model.__name__.lower(), id_)
    return row

"""Column types and id generation shared by the models."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Enum, Integer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

__all__ = ["UTCDateTime", "JSONType", "BigIntPK", "str_enum", "new_id", "utcnow"]

# Postgres gets JSONB (comparable, indexable); everything else the generic JSON.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Public id such as ``job_3f2a…``: 122 random bits (uuid4), so ids cannot be guessed or enumerated."""
    return f"{prefix}_{uuid.uuid4().hex}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend.

    SQLite has no time zone type and hands back naive values; Postgres returns aware ones in the
    session zone. Both come back as aware UTC here, and naive input is refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite stores the text as given; dropping the offset keeps ordering and comparisons lexical-safe.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def str_enum(cls: type[enum.Enum], **kw: Any) -> Enum:
    """Store an enum's values (not its names) as VARCHAR: no native Postgres type to migrate when a value is added."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=max(16, *(len(str(m.value)) for m in cls)),
        values_callable=lambda e: [str(m.value) for m in e],
        validate_strings=True,
        **kw,
    )

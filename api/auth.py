"""API-key primitives: generate, hash, parse, verify, authenticate against the database.

A key reads ``nwc_<key_id>_<secret>``. The key id is public and indexes the row; only the
sha256 of the secret is stored. A plain fast hash is enough here (unlike for passwords) because
the secret is 256 random bits: nothing about it can be guessed, so slowing guesses down buys nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey
from api.db.types import utcnow

__all__ = [
    "KEY_PREFIX",
    "AuthError",
    "MalformedApiKey",
    "InvalidApiKey",
    "GeneratedKey",
    "ParsedKey",
    "Principal",
    "generate_api_key",
    "hash_secret",
    "parse_api_key",
    "verify_secret",
    "issue_api_key",
    "authenticate",
]

KEY_PREFIX = "nwc"
_KEY_ID_BYTES = 8  # 16 hex chars: unique across all tenants with overwhelming margin
_SECRET_BYTES = 32
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{2 * _KEY_ID_BYTES}}})_([A-Za-z0-9_-]{{43}})$")
# Compared against when the key id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"nwc-dummy").hexdigest()


class AuthError(Exception):
    """Base class: the request is not authenticated (the API answers 401 without saying which check failed)."""


class MalformedApiKey(AuthError):
    """The string does not have the shape of an NWC API key."""


class InvalidApiKey(AuthError):
    """Unknown key id, wrong secret, or a revoked key."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    key_id: str
    secret_hash: str
    token: str  # the full key: show it once, never store it

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"GeneratedKey(key_id={self.key_id!r}, token='nwc_{self.key_id}_…')"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for; every query is scoped by `tenant_id`."""

    tenant_id: str
    api_key_id: str  # ApiKey.id (row), for audit
    key_id: str  # the public part of the key


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def verify_secret(secret: str, secret_hash: str) -> bool:
    """Constant-time comparison of the secret's hash with the stored one."""
    return hmac.compare_digest(hash_secret(secret).encode("ascii"), secret_hash.encode("ascii", "replace"))


def generate_api_key() -> GeneratedKey:
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)  # 43 url-safe characters
    return GeneratedKey(key_id=key_id, secret_hash=hash_secret(secret), token=f"{KEY_PREFIX}_{key_id}_{secret}")


def parse_api_key(token: str) -> ParsedKey:
    m = _KEY_RE.fullmatch(token.strip())
    if m is None:
        raise MalformedApiKey(f"not an API key (expected {KEY_PREFIX}_<16 hex>_<43 url-safe chars>)")
    return ParsedKey(key_id=m.group(1), secret=m.group(2))


def issue_api_key(session: Session, tenant_id: str, name: str = "") -> tuple[ApiKey, GeneratedKey]:
    """Add a key row for `tenant_id` (caller commits); the GeneratedKey's token is the only copy of the secret."""
    gen = generate_api_key()
    row = ApiKey(tenant_id=tenant_id, key_id=gen.key_id, secret_hash=gen.secret_hash, name=name)
    session.add(row)
    session.flush()
    return row, gen


def authenticate(session: Session, token: str, *, now: datetime | None = None) -> Principal:
    """The principal for a presented key, or AuthError. Does not commit."""
    parsed = parse_api_key(token)
    row = session.scalars(select(ApiKey).where(ApiKey.key_id == parsed.key_id)).one_or_none()
    ok = verify_secret(parsed.secret, row.secret_hash if row is not None else _DUMMY_HASH)
    if row is None or not ok:
        raise InvalidApiKey("unknown API key or wrong secret")
    now = now or utcnow()
    if row.revoked_at is not None and row.revoked_at <= now:
        raise InvalidApiKey(f"API key {row.key_id} was revoked")
    return Principal(tenant_id=row.tenant_id, api_key_id=row.id, key_id=row.key_id)

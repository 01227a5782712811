"""API-key primitives: generation, hashing, constant-time verification, lookup against the database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import (
    InvalidApiKey,
    MalformedApiKey,
    authenticate,
    generate_api_key,
    hash_secret,
    issue_api_key,
    parse_api_key,
    verify_secret,
)
from api.db import migrate
from api.db.models import ApiKey, Tenant
from api.db.session import make_engine, make_session_factory
from api.db.types import utcnow


def test_generate_parse_verify() -> None:
    gen = generate_api_key()
    assert gen.token.startswith(f"nwc_{gen.key_id}_")
    parsed = parse_api_key(gen.token)
    assert parsed.key_id == gen.key_id
    assert verify_secret(parsed.secret, gen.secret_hash)
    assert not verify_secret(parsed.secret + "x", gen.secret_hash)
    assert gen.secret_hash == hash_secret(parsed.secret) and len(gen.secret_hash) == 64
    assert parsed.secret not in gen.secret_hash and parsed.secret not in repr(gen)
    assert generate_api_key().token != gen.token


def test_secret_with_underscores_parses() -> None:
    # token_urlsafe secrets may contain '_' and '-': only the first two underscores delimit.
    token = "nwc_0123456789abcdef_" + "_-" * 21 + "a"
    assert parse_api_key(token).secret == "_-" * 21 + "a"


KID = "0123456789abcdef"


@pytest.mark.parametrize(
    "token",
    ["", "nwc_", "Bearer nwc_x_y", f"nwc_{KID}", f"xyz_{KID}_" + "a" * 43, f"nwc_{KID.upper()}_" + "a" * 43,
     f"nwc_{KID}_" + "a" * 42, f"nwc_{KID}_" + "a" * 42 + "!"],
)
def test_malformed_keys(token: str) -> None:
    with pytest.raises(MalformedApiKey):
        parse_api_key(token)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def test_issue_and_authenticate(session: Session) -> None:
    tenant = Tenant(name="acme")
    session.add(tenant)
    session.flush()
    row, gen = issue_api_key(session, tenant.id, name="ci")
    session.commit()

    # Only the hash is stored: the token's secret appears nowhere in the row.
    stored = session.scalars(select(ApiKey)).one()
    secret = parse_api_key(gen.token).secret
    assert secret not in (stored.key_id, stored.secret_hash, stored.name)

    principal = authenticate(session, gen.token)
    assert (principal.tenant_id, principal.api_key_id, principal.key_id) == (tenant.id, row.id, gen.key_id)

    other = generate_api_key()
    with pytest.raises(InvalidApiKey):  # unknown key id
        authenticate(session, other.token)
    with pytest.raises(InvalidApiKey):  # right key id, wrong secret
        authenticate(session, f"nwc_{gen.key_id}_{parse_api_key(other.token).secret}")

    row.revoked_at = utcnow() + timedelta(hours=1)  # scheduled revocation: still valid until then
    session.commit()
    assert authenticate(session, gen.token).tenant_id == tenant.id
    row.revoked_at = utcnow()
    session.commit()
    with pytest.raises(InvalidApiKey, match="revoked"):
        authenticate(session, gen.token)

"""Presigned URLs for the local store: HMAC-signed, expiring tokens.

A token carries what it grants (download one key, or upload one part of one multipart upload)
and until when; the API route that serves /v1/store/{token} calls verify_local_token and acts
only on the returned grant. The signing key is derived from the service secret with a fixed
label, so a token can never double as a webhook signature made with the same secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Literal

from api.storage.base import AccessDenied, TokenExpired, validate_key

__all__ = ["LocalGrant", "sign_local_token", "verify_local_token"]

_LABEL = b"nwc/local-store-token/v1"
Op = Literal["get", "put_part"]


@dataclass(frozen=True, slots=True)
class LocalGrant:
    op: Op
    key: str
    expires_at: int  # unix seconds
    upload_id: str | None = None  # put_part only
    part_number: int | None = None  # put_part only
    download_name: str | None = None  # get only: Content-Disposition file name


def _signing_key(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("empty signing secret")
    return hmac.new(secret, _LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_local_token(secret: bytes, grant: LocalGrant) -> str:
    claims: dict[str, object] = {"op": grant.op, "key": grant.key, "exp": grant.expires_at}
    if grant.upload_id is not None:
        claims["uid"] = grant.upload_id
    if grant.part_number is not None:
        claims["pn"] = grant.part_number
    if grant.download_name is not None:
        claims["fn"] = grant.download_name
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(_signing_key(secret), payload.encode("ascii"), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify_local_token(secret: bytes, token: str, *, now: float | None = None) -> LocalGrant:
    """The grant in `token`; AccessDenied if it is malformed or forged, TokenExpired when past its time."""
    payload, sep, sig = token.partition(".")
    if not sep or not payload or not sig:
        raise AccessDenied("malformed store token")
    want = _b64(hmac.new(_signing_key(secret), payload.encode("utf-8", "replace"), hashlib.sha256).digest())
    # Compared as text, not decoded bytes: base64 has several spellings of the same bytes (unused low
    # bits in the last character), and an altered URL must not verify.
    if not hmac.compare_digest(sig.encode("utf-8", "replace"), want.encode("ascii")):
        raise AccessDenied("store token signature does not match")
    # Signed by us from here on, so a bad shape is a bug, still reported as denial rather than a 500.
    try:
        claims = json.loads(_unb64(payload))
        grant = LocalGrant(
            op=claims["op"],
            key=validate_key(claims["key"]),
            expires_at=int(claims["exp"]),
            upload_id=claims.get("uid"),
            part_number=claims.get("pn"),
            download_name=claims.get("fn"),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise AccessDenied(f"store token payload unreadable: {e}") from e
    if grant.op not in ("get", "put_part"):
        raise AccessDenied(f"store token grants unknown operation {grant.op!r}")
    if grant.op == "put_part" and (grant.upload_id is None or grant.part_number is None):
        raise AccessDenied("part-upload token without upload id or part number")
    if (time.time() if now is None else now) >= grant.expires_at:
        raise TokenExpired(f"store token expired at {grant.expires_at}")
    return grant

"""Signed webhooks for terminal job states.

Each delivery is an HTTP POST of a JSON body with three headers:

    X-NWC-Timestamp: <unix seconds>
    X-NWC-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>
    X-NWC-Delivery:  <unique id of this event; the same across retries, so receivers can deduplicate>

The secret is Settings.secret_key (NWC_SECRET_KEY). A receiver checks the signature over the *raw* body bytes
(before any JSON parsing) and refuses old timestamps, which stops replays::

    from worker.webhooks import verify_signature
    ok = verify_signature(secret, raw_body, headers["X-NWC-Signature"], headers["X-NWC-Timestamp"])

Delivery is retried with exponential backoff on connection errors, timeouts, 408, 429 and 5xx; any other
answer is final. Outcomes are recorded as JobEvents (kind "webhook").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DELIVERY_HEADER",
    "sign",
    "signed_headers",
    "verify_signature",
    "job_payload",
    "deliver",
    "DeliveryResult",
    "send_job_webhook",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-NWC-Signature"
TIMESTAMP_HEADER = "X-NWC-Timestamp"
DELIVERY_HEADER = "X-NWC-Delivery"
DEFAULT_TOLERANCE_S = 300
_RETRY_STATUS = {408, 425, 429}


def _as_bytes(secret: bytes | str) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: bytes | str, timestamp: int, body: bytes) -> str:
    """The X-NWC-Signature value: ``sha256=`` + hex HMAC-SHA256 over ``b"<timestamp>." + body``."""
    mac = hmac.new(_as_bytes(secret), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: bytes | str, body: bytes, *, timestamp: int | None = None,
                   delivery_id: str | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "Content-Type": "application/json",
        "User-Agent": "nwc-webhooks/1",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
        DELIVERY_HEADER: delivery_id or uuid.uuid4().hex,
    }


def verify_signature(secret: bytes | str, body: bytes, signature: str | None, timestamp: str | int | None, *,
                     tolerance_s: float | None = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True if `signature` (the X-NWC-Signature header) signs `timestamp` and the raw `body` with `secret`, and the
    timestamp is within `tolerance_s` of `now` (None: no age check). Constant-time comparison."""
    if not signature or timestamp is None:
        return False
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if tolerance_s is not None and abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), signature.strip().encode())


def job_payload(job: Any, artifacts: list[Any] | None = None) -> dict[str, Any]:
    """The JSON body for a job's terminal state (no download URLs: clients fetch them through the API)."""

    def iso(v: Any) -> str | None:
        return v.isoformat() if v is not None else None

    state = str(job.state.value if hasattr(job.state, "value") else job.state)
    return {
        "type": f"job.{state}",
        "job": {
            "id": job.id,
            "tenant_id": job.tenant_id,
            "model_id": job.model_id,
            "state": state,
            "method": job.method,
            "target_bits": job.target_bits,
            "stage": job.stage,
            "progress": job.progress,
            "attempts": job.attempts,
            "error": job.error,
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
            "artifacts": [{"id": a.id, "kind": str(a.kind.value if hasattr(a.kind, "value") else a.kind),
                           "name": a.name, "size": a.size, "sha256": a.sha256} for a in (artifacts or [])],
        },
    }


@dataclass
class DeliveryResult:
    ok: bool
    attempts: int
    status: int | None
    error: str | None
    delivery_id: str


def deliver(url: str, payload: dict[str, Any], secret: bytes | str, *, attempts: int = 5, backoff_s: float = 2.0,
            timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
            delivery_id: str | None = None, allow_private: bool = False) -> DeliveryResult:
    """POST `payload` to `url`, signed, retrying with backoff_s, 2·backoff_s, 4·backoff_s, ... between attempts.
    Each attempt is signed afresh (new timestamp) over the same body and delivery id. Unless `allow_private`, the
    host is resolved before each attempt and a non-public address ends the delivery (api/egress.py)."""
    import httpx

    from api.egress import BlockedDestination, resolve_checked

    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    delivery_id = delivery_id or uuid.uuid4().hex
    status: int | None = None
    error: str | None = None
    for i in range(1, attempts + 1):
        headers = signed_headers(secret, body, delivery_id=delivery_id)
        try:
            if not allow_private:
                resolve_checked(url)
            r = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
            status, error = r.status_code, None
            if 200 <= r.status_code < 300:
                return DeliveryResult(True, i, status, None, delivery_id)
            error = f"HTTP {r.status_code}"
            if not (r.status_code >= 500 or r.status_code in _RETRY_STATUS):
                return DeliveryResult(False, i, status, error, delivery_id)
        except BlockedDestination as e:
            return DeliveryResult(False, i, None, f"refused: {e}", delivery_id)
        except (httpx.HTTPError, OSError) as e:  # OSError: the name did not resolve (may be transient)
            status, error = None, f"{type(e).__name__}: {e}"
        log.warning("webhook %s attempt %d/%d failed: %s", url, i, attempts, error)
        if i < attempts:
            sleep(backoff_s * 2 ** (i - 1))
    return DeliveryResult(False, attempts, status, error, delivery_id)


def send_job_webhook(job_id: str, settings: Any = None, *, wait_terminal_s: float = 30.0) -> DeliveryResult | None:
    """Deliver the webhook of a job in a terminal state (the `nwc.send_webhook` task); None if it has no URL.
    Waits up to `wait_terminal_s` for the state to become terminal (a cancellation committed after the enqueue)."""
    from sqlalchemy import select

    from api.core.config import get_settings
    from api.db.models import TERMINAL_JOB_STATES, Artifact, Job, JobEvent
    from api.db.session import session_scope
    from worker.db import session_factory

    settings = settings or get_settings()
    sf = session_factory(settings)
    deadline = time.monotonic() + wait_terminal_s
    while True:
        with sf() as s:
            job = s.get(Job, job_id)
            if job is None or not job.webhook_url:
                return None
            if job.state in TERMINAL_JOB_STATES:
                arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))
                payload, url = job_payload(job, arts), job.webhook_url
                break
        if time.monotonic() > deadline:
            log.warning("webhook for %s skipped: job is not in a terminal state", job_id)
            return None
        time.sleep(0.5)
    delivery_id = f"{job_id}.{payload['type']}"
    with sf() as s:
        for ev in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "webhook")):
            if ev.data.get("ok") and ev.data.get("delivery_id") == delivery_id:
                return None  # delivered already (a repeated request or a redelivered task)
    result = deliver(url, payload, settings.secret_bytes(), attempts=settings.webhook_attempts,
                     backoff_s=settings.webhook_backoff_seconds, timeout_s=settings.webhook_timeout_seconds,
                     delivery_id=delivery_id, allow_private=settings.webhook_allow_private)
    with session_scope(sf) as s:
        s.add(JobEvent(job_id=job_id, stage=None, kind="webhook",
                       message="delivered" if result.ok else f"delivery failed: {result.error}",
                       data={"ok": result.ok, "attempts": result.attempts, "status": result.status,
                             "delivery_id": result.delivery_id}))
    return result

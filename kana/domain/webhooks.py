"""The workspace's webhook (SPEC §11): its URL and secret, signing, and deliveries with retries.

A delivery row is created in the transaction that records its alert; a job
POSTs it after the commit. An attempt first claims the row for ``lease`` seconds
(committed), then POSTs, then records the outcome; a worker killed in between
leaves the row due again once the lease passes, and the scheduler's sweep
re-queues it. Failures back off exponentially for 24 h, then the row is failed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import requests
from rq import Queue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kana import paging
from kana.errors import KanaError, NotFound
from kana.models import WebhookDelivery, Workspace

DELIVER_JOB = "jobs.webhooks.deliver"
RETRY_FOR = timedelta(hours=24)
BACKOFF_BASE = 10.0
BACKOFF_CAP = 3600.0
MAX_URL = 2000


class WebhookError(KanaError, ValueError):
    """An unusable webhook URL; ``field`` names the offending field, ``message`` what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", {field: [message]})
        self.field = field
        self.message = message


class DeliveryNotFound(NotFound, LookupError):
    def __init__(self, delivery_id: int) -> None:
        super().__init__(f"No webhook delivery {delivery_id} in this workspace.")


# --- URL and secret ---------------------------------------------------------------


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
            or ip.is_unspecified)


def check_url(url: object, *, allow_private: bool) -> str:
    """An http(s) URL whose host resolves to public addresses only (unless ``allow_private``)."""
    if not isinstance(url, str) or not url.strip():
        raise WebhookError("url", "is required (an http or https URL)")
    url = url.strip()
    if len(url) > MAX_URL:
        raise WebhookError("url", f"must be at most {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("url", "must be an http or https URL with a host")
    if parts.username or parts.password:
        raise WebhookError("url", "must not carry credentials")
    if allow_private:
        return url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as exc:
        raise WebhookError("url", f"host {parts.hostname!r} does not resolve ({exc})") from None
    if any(_blocked(a.split("%")[0]) for a in addresses):
        raise WebhookError("url", f"host {parts.hostname!r} is a loopback, private or link-local address "
                           "(refused against SSRF; KANA_WEBHOOK_ALLOW_PRIVATE=1 allows it)")
    return url


def set_webhook(session: Session, workspace_id: int, url: object, *, allow_private: bool) -> tuple[str, str]:
    """Set the webhook URL with a new secret (returned once; every call rotates it)."""
    checked = check_url(url, allow_private=allow_private)
    ws = session.get(Workspace, workspace_id)
    if ws is None:
        raise LookupError(workspace_id)
    ws.webhook_url = checked
    ws.webhook_secret = "whsec_" + secrets.token_urlsafe(32)
    session.flush()
    return ws.webhook_url, ws.webhook_secret


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """``Kana-Signature``: ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` (Stripe's scheme)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300) -> bool:
    """What a receiver does: the signature matches and is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


# --- deliveries --------------------------------------------------------------------


def list_deliveries(session: Session, workspace_id: int, *, before: int | None = None, limit: int = 50,
                    status: str | None = None) -> tuple[list[WebhookDelivery], int | None]:
    """One page, newest first, after the delivery id ``before``; and the next page's ``before`` (None: last page)."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.workspace_id == workspace_id)
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    return paging.keyset(session, stmt, WebhookDelivery.id, after=before, limit=limit, descending=True)


def retry(session: Session, workspace_id: int, delivery_id: int) -> WebhookDelivery:
    """Make a delivery due now (a failed one gets another 24 h of retries)."""
    row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.workspace_id == workspace_id,
                                                       WebhookDelivery.id == delivery_id))
    if row is None:
        raise DeliveryNotFound(delivery_id)
    if row.status != "delivered":
        now = datetime.now(UTC)
        if row.status == "failed":
            row.created_at = now
        row.status, row.next_attempt_at = "pending", now
        session.flush()
    return row


def enqueue(queue: Queue, delivery_ids: list[int]) -> None:
    """One delivery job per id (after the commit that created or re-armed them)."""
    queue.enqueue_many([
        Queue.prepare_data(DELIVER_JOB, args=(i,), timeout=120, result_ttl=300, failure_ttl=7 * 24 * 3600)
        for i in delivery_ids
    ])


def due(session: Session, now: datetime | None = None, limit: int = 500) -> list[int]:
    """Pending deliveries whose (re)try time has come (the sweep's work list)."""
    now = now or datetime.now(UTC)
    return list(session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ))


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_CAP))


@dataclass
class Attempt:
    url: str
    secret: str
    body: bytes
    key: str


def claim(session: Session, delivery_id: int, lease: float, now: datetime | None = None) -> Attempt | None:
    """Take a due delivery for one attempt (None: not due, done, or no webhook configured)."""
    now = now or datetime.now(UTC)
    stmt = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    row = session.scalar(stmt)
    if row is None or row.status != "pending" or (row.next_attempt_at and row.next_attempt_at > now):
        return None
    ws = session.get(Workspace, row.workspace_id)
    row.attempts += 1
    if ws is None or not ws.webhook_url or not ws.webhook_secret:
        row.last_error = "the workspace has no webhook URL"
        row.next_attempt_at = now + backoff(row.attempts)
        _expire(row, now)
        return None
    # Held for the attempt: the sweep leaves it alone until the lease passes.
    row.next_attempt_at = now + timedelta(seconds=lease)
    session.flush()
    body = json.dumps(row.payload, separators=(",", ":"), sort_keys=True).encode()
    return Attempt(ws.webhook_url, ws.webhook_secret, body, row.idempotency_key)


def post(attempt: Attempt, *, timeout: float, allow_private: bool) -> tuple[int | None, str | None]:
    """POST the signed body; (status, error). The URL is checked again: DNS may have changed."""
    try:
        check_url(attempt.url, allow_private=allow_private)
    except WebhookError as exc:
        return None, exc.message
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Kana-Webhooks/1",
        "Kana-Signature": sign(attempt.secret, attempt.body, int(time.time())),
        "Kana-Idempotency-Key": attempt.key,
    }
    try:
        response = requests.post(attempt.url, data=attempt.body, headers=headers, timeout=timeout,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"[:1000]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"HTTP {response.status_code}: {response.text[:200]}"


def record(session: Session, delivery_id: int, status: int | None, error: str | None,
           now: datetime | None = None) -> WebhookDelivery | None:
    now = now or datetime.now(UTC)
    row = session.get(WebhookDelivery, delivery_id, with_for_update=session.get_bind().dialect.name == "postgresql")
    if row is None or row.status != "pending":
        return row
    row.last_status = status
    if error is None:
        row.status, row.delivered_at, row.last_error, row.next_attempt_at = "delivered", now, None, None
    else:
        row.last_error = error
        row.next_attempt_at = now + backoff(row.attempts)
        _expire(row, now)
    session.flush()
    return row


def _expire(row: WebhookDelivery, now: datetime) -> None:
    if now - row.created_at >= RETRY_FOR or (row.next_attempt_at and row.next_attempt_at - row.created_at > RETRY_FOR):
        row.status = "failed"


def deliver(sessions: sessionmaker, delivery_id: int, *, timeout: float, allow_private: bool) -> str:
    """One attempt at a delivery: claim (committed), POST, record (committed); returns the status."""
    with sessions.begin() as session:
        attempt = claim(session, delivery_id, lease=timeout * 2 + 5)
    if attempt is None:
        with sessions.begin() as session:
            row = session.get(WebhookDelivery, delivery_id)
            return row.status if row is not None else "missing"
    status, error = post(attempt, timeout=timeout, allow_private=allow_private)
    with sessions.begin() as session:
        row = record(session, delivery_id, status, error)
        return row.status if row is not None else "missing"

"""Webhook jobs: one delivery attempt, and the sweep that re-queues deliveries due for a retry."""

from __future__ import annotations

from jobs import runtime
from kana.db import SessionLocal, read_only
from kana.domain import webhooks


def deliver(delivery_id: int) -> dict:
    settings = runtime().settings
    status = webhooks.deliver(SessionLocal, delivery_id, timeout=settings.webhook_timeout,
                              allow_private=settings.webhook_allow_private)
    return {"delivery_id": delivery_id, "status": status}


def sweep() -> dict:
    """Deliveries whose retry time has come, or whose worker died mid-attempt (lease passed)."""
    with read_only(SessionLocal()) as session:
        ids = webhooks.due(session)
    if ids:
        webhooks.enqueue(runtime().queue, ids)
    return {"queued": len(ids)}

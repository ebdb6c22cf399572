"""The workspace's webhook (SPEC §11): its URL and secret, its deliveries, a retry.

A retry commits the re-armed delivery, then queues its job. With Redis down the
delivery stays due (committed) and the scheduler's sweep sends it once Redis is
back, so the retry is not an error: ``queue_error`` says it was not queued now.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from kana.db import SessionLocal
from kana.domain import webhooks
from kana.errors import QUEUE_DOWN
from kana.runtime import Runtime
from kana.serializers import delivery_json

log = logging.getLogger(__name__)

NOT_QUEUED = "The queue (Redis) is unreachable: the delivery is due again and is sent once Redis is back."


def set_url(rt: Runtime, workspace_id: int, url: object) -> dict[str, str]:
    """Set the webhook URL with a new signing secret: ``{"url", "secret"}`` (the secret shown this once)."""
    with SessionLocal.begin() as s:
        url, secret = webhooks.set_webhook(s, workspace_id, url, allow_private=rt.settings.webhook_allow_private)
    return {"url": url, "secret": secret}


def deliveries(workspace_id: int, *, before: int | None, limit: int,
               status: str | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """One page of deliveries newest first (``before`` a delivery id), and the next page's ``before``."""
    with SessionLocal.begin() as s:
        rows, after = webhooks.list_deliveries(s, workspace_id, before=before, limit=limit, status=status)
        return [delivery_json(r) for r in rows], after


def retry(rt: Runtime, workspace_id: int, delivery_id: int) -> dict[str, Any]:
    """Make a delivery due now, then queue it; the delivery as JSON (``queue_error``: not queued)."""
    with SessionLocal.begin() as s:
        body = delivery_json(webhooks.retry(s, workspace_id, delivery_id))
    if body["status"] == "pending":
        try:
            webhooks.enqueue(rt.queue, [delivery_id])
        except RedisError as exc:
            log.warning("delivery %s due again but not queued (%s): %s", delivery_id, QUEUE_DOWN, exc)
            body["queue_error"] = NOT_QUEUED
    return body

"""Dead letters: put a failed call back on its partition queue."""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from kana.db import SessionLocal
from kana.domain import ids
from kana.errors import NotFound, Unavailable
from kana.ingest import processor
from kana.runtime import Runtime

log = logging.getLogger(__name__)


def retry_dead_letter(rt: Runtime, workspace_id: int, dead_letter_id: int) -> str:
    """Requeue the failed call and drop its dead letter; the call's message_id.

    The push happens inside the transaction: with Redis down nothing changes
    (Unavailable). Its drain is enqueued once committed; if that fails the call
    is still queued and the recovery job wakes its partition.
    """
    done = None
    if ids.in_id_range(dead_letter_id):
        try:
            with SessionLocal.begin() as s:
                done = processor.requeue(s, rt.redis, rt.settings.partitions, workspace_id, dead_letter_id)
        except RedisError as exc:
            raise Unavailable() from exc
    if done is None:
        raise NotFound(f"No failed event {dead_letter_id} in this workspace.")
    try:
        rt.enqueue_drains(done.partitions)
    except RedisError as exc:
        log.warning("requeued %s but could not enqueue its drain: %s", done.message_id, exc)
    return done.message_id

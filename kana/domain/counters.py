"""The entitlement cache's side of a transaction: what it changed, written to Redis after its commit.

Kept apart from ``entitlements`` (the check and its database reads) so that the
modules that change who a user is, a plan or usage in bulk (identity, features,
plans, reprocessing) can mark a workspace's cache stale (``touch``) without
depending on the check. Workers add the exact totals a chunk read
(``add_total``) and the webhook deliveries it created (``add_delivery``); after
the commit the generation of each touched workspace moves on, the totals are
written, and the deliveries are queued. A rollback drops them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

PREFIX = "kana:ent"
# Cache entries outlive any period they describe, and go eventually even if a
# generation is abandoned.
TTL = 40 * 24 * 3600

_DIRTY = "kana.entitlements.dirty"
_COUNTERS = "kana.entitlements.counters"
_DELIVERIES = "kana.entitlements.deliveries"

_redis: Callable[[], Redis] | None = None
_enqueue: Callable[[list[int]], None] | None = None


def gen_key(workspace_id: int) -> str:
    return f"{PREFIX}:{workspace_id}:gen"


def base(workspace_id: int, gen: str | bytes) -> str:
    return f"{PREFIX}:{workspace_id}:{text(gen)}"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def touch(session: Session, workspace_id: int) -> None:
    """The workspace's cached identities, plans or totals change with this transaction."""
    session.info.setdefault(_DIRTY, set()).add(workspace_id)


def add_total(session: Session, workspace_id: int, gen: str, kana_id: int, field: str, total: str) -> None:
    """After the commit, ``field`` (``feature|period``) of the user's totals becomes ``total`` under ``gen``."""
    session.info.setdefault(_COUNTERS, []).append((workspace_id, gen, kana_id, field, total))


def add_delivery(session: Session, delivery_id: int) -> None:
    """After the commit, the webhook delivery is queued (the scheduler's sweep covers a failure)."""
    session.info.setdefault(_DELIVERIES, []).append(delivery_id)


def generation(workspace_id: int) -> str | None:
    """The cache generation, read before the totals (see ``kana.domain.entitlements``); None without Redis."""
    if _redis is None:
        return None
    try:
        value = _redis().get(gen_key(workspace_id))
    except RedisError as exc:
        log.warning("entitlement cache generation unreadable: %s", exc)
        return None
    return text(value) if value is not None else "0"


def _after_commit(session: Session) -> None:
    dirty = session.info.pop(_DIRTY, None)
    totals = session.info.pop(_COUNTERS, None)
    deliveries = session.info.pop(_DELIVERIES, None)
    if _redis is None or not (dirty or totals or deliveries):
        return  # most commits: no Redis connection needed
    try:
        redis = _redis()
        pipe = redis.pipeline(transaction=False)
        for workspace_id, gen, kana_id, field, total in totals or ():
            key = f"{base(workspace_id, gen)}:used:{kana_id}"
            pipe.hset(key, field, total)
            pipe.expire(key, TTL)
        for workspace_id in sorted(dirty or ()):
            pipe.incr(gen_key(workspace_id))
        pipe.execute()
    except RedisError as exc:
        # Checks may lag until the pair's next write; the commit stands.
        log.warning("entitlement cache not updated after commit: %s", exc)
    if deliveries and _enqueue is not None:
        try:
            _enqueue(deliveries)
        except RedisError as exc:
            # The rows are committed and due: the scheduler's sweep queues them.
            log.warning("webhook deliveries %s not queued: %s", deliveries, exc)


def _after_rollback(session: Session) -> None:
    for key in (_DIRTY, _COUNTERS, _DELIVERIES):
        session.info.pop(key, None)


def install(sessions: sessionmaker, redis: Callable[[], Redis], enqueue: Callable[[list[int]], None]) -> None:
    """Keep the cache and webhook queue in step with commits made through ``sessions`` (once per process)."""
    global _redis, _enqueue
    _redis, _enqueue = redis, enqueue
    if not event.contains(sessions, "after_commit", _after_commit):
        event.listen(sessions, "after_commit", _after_commit)
        event.listen(sessions, "after_rollback", _after_rollback)


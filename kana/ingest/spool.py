"""The Redis side of ingestion: partitioned event lists, drain locks, wake-ups.

Accepted calls are appended to one of ``settings.partitions`` Redis lists, chosen
by (workspace, userId), so all calls of one user are drained in order by one
worker at a time. A drain job holds the locks of its group of partitions, moves a
chunk of events from each to the partition's *inflight* list, applies them all in
one database transaction, then acknowledges (trims) them. A worker killed
mid-chunk leaves the chunks in the inflight lists; the next holder re-applies
them first, and the unique messageId per workspace makes that re-application a
no-op for whatever had committed.

The lock is short (``settings.lock_ttl``, seconds) and renewed by a heartbeat
thread while its drain runs, so a dead holder's partition is free within that
TTL; live workers look for such partitions every few seconds (``abandoned``)
and take them over, without waiting for the scheduler.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from redis import Redis
from redis.exceptions import RedisError

PREFIX = "kana"
DRAIN_JOB = "jobs.events.drain"


def queue_key(p: int) -> str:
    return f"{PREFIX}:q:{p}"


def inflight_key(p: int) -> str:
    return f"{PREFIX}:inflight:{p}"


def lock_key(p: int) -> str:
    return f"{PREFIX}:lock:{p}"


def wake_key(p: int) -> str:
    return f"{PREFIX}:wake:{p}"


def stats_key(workspace_id: int) -> str:
    return f"{PREFIX}:stats:{workspace_id}"


def takeover_key(p: int) -> str:
    return f"{PREFIX}:takeover:{p}"


def drain_job_id(partitions: list[int]) -> str:
    """A drain job's RQ id names its partitions (``drain-3_7_12-…``), so a look at the queue
    says which partitions have one coming."""
    return f"drain-{'_'.join(map(str, partitions))}-{uuid.uuid4().hex}"


def partitions_of_job(job_id: str) -> list[int]:
    kind, _, rest = job_id.partition("-")
    numbers = rest.partition("-")[0].split("_")
    return [int(n) for n in numbers] if kind == "drain" and all(n.isdigit() for n in numbers) else []


# A wake flag outlives a lost job by at most this long; the recovery job covers the gap.
WAKE_TTL = 600

# Move up to ARGV[2] events to the inflight list, unless a previous holder left
# some there: those come first, exactly as they were.
_CLAIM = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return false end
local left = redis.call('LRANGE', KEYS[2], 0, -1)
if #left > 0 then return left end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('RPUSH', KEYS[2], unpack(items))
return items
"""

# Drop the applied chunk from the inflight list and refresh the lock, only if we
# still hold it (a holder that lost its lock must leave the chunk to the next).
# ARGV: token, count, ttl_ms, then pairs of (stats key, applied count).
_ACK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', ARGV[i], 'pending', -tonumber(ARGV[i + 1]))
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class _Heartbeat:
    """Renews the drain's held partition locks every quarter of their TTL while it runs.

    The drain's main thread may spend long in one transaction (a big chunk, a
    database that is waited for); the locks must outlive that, yet expire within
    their TTL once the process is gone. ``held`` is the drain's own list, read
    as it changes: a partition drained empty is released and drops out.
    """

    def __init__(self, redis: Redis, held: list[int], token: str, ttl_ms: int) -> None:
        self._renew = redis.register_script(_RENEW)
        self._held, self._token, self._ttl_ms = held, token, ttl_ms
        self._interval = ttl_ms / 4000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for p in list(self._held):
                try:
                    # A lock found lost is left alone: the drain's ack will notice and stop.
                    self._renew(keys=[lock_key(p)], args=[self._token, self._ttl_ms])
                except (RedisError, OSError):
                    continue  # Redis blinked: try again; the lock may survive


class LockLost(RuntimeError):
    """The partition lock expired while this drain was applying a chunk."""


def partition_of(workspace_id: int, user_id: str, partitions: int) -> int:
    return zlib.crc32(f"{workspace_id}\x1f{user_id}".encode()) % partitions


def dumps(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


class Encoded(NamedTuple):
    """An event already serialised (``dumps``, UTF-8): the receiver encodes a big array's
    events as it parses them, so it never holds them all as Python objects."""

    ws: int
    userId: str  # noqa: N815 - the queued event's field name
    data: bytes | memoryview


def push(redis: Redis, events: Iterable[dict | Encoded], partitions: int, *, requeue: bool = False) -> list[int]:
    """Append events to their partitions atomically (MULTI/EXEC), in one round trip.

    Returns the partitions whose wake flag this push raised: each needs a drain
    job (``broker.enqueue_drains``). The flags are set in the same transaction
    as the append, so a drain that clears its flag on an empty queue either sees
    these events or leaves them to the job this push's caller enqueues.

    Each event must carry ``ws`` (workspace id) and ``userId``. Raises redis errors
    as they come: the caller answers 503 and the sender retries. ``requeue``
    (a dead letter sent back) counts the calls as pending, not as received again.
    """
    pipe = redis.pipeline(transaction=True)
    touched: dict[int, None] = {}
    per_ws: Counter[int] = Counter()
    for event in events:
        ws, user_id, data = event if isinstance(event, Encoded) else (event["ws"], event["userId"], dumps(event))
        p = partition_of(ws, user_id, partitions)
        pipe.rpush(queue_key(p), data)
        touched[p] = None
        per_ws[ws] += 1
    for ws, n in per_ws.items():
        if not requeue:
            pipe.hincrby(stats_key(ws), "received", n)
        pipe.hincrby(stats_key(ws), "pending", n)
    for p in touched:
        pipe.set(wake_key(p), "1", nx=True, ex=WAKE_TTL)
    raised = pipe.execute()[-len(touched):] if touched else []
    return [p for p, was_set in zip(touched, raised, strict=True) if was_set]


@dataclass
class DrainResult:
    chunks: int = 0  # transactions: each carries a chunk of every partition that had calls
    events: int = 0


def drain(
    redis: Redis,
    partitions: int | Iterable[int],
    apply: Callable[[list[dict]], None],
    *,
    batch_size: int,
    lock_ttl: float,
    max_seconds: float | None = None,
    handoff: Callable[[list[int]], object] | None = None,
) -> DrainResult:
    """Apply the partitions' events until they are empty, their chunks together.

    Each round claims a chunk from every partition this drain holds (``batch_size``
    shared between them) and gives them to ``apply`` as one list, which must
    commit before returning. Under a steady flow each partition holds a few
    calls, and one transaction carries the whole group's instead of one per
    partition. Per-user order holds: a user's calls live in one partition, whose
    chunk keeps their order. Exceptions propagate, leaving the claimed chunks
    inflight for the next holders.

    ``handoff`` gets the partitions that still need a drain job when this one
    stops early: its time slice ran out (``max_seconds``: under sustained load a
    partition never empties, and other partitions' drains need the worker), or
    it failed before reaching them. Partitions whose chunk was inflight when it
    failed are not handed off: the takeover wakes them, spacing retries of a
    chunk that keeps failing.
    """
    waiting = [partitions] if isinstance(partitions, int) else list(partitions)
    held: list[int] = []
    inflight: list[int] = []
    token = uuid.uuid4().hex
    ttl_ms = int(lock_ttl * 1000)
    # A holder that is still running will hand over soon; one that died frees the
    # lock when its TTL runs out. Either way waiting here is what keeps a wake-up
    # from being lost (the holder may have left the queue to us). A live holder
    # keeps the lock for its time slice plus one chunk.
    wait = lock_ttl * 2 + (max_seconds or 0.0)
    claim, ack, release = (redis.register_script(s) for s in (_CLAIM, _ACK, _RELEASE))
    result = DrainResult()
    started = time.monotonic()
    heartbeat = _Heartbeat(redis, held, token, ttl_ms)

    def finish(p: int) -> None:
        held.remove(p)
        release(keys=[lock_key(p)], args=[token])

    try:
        while held or waiting:
            for p in list(waiting):
                if redis.set(lock_key(p), token, nx=True, px=ttl_ms):
                    waiting.remove(p)
                    held.append(p)
            if not held:
                if time.monotonic() - started >= wait:
                    stuck, waiting[:] = list(waiting), []  # left to the takeover, like a failing chunk
                    raise TimeoutError(f"partitions {stuck} stayed locked for {wait:.0f}s")
                time.sleep(0.02)
                continue
            chunks = _claim_chunks(redis, claim, held, token, max(1, batch_size // len(held)), finish)
            if not chunks:
                continue
            inflight[:] = [p for p, _ in chunks]
            decoded = [[json.loads(item) for item in raw] for _, raw in chunks]
            events = [event for part in decoded for event in part]
            apply(events)
            pipe = redis.pipeline(transaction=False)
            for (p, raw), part in zip(chunks, decoded, strict=True):
                args: list = [token, len(raw), ttl_ms]
                for ws, n in Counter(e.get("ws") for e in part).items():
                    args += [stats_key(ws), n]
                ack(keys=[inflight_key(p), lock_key(p)], args=args, client=pipe)
            acked = pipe.execute()
            inflight.clear()
            lost = [p for (p, _), ok in zip(chunks, acked, strict=True) if not ok]
            if lost:
                for p in lost:
                    held.remove(p)  # someone else's now: their chunk stays inflight for them
                raise LockLost(f"partitions {lost}: lock expired while applying a chunk")
            result.chunks += 1
            result.events += len(events)
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
    finally:
        heartbeat.stop()
        left = [p for p in held + waiting if p not in inflight]
        for p in list(held):
            finish(p)
        if left and handoff is not None:
            handoff(left)
    return result


def _claim_chunks(redis: Redis, claim: Callable, held: list[int], token: str, size: int,
                  finish: Callable[[int], None]) -> list[tuple[int, list[bytes]]]:
    """A chunk from each held partition, claimed in one round trip; partitions found empty are finished."""
    def keys(p: int) -> list[str]:
        return [queue_key(p), inflight_key(p), lock_key(p)]

    pipe = redis.pipeline(transaction=False)
    for p in held:
        claim(keys=keys(p), args=[token, size], client=pipe)
    chunks = []
    for p, raw in zip(list(held), pipe.execute(), strict=True):
        while True:
            if raw is None:
                raise LockLost(f"partition {p}: lock lost before claiming")
            if raw:
                chunks.append((p, raw))
                break
            # Empty: clear the wake flag, then look again. A push that landed
            # after our look set the flag anew and enqueued its own drain.
            redis.delete(wake_key(p))
            if redis.llen(queue_key(p)) == 0 or not redis.set(wake_key(p), "1", nx=True, ex=WAKE_TTL):
                finish(p)
                break
            raw = claim(keys=keys(p), args=[token, size])
    return chunks


def _states(redis: Redis, partitions: int) -> list[tuple[int, int, int]]:
    """(queued, inflight, locked) of every partition, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.llen(queue_key(p))
        pipe.llen(inflight_key(p))
        pipe.exists(lock_key(p))
    values = pipe.execute()
    return [tuple(values[3 * p : 3 * p + 3]) for p in range(partitions)]


def stranded(redis: Redis, partitions: int) -> list[int]:
    """Partitions holding events that no live drain holds the lock for."""
    return [p for p, (queued, inflight, locked) in enumerate(_states(redis, partitions))
            if (queued or inflight) and not locked]


def abandoned(redis: Redis, partitions: int, coming: set[int]) -> tuple[list[int], list[int]]:
    """Partitions holding events with no lock and no drain job coming (``coming``: those with one queued).

    Returns (partitions with an inflight chunk, partitions with queued events
    only). An inflight chunk without a lock is always left behind (a drain that
    died or failed); queued events without a lock or a queued job also occur for
    an instant between a push and its job being enqueued, so callers confirm
    those on a second look.
    """
    left: list[int] = []
    idle: list[int] = []
    for p, (queued, inflight, locked) in enumerate(_states(redis, partitions)):
        if locked or p in coming:
            continue
        if inflight:
            left.append(p)
        elif queued:
            idle.append(p)
    return left, idle


def depth(redis: Redis, partitions: int) -> int:
    pipe = redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.llen(queue_key(p))
        pipe.llen(inflight_key(p))
    return sum(pipe.execute())


def workspace_counters(redis: Redis, workspace_id: int) -> dict[str, int]:
    raw = redis.hgetall(stats_key(workspace_id))
    return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}

"""Prometheus metrics: what the receiver counts, and what the queue looks like at scrape time.

Counters live in this module's own ``CollectorRegistry`` (not the global one, so
importing libraries that register metrics there changes nothing here). Queue
depth, processing lag and events processed are read from Redis when scraped, so
they are the same whichever web process answers and whoever did the processing.

Under gunicorn with several worker processes, per-process counters would jump
between scrapes; prometheus_client's multiprocess mode (it switches itself on
when ``PROMETHEUS_MULTIPROC_DIR`` names a directory) is honoured: counters are
then read back from its files, summed over processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from kana.ingest import spool
from kana.ingest.schemas import CALL_TYPES

CONTENT_TYPE = CONTENT_TYPE_LATEST
GLOBAL_STATS_KEY = f"{spool.PREFIX}:stats:global"

REGISTRY = CollectorRegistry()

CALLS_RECEIVED = Counter(
    "kana_calls_received", "Calls accepted and queued, by call type.", ["type"], registry=REGISTRY
)
CALLS_REJECTED = Counter(
    "kana_calls_rejected", "Calls rejected by the receiver, by reason (the error code answered).", ["reason"],
    registry=REGISTRY,
)
# Resolving a labelled child takes a lock and a dict lookup; the hot path reuses these.
_RECEIVED = {kind: CALLS_RECEIVED.labels(kind) for kind in CALL_TYPES}

MULTIPROCESS = values.ValueClass is not values.MutexValue


def count_received(counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        child = _RECEIVED.get(kind)
        (child or CALLS_RECEIVED.labels(kind)).inc(n)


def count_rejected(reason: str, n: int = 1) -> None:
    CALLS_REJECTED.labels(reason).inc(n)


def _received_at(raw: bytes | str | None) -> float | None:
    if raw is None:
        return None
    try:
        stamp = json.loads(raw).get("receivedAt")
        return datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None
    except (ValueError, TypeError, AttributeError):
        return None


class QueueCollector(Collector):
    """Queue depth, processing lag and events processed, read from Redis at scrape time."""

    def __init__(self, redis: Redis, partitions: int) -> None:
        self.redis = redis
        self.partitions = partitions

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("kana_redis_up", "1 when the scrape could read the queue from Redis.")
        try:
            depth = spool.depth(self.redis, self.partitions)
            # A list's head is its oldest event, so the heads are all that needs reading.
            pipe = self.redis.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.lindex(spool.queue_key(p), 0)
                pipe.lindex(spool.inflight_key(p), 0)
            pipe.hget(GLOBAL_STATS_KEY, "processed")
            *heads, processed = pipe.execute()
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("kana_queue_depth", "Events queued or being applied, all partitions.", value=depth)
        stamps = [s for s in map(_received_at, heads) if s is not None]
        lag = max(0.0, time.time() - min(stamps)) if stamps else 0.0
        yield GaugeMetricFamily(
            "kana_processing_lag_seconds", "Age of the oldest event not yet applied (0 when the queue is empty).",
            value=lag,
        )
        yield CounterMetricFamily(
            "kana_events_processed", "Events applied to the database by the workers.", value=int(processed or 0)
        )


class _Scrape:
    """The collectors of one scrape, in the shape ``generate_latest`` expects of a registry."""

    def __init__(self, collectors: list) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def _counters() -> CollectorRegistry:
    if not MULTIPROCESS:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def render(redis: Redis, partitions: int) -> bytes:
    """The Prometheus text exposition of this process's counters and the queue."""
    return generate_latest(_Scrape([_counters(), QueueCollector(redis, partitions)]))  # type: ignore[arg-type]

"""Drain jobs: apply a partition's queued calls, chunk by chunk."""

from __future__ import annotations

from functools import partial

from jobs import runtime
from kana.db import SessionLocal
from kana.ingest import processor, spool
from kana.runtime import Runtime

# A drain gives its worker back after this long so that, under sustained load,
# every partition gets its turn.
TIME_SLICE = 5.0
PROCESSED_KEY = f"{spool.PREFIX}:stats:global"


def _apply(rt: Runtime, calls: list[dict]) -> None:
    outcome = processor.process(SessionLocal, calls)
    rt.redis.hincrby(PROCESSED_KEY, "processed", outcome.applied)


def drain(partition: int) -> dict:
    rt = runtime()
    settings = rt.settings
    result = spool.drain(
        rt.redis,
        partition,
        partial(_apply, rt),
        batch_size=settings.batch_size,
        lock_ttl=settings.lock_ttl,
        max_seconds=TIME_SLICE,
    )
    if result.yielded:
        rt.wake([partition])
    return {"partition": partition, "chunks": result.chunks, "events": result.events}

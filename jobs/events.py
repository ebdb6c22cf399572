"""Drain jobs: apply a group of partitions' queued calls, a chunk of each per transaction."""

from __future__ import annotations

import logging
from functools import partial

from sqlalchemy.exc import DBAPIError

from jobs import runtime
from kana import outages
from kana.db import SessionLocal
from kana.ingest import processor, spool
from kana.runtime import Runtime

# A drain gives its worker back after this long so that, under sustained load,
# every partition gets its turn.
TIME_SLICE = 5.0
PROCESSED_KEY = f"{spool.PREFIX}:stats:global"

log = logging.getLogger(__name__)
DATABASE = outages.Outage("database", log)


def _apply(rt: Runtime, calls: list[dict]) -> None:
    # While the database is unreachable the drain waits here, holding its chunk
    # (the lock heartbeat keeps it), and resumes on its return: an outage
    # delays the chunk, and logs one line, rather than failing a job per try.
    while True:
        try:
            outcome = processor.process(SessionLocal, calls)
            break
        except DBAPIError as exc:
            if outages.database_problem() is None:
                raise  # the database answers: not an outage, let RQ record it
            DATABASE.down(exc.orig or exc)
            outages.wait_until_up(outages.database_problem, DATABASE, stopping=lambda: False)
    rt.redis.hincrby(PROCESSED_KEY, "processed", outcome.applied)


def drain(partitions: list[int] | int) -> dict:
    """Drain the job's partitions (a job queued before groups names one, as an int).

    Partitions it stops before finishing (time slice, failure) are handed to new
    jobs: their wake flags are still raised, so no push would queue one.
    """
    rt = runtime()
    settings = rt.settings
    result = spool.drain(rt.redis, partitions, partial(_apply, rt), batch_size=settings.batch_size,
                         lock_ttl=settings.lock_ttl, max_seconds=TIME_SLICE, handoff=rt.wake)
    return {"partitions": partitions, "chunks": result.chunks, "events": result.events}

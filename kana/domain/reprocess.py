"""Retroactive mapping: apply the current rules and features to stored unmapped events (SPEC §7).

``reprocess`` walks a workspace's ``status='unmapped'`` events in id order
(keyset chunks), each chunk in its own transaction, and for each event that now
maps sets it ``mapped`` and adds its usage row at the event's original time.

Idempotent, also against a concurrent run or live traffic:

* The event is claimed by ``UPDATE events SET status='mapped' … WHERE id IN
  (…) AND status='unmapped' RETURNING id, kana_id, timestamp``. On PostgreSQL
  a concurrent claimer blocks on the row lock, then re-checks the WHERE on the
  committed row and skips it, so only one transaction ever gets an event back;
  usage rows are inserted for the returned events only. SQLite serialises
  writers, so the same holds trivially.
* ``usage.event_id`` is UNIQUE and the insert is ``ON CONFLICT DO NOTHING``:
  even a bug elsewhere could not put two usage rows on one event.
* kana_id and time come from the claimed row (``RETURNING``), so an event a
  concurrent merge moved to its survivor is charged to the survivor.
* Live drains only insert new events; they never revisit a stored one. Rule
  and feature changes wait for in-flight chunks (``rules.hold_mapping``), so
  every event mapped with the old rules is committed before the reprocessing
  job that follows a change starts.

Per chunk the work is set-based: one SELECT, the pure matcher in Python, then
on PostgreSQL one statement (``UPDATE … FROM unnest(arrays) RETURNING`` feeding
``INSERT … ON CONFLICT DO NOTHING``) claims the matched events and writes their
usage; elsewhere one guarded UPDATE per matched feature plus an executemany
INSERT. Memory is bounded by one chunk.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from rq import Queue
from rq.job import JobStatus
from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kana.domain import counters, rules, totals, usage
from kana.models import Event, Usage, utcnow

log = logging.getLogger(__name__)

EVENTS = Event.__table__
USAGE = Usage.__table__
CHUNK = 5000


@dataclass
class Progress:
    """Where a run is: events looked at, mapped by it, and the backlog it started with."""

    total: int = 0
    scanned: int = 0
    mapped: int = 0
    chunks: int = 0

    @property
    def fraction(self) -> float:
        if self.total <= 0:
            return 1.0
        return min(1.0, self.scanned / self.total)

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "scanned": self.scanned, "mapped": self.mapped}


@dataclass(frozen=True)
class ChunkResult:
    scanned: int
    mapped: int
    last_id: int | None


def count_unmapped(session: Session, workspace_id: int) -> int:
    stmt = select(func.count()).select_from(EVENTS).where(
        EVENTS.c.workspace_id == workspace_id, EVENTS.c.status == "unmapped"
    )
    return session.scalar(stmt) or 0


def _insert_usage(session: Session):  # noqa: ANN202 - a dialect-specific Insert
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(USAGE).on_conflict_do_nothing(index_elements=[USAGE.c.event_id])
    if dialect == "sqlite":
        return sqlite.insert(USAGE).on_conflict_do_nothing(index_elements=[USAGE.c.event_id])
    return insert(USAGE)


def reprocess_chunk(session: Session, workspace_id: int, *, after: int = 0, limit: int = CHUNK) -> ChunkResult:
    """Map the next ``limit`` unmapped events with id > ``after``; the caller commits."""
    rules.hold_mapping(session, workspace_id)
    features = usage.load_features(session, workspace_id)
    compiled = rules.load_rules(session, workspace_id)
    rows = session.execute(
        select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.name, EVENTS.c.properties, EVENTS.c.reason)
        .where(
            EVENTS.c.workspace_id == workspace_id,
            EVENTS.c.status == "unmapped",
            EVENTS.c.id > after,
        )
        .order_by(EVENTS.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return ChunkResult(0, 0, None)

    # In id order: claiming rows in one order keeps concurrent runs from deadlocking.
    matched: list[tuple[int, str, Decimal]] = []
    reasons: list[tuple[int, str]] = []
    map_event = usage.map_event
    for event_id, kind, name, properties, reason in rows:
        props = properties if isinstance(properties, dict) else {}
        try:
            mapping = map_event(kind, props, features, compiled, name)
        except ValueError as exc:
            # A stored featureId event with an unusable delta: leave it unmapped, say why.
            mapping = usage.Mapping(reason=f"invalid delta: {exc}"[:500])
        if mapping.feature_id is not None:
            matched.append((event_id, mapping.feature_id, mapping.delta))  # type: ignore[arg-type]
        elif mapping.reason != reason:
            reasons.append((event_id, mapping.reason))  # type: ignore[arg-type]

    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        # Chunks need not wait for their WAL flush one by one: ``reprocess`` ends
        # with a synchronous commit, which flushes every earlier chunk's WAL too,
        # before it reports the run done. A crash before that loses at most some
        # chunks' effects, atomically: their events are still unmapped and the
        # (failed) job's next run maps them.
        session.execute(text("SET LOCAL synchronous_commit = off"))
    recorded = (_claim_postgres if postgres else _claim)(session, workspace_id, matched) if matched else []
    mapped = len(recorded)
    if recorded:
        # (kana_id, feature_id, at, delta) of the usage rows this chunk inserted
        totals.add(session, workspace_id, recorded)
        # New usage for many users at once: the cached totals refill from the ledger.
        counters.touch(session, workspace_id)
    if reasons:
        # Rare: a reason changed (e.g. a rule now names an amount property these events lack).
        if postgres:
            session.execute(_REASONS_PG, {"ids": [r[0] for r in reasons], "reasons": [r[1] for r in reasons],
                                          "ws": workspace_id})
        else:
            session.execute(
                update(EVENTS)
                .where(EVENTS.c.id == bindparam("eid"), EVENTS.c.status == "unmapped")
                .values(reason=bindparam("new_reason")),
                [{"eid": i, "new_reason": r} for i, r in reasons],
            )
    return ChunkResult(len(rows), mapped, rows[-1][0])


# On PostgreSQL one statement claims the chunk's matched events and writes their
# usage: arrays travel as three parameters (psycopg caches the query; thousands of
# IN-list parameters would be re-parsed on every call), the UPDATE's row locks and
# re-checked ``status = 'unmapped'`` make the claim exclusive, and the INSERT takes
# kana_id and time from the claimed rows.
_CLAIM_PG = text("""
WITH matched (id, feature_id, delta) AS (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:features AS varchar[]), CAST(:deltas AS numeric[]))
), claimed AS (
    UPDATE events AS e
    SET status = 'mapped', reason = NULL, feature_id = matched.feature_id
    FROM matched
    WHERE e.id = matched.id AND e.workspace_id = :ws AND e.status = 'unmapped' AND e.kana_id IS NOT NULL
    RETURNING e.id, e.kana_id, e.timestamp, matched.feature_id, matched.delta
)
INSERT INTO usage (workspace_id, kana_id, feature_id, delta, at, event_id, created_at)
SELECT :ws, kana_id, feature_id, delta, timestamp, id, :now FROM claimed
ON CONFLICT (event_id) DO NOTHING
RETURNING kana_id, feature_id, at, delta
""")


_REASONS_PG = text("""
UPDATE events AS e SET reason = r.reason
FROM unnest(CAST(:ids AS bigint[]), CAST(:reasons AS text[])) AS r (id, reason)
WHERE e.id = r.id AND e.workspace_id = :ws AND e.status = 'unmapped'
""")


def _claim_postgres(session: Session, workspace_id: int, matched: list[tuple[int, str, Decimal]]) -> list:
    ids, features, deltas = (list(column) for column in zip(*matched, strict=True))
    return session.execute(_CLAIM_PG, {"ids": ids, "features": features, "deltas": deltas,
                                       "ws": workspace_id, "now": utcnow()}).all()


def _claim(session: Session, workspace_id: int, matched: list[tuple[int, str, Decimal]]) -> list:
    """The portable path (SQLite): one guarded UPDATE … RETURNING per feature, then the usage rows."""
    by_feature: dict[str, list[int]] = defaultdict(list)
    deltas: dict[int, Decimal] = {}
    for event_id, feature_id, delta in matched:
        by_feature[feature_id].append(event_id)
        deltas[event_id] = delta
    recorded = []
    now = utcnow()
    for feature_id, ids in by_feature.items():
        claimed = session.execute(
            update(EVENTS)
            .where(
                EVENTS.c.workspace_id == workspace_id,
                EVENTS.c.id.in_(ids),
                # The guard that makes claiming exclusive (see the module doc).
                EVENTS.c.status == "unmapped",
                EVENTS.c.kana_id.is_not(None),
            )
            .values(status="mapped", reason=None, feature_id=feature_id)
            .returning(EVENTS.c.id, EVENTS.c.kana_id, EVENTS.c.timestamp)
        ).all()
        if not claimed:
            continue
        recorded += session.execute(
            _insert_usage(session).returning(USAGE.c.kana_id, USAGE.c.feature_id, USAGE.c.at, USAGE.c.delta),
            [
                {
                    "workspace_id": workspace_id,
                    "kana_id": kana_id,
                    "feature_id": feature_id,
                    "delta": deltas[event_id],
                    "at": at,
                    "event_id": event_id,
                    "created_at": now,
                }
                for event_id, kana_id, at in claimed
            ],
        ).all()
    return recorded


def _retryable(exc: OperationalError) -> bool:
    # Deadlocks and serialization failures (a merge touching the same events)
    # succeed on a fresh try; a lost connection is an outage and propagates.
    return not (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def reprocess(
    sessions: sessionmaker,
    workspace_id: int,
    *,
    progress: Callable[[Progress], None] | None = None,
    chunk: int = CHUNK,
    attempts: int = 5,
) -> Progress:
    """Reprocess all of a workspace's unmapped events, one committed chunk at a time."""
    with sessions() as session:
        state = Progress(total=count_unmapped(session, workspace_id))
    if progress is not None:
        progress(state)
    cursor = 0
    while True:
        for attempt in range(attempts):
            try:
                with sessions.begin() as session:
                    result = reprocess_chunk(session, workspace_id, after=cursor, limit=chunk)
                break
            except OperationalError as exc:
                if attempt == attempts - 1 or not _retryable(exc):
                    raise
                log.info("reprocessing chunk after %s failed (%s); retrying", cursor, exc)
                time.sleep(0.05 * (2**attempt))
        if result.last_id is None:
            break
        cursor = result.last_id
        state.scanned += result.scanned
        state.mapped += result.mapped
        state.chunks += 1
        # Live traffic can add unmapped events behind the starting count.
        state.total = max(state.total, state.scanned)
        if progress is not None:
            progress(state)
        if result.scanned < chunk:
            break
    _durable(sessions)
    return state


def _durable(sessions: sessionmaker) -> None:
    """Wait until every chunk committed so far is on disk (see ``reprocess_chunk``)."""
    with sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            # A transaction with an xid writes a commit record; committing it
            # synchronously flushes the WAL up to there, earlier chunks included.
            session.execute(text("SELECT pg_current_xact_id()"))


# --- enqueueing -------------------------------------------------------------------------

JOB = "jobs.rules.reprocess"


def _pending_key(workspace_id: int) -> str:
    return f"kana:reprocess:pending:{workspace_id}"


def enqueue(queue: Queue, workspace_id: int, *, why: str = "rules changed") -> str:
    """Queue a reprocessing job for the workspace (after the change committed); returns its id.

    A job for the workspace that is still queued (not started) loads the rules
    when it runs, so it covers this change too: its id is returned instead of
    queueing a second full pass. Raises redis errors.
    """
    redis = queue.connection
    pending = redis.get(_pending_key(workspace_id))
    if pending is not None:
        job_id = pending.decode() if isinstance(pending, bytes) else str(pending)
        job = queue.fetch_job(job_id)
        if job is not None and job.get_status(refresh=True) == JobStatus.QUEUED:
            return job.id
    job = queue.enqueue(
        JOB,
        workspace_id,
        job_timeout=6 * 3600,
        result_ttl=7 * 24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=f"reprocess unmapped events of workspace {workspace_id} ({why})",
        meta={"workspace_id": workspace_id, "progress": 0.0, "kind": "reprocess"},
    )
    redis.set(_pending_key(workspace_id), job.id, ex=7 * 24 * 3600)
    return job.id

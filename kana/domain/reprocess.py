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

Per chunk the work is set-based: one SELECT (``read_chunk``), the pure matcher
in Python, then on PostgreSQL one statement (``UPDATE … FROM unnest(arrays)
RETURNING`` feeding ``INSERT … ON CONFLICT DO NOTHING``) claims the matched
events and writes their usage; elsewhere one guarded UPDATE per matched feature
plus an executemany INSERT (``apply_chunk``). Those two are the only places
reprocessing writes usage rows; they return the rows inserted, which
``totals.add`` adds to the running totals in the same transaction.
Properties are read as stored text and decoded only for events that can map
(a rule names the event, or the text can hold a ``featureId``).

What bounds a run is PostgreSQL writing the claimed events (a new row version
and an entry in each of events' indexes) and their usage rows (three foreign
key checks each). So ``reprocess`` reads the next chunk on a thread while
several chunks are written at once, each in its own transaction; memory is
bounded by a few chunks.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from rq import Queue
from rq.job import JobStatus
from sqlalchemy import Row, Text, bindparam, cast, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kana.db import read_only
from kana.domain import counters, rules, totals, usage
from kana.models import Event, Feature, Usage, utcnow

log = logging.getLogger(__name__)

EVENTS = Event.__table__
USAGE = Usage.__table__
CHUNK = 5000
# Chunks written at once on PostgreSQL (see ``reprocess``).
WRITERS = 2

# An event that maps now: its id, the feature and the amount.
Matched = tuple[int, str, Decimal]


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
    rows = read_chunk(session, workspace_id, after=after, limit=limit)
    if not rows:
        return ChunkResult(0, 0, None)
    return ChunkResult(len(rows), apply_chunk(session, workspace_id, rows), rows[-1][0])


def read_chunk(session: Session, workspace_id: int, *, after: int = 0, limit: int = CHUNK) -> list[Row]:
    """The next ``limit`` unmapped events with id > ``after``: (id, type, name, properties text, reason).

    Properties come as stored text: most unmapped events' names have no rule,
    and those are decided without decoding them (see ``_decide``).
    """
    return list(session.execute(
        select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.name, cast(EVENTS.c.properties, Text), EVENTS.c.reason)
        .where(
            EVENTS.c.workspace_id == workspace_id,
            EVENTS.c.status == "unmapped",
            EVENTS.c.id > after,
        )
        .order_by(EVENTS.c.id)
        .limit(limit)
    ).all())


def apply_chunk(session: Session, workspace_id: int, rows: Sequence[Row]) -> int:
    """Map the events ``read_chunk`` returned with the rules in force now; returns how many it claimed.

    The rows may have been read in an earlier transaction: every decision is
    made here, under ``hold_mapping`` with the rules loaded here, and the claim
    re-checks that each event is still unmapped.
    """
    rules.hold_mapping(session, workspace_id)
    features = usage.load_features(session, workspace_id)
    by_name = _by_name(rules.load_rules(session, workspace_id))
    matched, reasons = _decide(rows, features, by_name)

    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        # Chunks need not wait for their WAL flush one by one: ``reprocess`` ends
        # with a synchronous commit, which flushes every earlier chunk's WAL too,
        # before it reports the run done. A crash before that loses at most some
        # chunks' effects, atomically: their events are still unmapped and the
        # (failed) job's next run maps them.
        session.execute(text("SET LOCAL synchronous_commit = off"))
    mapped = 0
    if matched and postgres:
        mapped = _claim_postgres(session, workspace_id, matched)  # adds to the totals itself
    elif matched:
        recorded = _claim(session, workspace_id, matched)
        # (kana_id, feature_id, at, delta) of the usage rows this chunk inserted
        totals.add(session, workspace_id, recorded)
        mapped = len(recorded)
    if mapped:
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
    return mapped


def _by_name(compiled: list[rules.CompiledRule]) -> dict[str | None, list[rules.CompiledRule]]:
    """The rules grouped by the event name they apply to, each group in the rules' order.

    ``rules.match`` skips every rule naming another event, so matching an event
    against its name's group gives the same result as against all the rules.
    """
    by_name: dict[str | None, list[rules.CompiledRule]] = defaultdict(list)
    for rule in compiled:
        by_name[rule.event].append(rule)
    return dict(by_name)


def _may_name_a_feature(raw: str) -> bool:
    """False only when the stored properties cannot hold a ``featureId`` key.

    A key can only be spelt with escapes (``feature\\u0049d``) if the text has a ``\\u``.
    """
    return "featureId" in raw or "\\u" in raw


def _properties(raw: str | None) -> dict:
    # The same decoder the live path's properties came through (json), so both map alike.
    props = json.loads(raw) if raw else None
    return props if isinstance(props, dict) else {}


def _decide(rows: Sequence[Row], features: dict[str, Feature],
            by_name: dict[str | None, list[rules.CompiledRule]]) -> tuple[list[Matched], list[tuple[int, str]]]:
    """Which of the chunk's events map now (id, feature, delta), and which get a new unmapped reason."""
    # In id order: claiming rows in one order keeps concurrent runs from deadlocking.
    matched: list[Matched] = []
    reasons: list[tuple[int, str]] = []
    map_event = usage.map_event
    for event_id, kind, name, raw, reason in rows:
        candidates = by_name.get(name, ())
        # No rule for the name and no featureId: map_event's answer needs no properties.
        props = _properties(raw) if candidates or _may_name_a_feature(raw or "") else {}
        try:
            mapping = map_event(kind, props, features, candidates, name)
        except ValueError as exc:
            # A stored featureId event with an unusable delta: leave it unmapped, say why.
            mapping = usage.Mapping(reason=f"invalid delta: {exc}"[:500])
        if mapping.feature_id is not None:
            matched.append((event_id, mapping.feature_id, mapping.delta))  # type: ignore[arg-type]
        elif mapping.reason != reason:
            reasons.append((event_id, mapping.reason))  # type: ignore[arg-type]
    return matched, reasons


# On PostgreSQL one statement claims the chunk's matched events and writes their
# usage: arrays travel as three parameters (psycopg caches the query; thousands of
# IN-list parameters would be re-parsed on every call), the UPDATE's row locks and
# re-checked ``status = 'unmapped'`` make the claim exclusive, the INSERT takes
# kana_id and time from the claimed rows, and their running totals are added
# in the same statement.
_CLAIM_PG = text("""
WITH matched (id, feature_id, delta) AS (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:features AS varchar[]), CAST(:deltas AS numeric[]))
), claimed AS (
    UPDATE events AS e
    SET status = 'mapped', reason = NULL, feature_id = matched.feature_id
    FROM matched
    WHERE e.id = matched.id AND e.workspace_id = :ws AND e.status = 'unmapped' AND e.kana_id IS NOT NULL
    RETURNING e.id, e.kana_id, e.timestamp, matched.feature_id, matched.delta
), inserted AS (
    INSERT INTO usage (workspace_id, kana_id, feature_id, delta, at, event_id, created_at)
    SELECT :ws, kana_id, feature_id, delta, timestamp, id, :now FROM claimed
    ON CONFLICT (event_id) DO NOTHING
    RETURNING kana_id, feature_id, at, delta
), added AS (
""" + totals.ADD_PG.format(rows="inserted") + """
    RETURNING 1
)
SELECT count(*) FROM inserted
""")


_REASONS_PG = text("""
UPDATE events AS e SET reason = r.reason
FROM unnest(CAST(:ids AS bigint[]), CAST(:reasons AS text[])) AS r (id, reason)
WHERE e.id = r.id AND e.workspace_id = :ws AND e.status = 'unmapped'
""")


def _claim_postgres(session: Session, workspace_id: int, matched: list[Matched]) -> int:
    """Claims, usage rows and their totals in one statement; returns the usage rows inserted."""
    ids, features, deltas = (list(column) for column in zip(*matched, strict=True))
    return session.execute(_CLAIM_PG, {"ids": ids, "features": features, "deltas": deltas,
                                       "ws": workspace_id, "now": utcnow()}).scalar_one()


def _claim(session: Session, workspace_id: int, matched: list[Matched]) -> list:
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
    writers: int | None = None,
) -> Progress:
    """Reprocess all of a workspace's unmapped events, one committed chunk at a time.

    The chunks are read in id order by a thread one chunk ahead (``_ReadAhead``)
    and written by ``writers`` threads at once, each chunk in its own
    transaction on its own connection (PostgreSQL: ``WRITERS``; SQLite, which
    serialises writers anyway: one). Chunks hold disjoint events, and their
    locks on the workspace row and on the users their usage references are
    shared ones, so writers wait for each other only on the running totals
    they both add to, at the end of a chunk and in key order (no deadlock):
    PostgreSQL's work on the writes, which bounds a run, uses more than one core.
    """
    with sessions() as session:
        state = Progress(total=count_unmapped(session, workspace_id))
        if writers is None:
            writers = WRITERS if session.get_bind().dialect.name == "postgresql" else 1
    if progress is not None:
        progress(state)
    in_flight: deque[tuple[int, Future[int]]] = deque()

    def done() -> None:
        scanned, mapped = in_flight.popleft()
        state.scanned += scanned
        state.mapped += mapped.result()
        state.chunks += 1
        # Live traffic can add unmapped events behind the starting count.
        state.total = max(state.total, state.scanned)
        if progress is not None:
            progress(state)

    with _ReadAhead(sessions, workspace_id, chunk) as chunks, ThreadPoolExecutor(
        max_workers=max(1, writers), thread_name_prefix=f"reprocess-write-{workspace_id}"
    ) as pool:
        # On an error the chunks already handed to writers still finish (leaving
        # the pool waits for them): each is one transaction, whole or not at all.
        for rows in chunks:
            in_flight.append((len(rows), pool.submit(_write, sessions, workspace_id, rows, attempts)))
            if len(in_flight) >= writers:
                done()
        while in_flight:
            done()
    _durable(sessions)
    return state


def _write(sessions: sessionmaker, workspace_id: int, rows: list[Row], attempts: int) -> int:
    """One chunk in its own transaction, retried on a deadlock or serialization failure."""
    attempt = 0
    while True:
        try:
            with sessions.begin() as session:
                return apply_chunk(session, workspace_id, rows)
        except OperationalError as exc:
            attempt += 1
            if attempt >= attempts or not _retryable(exc):
                raise
            log.info("reprocessing chunk from event %s failed (%s); retrying", rows[0][0], exc)
            time.sleep(0.05 * (2 ** (attempt - 1)))


class _ReadAhead:
    """The chunks of unmapped events in id order, each read by a thread one chunk ahead of the writer.

    Each read is its own short read-only transaction; at most ``writers`` + 2
    chunks are in memory (being written, waiting, being read). The reader
    stops after a short chunk, or when the caller leaves the ``with`` block
    (also on an error); a read error is raised in the caller.
    """

    def __init__(self, sessions: sessionmaker, workspace_id: int, limit: int) -> None:
        self._sessions = sessions
        self._workspace_id = workspace_id
        self._limit = limit
        self._ready: queue.Queue[list[Row] | BaseException | None] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reprocess-read-{workspace_id}", daemon=True)

    def __enter__(self) -> Iterator[list[Row]]:
        self._thread.start()
        return self._chunks()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _chunks(self) -> Iterator[list[Row]]:
        while (item := self._ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        after = 0
        try:
            while not self._stop.is_set():
                with self._sessions() as session:
                    rows = read_chunk(read_only(session), self._workspace_id, after=after, limit=self._limit)
                if rows:
                    self._put(rows)
                if len(rows) < self._limit:
                    break
                after = rows[-1][0]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._put(exc)
        self._put(None)

    def _put(self, item: list[Row] | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


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

"""Applying queued calls to the database: events, users and usage in one transaction.

``process`` is the unit of work a drain job runs per chunk: the whole chunk in
one transaction (micro-batching), retried on lock races, and when a chunk keeps
failing for a data reason, each call in its own savepoint so one poison call
becomes a dead letter while the rest commit.

A chunk's events go in first, with one ``INSERT … ON CONFLICT DO NOTHING
RETURNING``: the unique key (workspace_id, message_id) decides which calls are
new, whatever the planner thinks of the table, and only those calls change
users, usage and entitlements. Users change as the rows of an
``identity.BatchDirectory`` (the CSV import's), which writes the chunk's new
users in one multi-row INSERT and its changed users in one UPDATE per set of
changed columns; usage rows follow in one multi-row insert, and events whose
user was not known up front get their kana_id in one executemany.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from kana import db
from kana.domain import entitlements, identity, rules, totals, usage
from kana.domain.billing import provider_of
from kana.errors import KanaError
from kana.ingest import spool
from kana.models import DeadLetter, Event, Usage, Workspace, utcnow

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    dropped: int = 0

    def __iadd__(self, other: Outcome) -> Outcome:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead += other.dead
        self.dropped += other.dropped
        return self


@dataclass
class Requeued:
    message_id: str
    partitions: list[int]  # whose drain jobs the caller enqueues after its commit


def parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def traits_of(traits: dict, billing_provider: str | None, context: dict | None = None) -> identity.Traits:
    def text(source: dict, key: str, limit: int | None = None) -> str | None:
        value = source.get(key)
        if value is None or isinstance(value, dict | list):
            return None
        value = str(value).strip()
        # Over-long locale/timezone values are not real ones: dropped, not truncated.
        return value if value and (limit is None or len(value) <= limit) else None

    billing_id = text(traits, "billingUserId") or text(traits, "billingId")
    context = context or {}
    return identity.Traits(
        email=text(traits, "email"),
        name=text(traits, "name"),
        billing_id=billing_id,
        billing_provider=provider_of(billing_id, billing_provider) if billing_id else None,
        locale=text(context, "locale", 100),
        timezone=text(context, "timezone", 100),
    )


EVENTS = Event.__table__
USAGE = Usage.__table__


class _Directory(identity.BatchDirectory):
    """The chunk's Directory: before users are merged away, the chunk's pending writes land
    (usage rows and events' kana_ids of the users the merge moves)."""

    def __init__(self, session: Session, workspace_id: int, settle) -> None:  # noqa: ANN001
        super().__init__(session, workspace_id)
        self._settle = settle

    def merge(self, users: list[identity.UserRow], **kwargs) -> identity.UserRow:  # noqa: ANN003
        self._settle()
        return super().merge(users, **kwargs)


class _Workspace:
    """What applying one workspace's calls needs, loaded once per chunk."""

    def __init__(self, session: Session, row: Workspace, user_ids: list[str], emails: list[str]) -> None:
        self.session = session
        self.row = row
        # Taken before loading what maps events, so a rule or feature change
        # waits for this chunk and its reprocessing job sees this chunk's events.
        rules.hold_mapping(session, row.id)
        self.features = usage.load_features(session, row.id)
        self.rules = rules.load_rules(session, row.id)
        self.directory = _Directory(session, row.id, self.settle)
        self.directory.preload(user_ids)
        self.directory.preload_unclaimed(emails)
        # (kana_id, feature_id) of the ledger rows this chunk adds: their totals
        # go to the entitlement cache and are checked against alert thresholds.
        self.recorded: set[tuple[int, str]] = set()
        # Writes waiting for users' kana_ids: (event id, user) and usage rows (with their user).
        self._kana: list[tuple[int, identity.UserRow]] = []
        self._usage: list[tuple[dict, identity.UserRow]] = []

    def event_row(self, call: dict, kana_id: int | None) -> dict:
        """The events row of a call, as far as it is known before the call is applied."""
        kind = call["type"]
        row = {
            "workspace_id": self.row.id, "message_id": call["messageId"], "type": kind, "name": None,
            "user_id": call["userId"], "kana_id": kana_id, "timestamp": parse_time(call.get("timestamp")),
            "received_at": parse_time(call.get("receivedAt")), "properties": {}, "context": call.get("context"),
            "timestamps": call.get("timestamps"), "status": "processed", "reason": None, "feature_id": None,
            "processed_at": utcnow(),
        }
        if kind == "identify":
            row["properties"] = call.get("traits") or {}
        elif kind in usage.MAPPABLE:
            properties = call.get("properties") or {}
            name = call.get("event") if kind == "track" else call.get("name")
            mapping = usage.map_event(kind, properties, self.features, self.rules, name)
            row.update(name=name, properties=properties, **usage.status_of(mapping))
            row["mapping"] = mapping
        elif kind == "group":
            row.update(name=str(call["groupId"]), properties=call.get("traits") or {})
        elif kind == "alias":
            row.update(name=call["previousId"], properties={"previousId": call["previousId"]})
        elif kind == "delete":
            # Stored without the user id or context (PII-free) so a redelivery is still a duplicate.
            row.update(user_id="", context=None)
        else:
            raise ValueError(f"unsupported call type {kind!r}")
        return row

    def insert_events(self, calls: list[dict]) -> list[tuple[dict, dict, int]]:
        """Insert the calls' events; returns (call, row, event id) of those new to the workspace, in order."""
        rows = []
        known = True  # until a delete: later calls' users may be deleted before they apply
        for call in calls:
            if call["type"] == "delete":
                known = False
            user = self.directory.find(call["userId"]) if known and call["type"] not in ("alias", "delete") else None
            rows.append(self.event_row(call, user.kana_id if user is not None else None))
        columns = [{k: v for k, v in row.items() if k != "mapping"} for row in rows]
        ids = dict(db.insert_rows(self.session, EVENTS, columns, skip_conflicts=["workspace_id", "message_id"],
                                  returning=["message_id", "id"]))
        return [(call, row, ids[call["messageId"]]) for call, row in zip(calls, rows, strict=True)
                if call["messageId"] in ids]

    def apply(self, call: dict, row: dict, event_id: int) -> None:
        kind = call["type"]
        directory = self.directory
        if kind == "identify":
            traits = call.get("traits") or {}
            user = identity.identify(
                directory,
                call["userId"],
                traits_of(traits, self.row.billing_provider, call.get("context")),
                row["timestamp"],
            )
        elif kind in usage.MAPPABLE:
            user = directory.get_or_create(call["userId"])
            mapping = row["mapping"]
            if mapping.feature_id is not None:
                self._usage.append(({"workspace_id": self.row.id, "feature_id": mapping.feature_id,
                                     "delta": mapping.delta, "at": row["timestamp"], "event_id": event_id,
                                     "created_at": row["processed_at"]}, user))
        elif kind == "group":
            user = directory.get_or_create(call["userId"])
            traits = call.get("traits") or {}
            user.group_id = row["name"]
            if traits.get("name") is not None:
                user.group_name = str(traits["name"])
        elif kind == "alias":
            user = identity.alias(directory, call["previousId"], call["userId"], at=row["timestamp"])
        else:  # delete
            self.settle()
            identity.gdpr_delete(directory, call["userId"])
            user = None
        if user is not None and (user.kana_id is None or user.kana_id != row["kana_id"]):
            self._kana.append((event_id, user))

    def settle(self) -> None:
        """Write the users' changes, then what waited for kana_ids: events' kana_ids and usage rows."""
        self.directory.write()
        if self._kana:
            self.session.execute(
                update(EVENTS).where(EVENTS.c.id == bindparam("event_id")).values(kana_id=bindparam("kana")),
                [{"event_id": event_id, "kana": user.kana_id} for event_id, user in self._kana],
            )
        if self._usage:
            rows = [{**row, "kana_id": user.kana_id} for row, user in self._usage]
            db.insert_rows(self.session, USAGE, rows)
            # Only new events get here (insert_events skipped the stored ones), so
            # every row is new to the ledger and to its totals.
            totals.add(self.session, self.row.id, ((r["kana_id"], r["feature_id"], r["at"], r["delta"]) for r in rows))
            self.recorded.update((r["kana_id"], r["feature_id"]) for r in rows)
        self._kana, self._usage = [], []


def apply(session: Session, calls: list[dict]) -> Outcome:
    """Apply calls in order; a messageId already stored (per workspace) changes nothing."""
    outcome = Outcome()
    by_ws: dict[int, list[dict]] = defaultdict(list)
    for call in calls:
        by_ws[call["ws"]].append(call)
    for ws_id, ws_calls in by_ws.items():
        row = session.get(Workspace, ws_id)
        if row is None:
            log.warning("dropping %d calls of deleted workspace %s", len(ws_calls), ws_id)
            outcome.dropped += len(ws_calls)
            continue
        firsts: dict[str, dict] = {}
        for call in ws_calls:
            firsts.setdefault(call["messageId"], call)
        unique = list(firsts.values())
        user_ids = [c["userId"] for c in unique] + [c["previousId"] for c in unique if c.get("previousId")]
        emails = [c["traits"]["email"] for c in unique if c["type"] == "identify" and isinstance(
            (c.get("traits") or {}).get("email"), str)]
        # Users are written together by ``settle``; identity code writes
        # explicitly where it must (merges, renames, deletes).
        with session.no_autoflush:
            context = _Workspace(session, row, user_ids, emails)
            fresh = context.insert_events(unique)
            for call, event, event_id in fresh:
                context.apply(call, event, event_id)
            context.settle()
        session.flush()
        outcome.applied += len(fresh)
        outcome.duplicates += len(ws_calls) - len(fresh)
        entitlements.after_usage(session, ws_id, context.recorded)
    return outcome


def dead_letter(session: Session, call: dict, error: BaseException) -> None:
    """Keep a call that failed for a data reason, with its error, for retry."""
    message = f"{type(error).__name__}: {error}"[:2000]
    ws = call.get("ws")
    if not isinstance(ws, int) or session.get(Workspace, ws) is None:
        log.error("dropping a call with no valid workspace: %s", message)
        return
    mid = str(call.get("messageId") or "")
    row = session.scalar(select(DeadLetter).where(DeadLetter.workspace_id == ws, DeadLetter.message_id == mid))
    if row is None:
        session.add(
            DeadLetter(workspace_id=ws, message_id=mid, user_id=call.get("userId"), payload=call, error=message)
        )
    else:
        row.attempts += 1
        row.error = message
        row.payload = call
    session.flush()


class NotRetryable(KanaError, ValueError):
    """A dead letter without the userId or messageId a queued call needs."""

    status = 409
    code = "not_retryable"


def requeue(session: Session, redis: Redis, partitions: int, workspace_id: int, dead_letter_id: int) -> Requeued | None:
    """Send a dead letter's call back to its partition queue and drop the row; None when there is no such row.

    Pushed before the caller commits: if Redis is down the push raises and the
    row stays (rollback); if the commit fails after the push, the call is queued
    anyway and its messageId keeps the reapplication idempotent. The caller
    enqueues ``Requeued.partitions``' drains once committed.
    """
    row = session.scalar(select(DeadLetter).where(DeadLetter.workspace_id == workspace_id,
                                                  DeadLetter.id == dead_letter_id))
    if row is None:
        return None
    payload = dict(row.payload) if isinstance(row.payload, dict) else {}
    if not isinstance(payload.get("userId"), str) or not payload.get("messageId"):
        raise NotRetryable("This failed call has no userId or messageId and cannot be requeued.")
    payload["ws"] = workspace_id
    session.delete(row)
    session.flush()
    return Requeued(row.message_id, spool.push(redis, [payload], partitions, requeue=True))


def _disconnected(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated)


def process(sessions: sessionmaker, calls: list[dict], *, attempts: int = 3) -> Outcome:
    """Apply a chunk of calls and commit; database outages propagate (the chunk stays queued)."""
    for attempt in range(attempts):
        try:
            with sessions.begin() as session:
                return apply(session, calls)
        except (OperationalError, IntegrityError, StaleDataError, identity.Gone) as exc:
            # Lock races with another partition's merge (deadlock, a row merged
            # away under us) resolve on a fresh try; an outage must not be
            # mistaken for bad data, so it goes back to the caller.
            if isinstance(exc, DBAPIError) and _disconnected(exc):
                raise
            if attempt == attempts - 1 and isinstance(exc, OperationalError):
                raise
            log.info("chunk attempt %d failed (%s); retrying", attempt + 1, exc)
            time.sleep(0.05 * (2**attempt))
        except (ValueError, TypeError, KeyError, LookupError, ArithmeticError, DBAPIError) as exc:
            log.warning("chunk failed for a data reason (%s); isolating calls", exc)
            break
    return _isolate(sessions, calls)


def _isolate(sessions: sessionmaker, calls: list[dict]) -> Outcome:
    outcome = Outcome()
    with sessions.begin() as session:
        for call in calls:
            try:
                with session.begin_nested():
                    outcome += apply(session, [call])
            except OperationalError:
                raise
            except Exception as exc:  # noqa: BLE001 - any data problem in one call must not block the rest
                dead_letter(session, call, exc)
                outcome.dead += 1
    return outcome

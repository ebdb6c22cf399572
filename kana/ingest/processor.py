"""Applying queued calls to the database: events, users and usage in one transaction.

``process`` is the unit of work a drain job runs per chunk: the whole chunk in
one transaction (micro-batching), retried on lock races, and when a chunk keeps
failing for a data reason, each call in its own savepoint so one poison call
becomes a dead letter while the rest commit.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from kana import db
from kana.domain import entitlements, identity, rules, usage
from kana.domain.billing import provider_of
from kana.errors import KanaError
from kana.ingest import spool
from kana.models import DeadLetter, Event, User, Workspace

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
        self.directory = identity.Directory(session, row.id)
        self.directory.preload(user_ids)
        self.directory.preload_unclaimed(emails)
        # Ledger rows this chunk adds: their (user, feature) totals go to the
        # entitlement cache and are checked against alert thresholds.
        self.recorded: list = []

    def store(
        self,
        call: dict,
        user: User | None,
        *,
        name: str | None = None,
        properties: dict | None = None,
        status: str = "processed",
        user_id: str | None = None,
    ) -> Event:
        event = Event(
            workspace_id=self.row.id,
            message_id=call["messageId"],
            type=call["type"],
            name=name,
            user_id=call["userId"] if user_id is None else user_id,
            user=user,
            timestamp=parse_time(call.get("timestamp")),
            received_at=parse_time(call.get("receivedAt")),
            properties=properties if properties is not None else {},
            context=call.get("context"),
            timestamps=call.get("timestamps"),
            status=status,
        )
        self.session.add(event)
        return event

    def apply(self, call: dict) -> None:
        kind = call["type"]
        directory = self.directory
        if kind == "identify":
            traits = call.get("traits") or {}
            user = identity.identify(
                directory,
                call["userId"],
                traits_of(traits, self.row.billing_provider, call.get("context")),
                parse_time(call.get("timestamp")),
            )
            self.store(call, user, properties=traits)
        elif kind in usage.MAPPABLE:
            user = directory.get_or_create(call["userId"])
            properties = call.get("properties") or {}
            name = call.get("event") if kind == "track" else call.get("name")
            event = self.store(call, user, name=name, properties=properties, status="unmapped")
            mapping = usage.map_event(kind, properties, self.features, self.rules, name)
            row = usage.record(self.session, event, mapping)
            if row is not None:
                self.recorded.append(row)
        elif kind == "group":
            user = directory.get_or_create(call["userId"])
            traits = call.get("traits") or {}
            user.group_id = str(call["groupId"])
            if traits.get("name") is not None:
                user.group_name = str(traits["name"])
            self.store(call, user, name=user.group_id, properties=traits)
        elif kind == "alias":
            user = identity.alias(directory, call["previousId"], call["userId"], at=parse_time(call.get("timestamp")))
            self.store(call, user, name=call["previousId"], properties={"previousId": call["previousId"]})
        elif kind == "delete":
            identity.gdpr_delete(directory, call["userId"])
            # Stored without the user id or context (PII-free) so a redelivery is still a duplicate.
            self.store({**call, "context": None}, None, user_id="")
        else:
            raise ValueError(f"unsupported call type {kind!r}")


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
        ids = sorted({c["messageId"] for c in ws_calls})
        seen: set[str] = set()
        for i in range(0, len(ids), 500):
            seen.update(
                session.scalars(
                    select(Event.message_id).where(Event.workspace_id == ws_id, Event.message_id.in_(ids[i : i + 500]))
                )
            )
        user_ids = [c["userId"] for c in ws_calls] + [c["previousId"] for c in ws_calls if c.get("previousId")]
        emails = [c["traits"]["email"] for c in ws_calls if c["type"] == "identify" and isinstance(
            (c.get("traits") or {}).get("email"), str)]
        # One flush at the end inserts the chunk's users, events and usage in
        # batches; identity code flushes explicitly where it must (merges).
        with session.no_autoflush:
            context = _Workspace(session, row, user_ids, emails)
            for call in ws_calls:
                if call["messageId"] in seen:
                    outcome.duplicates += 1
                    continue
                seen.add(call["messageId"])
                context.apply(call)
                outcome.applied += 1
        db.assign_ids(session)
        session.flush()
        entitlements.after_usage(session, ws_id, {(row.kana_id, row.feature_id) for row in context.recorded})
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
        except (OperationalError, IntegrityError, StaleDataError) as exc:
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

"""Helpers shared by the test modules: users, features, Segment calls and usage, each defined once."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kana.db import SessionLocal, read_only
from kana.domain import identity
from kana.models import Feature, Usage, UsageTotal, User

# --- users ---------------------------------------------------------------------------------


def add_user(session: Session, ws: int, *, user_id: str | None = None, email: str | None = None,
             billing_id: str | None = None, name: str | None = None, source: str = "api") -> User:
    """A user in the caller's session (billing ids are Stripe's)."""
    return identity.create_user(session, ws, user_id=user_id, email=email, billing_id=billing_id, name=name,
                                billing_provider="stripe" if billing_id else None, source=source)


def make_user(ws_id: int, user_id: str | None = None, created_at: datetime | None = None, **fields) -> int:
    """A user committed in its own transaction; returns its kana_id."""
    with SessionLocal.begin() as s:
        user = identity.create_user(s, ws_id, user_id=user_id, **fields)
        if created_at is not None:
            user.created_at = created_at
        return user.kana_id


def users_of(session: Session, ws: int) -> list[User]:
    """The workspace's users in kana_id order (pending changes flushed first)."""
    session.flush()
    return list(session.scalars(select(User).where(User.workspace_id == ws).order_by(User.kana_id)))


# --- features, calls and usage ---------------------------------------------------------------


def add_feature(ws_id: int, feature_id: str = "messages", kind: str = "consumable") -> None:
    with SessionLocal.begin() as s:
        s.add(Feature(workspace_id=ws_id, id=feature_id, name=feature_id.title(), type=kind))


def track(user_id: str, event: str = "Used", props: dict | None = None, *, feature: str | None = None,
          delta: object = None, timestamp: str | datetime | None = None, message_id: str | None = None) -> dict:
    """A Segment track call; ``feature`` / ``delta`` fill properties.featureId / properties.delta."""
    properties = dict(props or {})
    if feature is not None:
        properties["featureId"] = feature
    if delta is not None:
        properties["delta"] = delta
    call = {"type": "track", "userId": user_id, "event": event, "properties": properties,
            "messageId": message_id or f"m-{uuid.uuid4().hex}"}
    if timestamp:
        call["timestamp"] = timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp
    return call


def post_batch(client, ws, calls: list[dict]):
    resp = client.post("/v1/batch", json={"batch": calls}, headers=ws.headers)
    assert resp.status_code == 200, resp.get_json()
    return resp


def usage_total(ws_id: int, feature_id: str = "messages") -> Decimal:
    # Read-only: on SQLite, polls beside running workers must not queue behind their writes.
    with read_only(SessionLocal()) as s:
        total = s.scalar(select(func.coalesce(func.sum(Usage.delta), 0)).where(
            Usage.workspace_id == ws_id, Usage.feature_id == feature_id))
    return Decimal(str(total))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def count(model, ws_id: int, *where) -> int:
    """Rows of ``model`` in the workspace (read-only, like ``usage_total``)."""
    with read_only(SessionLocal()) as s:
        return s.scalar(select(func.count()).select_from(model).where(model.workspace_id == ws_id, *where))


def totals_mismatches() -> list[tuple]:
    """Where ``usage_totals`` differs from the ledger's own day and month sums (empty: they agree).

    Summed independently of ``kana.domain.totals``, from one snapshot of both tables.
    """
    def utc(value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    expected: dict[tuple, Decimal] = defaultdict(Decimal)
    found: dict[tuple, Decimal] = {}
    with SessionLocal() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        for ws, kana_id, feature_id, at, delta in s.execute(
                select(Usage.workspace_id, Usage.kana_id, Usage.feature_id, Usage.at, Usage.delta)):
            at = utc(at)
            expected[(ws, kana_id, feature_id, "day", f"{at:%Y-%m-%d}")] += delta
            expected[(ws, kana_id, feature_id, "month", f"{at:%Y-%m}")] += delta
        for row in s.scalars(select(UsageTotal)):
            start = utc(row.start)
            name = f"{start:%Y-%m-%d}" if row.period == "day" else f"{start:%Y-%m}"
            found[(row.workspace_id, row.kana_id, row.feature_id, row.period, name)] = row.total
    return [(key, expected.get(key), found.get(key)) for key in sorted(set(expected) | set(found))
            if abs(expected.get(key, Decimal(0)) - found.get(key, Decimal(0))) > Decimal("1e-6")
            or (key in expected) != (key in found)]

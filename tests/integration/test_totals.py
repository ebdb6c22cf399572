"""Running usage totals (kana.domain.totals): kept by every path that changes the ledger.

Every integration test already ends by comparing the totals with the ledger's own
sums (tests/integration/conftest.py); these tests drive each path on purpose and
look at the numbers.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, func, insert, literal, select, text
from sqlalchemy.orm import Session

from kana import migrate
from kana.db import SessionLocal, read_only
from kana.domain import features, reprocess, rules, totals
from kana.models import Event, Usage, UsageTotal, User, Workspace
from tests import helpers

NOV = datetime(2026, 11, 30, 12, tzinfo=UTC)


def rows_of(ws_id: int) -> dict[tuple, Decimal]:
    with read_only(SessionLocal()) as s:
        return {(r.kana_id, r.feature_id, r.period, r.start.astimezone(UTC).date().isoformat()): r.total
                for r in s.scalars(select(UsageTotal).where(UsageTotal.workspace_id == ws_id))}


def total_of(ws_id: int, user_id: str, period: str, start: datetime | None, feature: str = "messages") -> Decimal:
    with read_only(SessionLocal()) as s:
        kana_id = s.scalar(text("SELECT kana_id FROM users WHERE workspace_id = :ws AND user_id = :u"),
                           {"ws": ws_id, "u": user_id})
        return totals.total(s, ws_id, kana_id, feature, period, start)


def test_chunks_add_day_and_month_totals_once_whatever_the_order(client, workspace, work):
    helpers.add_feature(workspace.id)
    calls = [
        helpers.track("u1", feature="messages", delta=2, timestamp="2026-11-30T10:00:00Z"),
        helpers.track("u1", feature="messages", delta=3, timestamp="2026-11-29T23:59:59Z"),
        # Out of order: last month, arriving after this month's.
        helpers.track("u1", feature="messages", delta=5, timestamp="2026-10-31T23:00:00Z"),
        helpers.track("u1", feature="messages", delta=0.25, timestamp="2026-11-30T11:00:00Z"),
    ]
    helpers.post_batch(client, workspace, calls)
    work()
    # Segment redelivers the same batch: the ledger and the totals stay as they were.
    helpers.post_batch(client, workspace, calls)
    work()
    assert total_of(workspace.id, "u1", "day", datetime(2026, 11, 30, tzinfo=UTC)) == Decimal("2.25")
    assert total_of(workspace.id, "u1", "day", datetime(2026, 11, 29, tzinfo=UTC)) == Decimal(3)
    assert total_of(workspace.id, "u1", "month", datetime(2026, 11, 1, tzinfo=UTC)) == Decimal("5.25")
    assert total_of(workspace.id, "u1", "month", datetime(2026, 10, 1, tzinfo=UTC)) == Decimal(5)
    assert total_of(workspace.id, "u1", "none", None) == Decimal("10.25")
    assert len(rows_of(workspace.id)) == 5  # 3 days + 2 months


def test_a_merge_moves_totals_to_the_survivor_and_a_delete_drops_them(client, workspace, work):
    helpers.add_feature(workspace.id)
    helpers.post_batch(client, workspace, [
        helpers.track("a", feature="messages", delta=1, timestamp="2026-11-30T10:00:00Z"),
        helpers.track("b", feature="messages", delta=4, timestamp="2026-11-30T11:00:00Z"),
        helpers.track("b", feature="messages", delta=6, timestamp="2026-11-02T11:00:00Z"),
    ])
    work()
    helpers.post_batch(client, workspace, [{"type": "alias", "previousId": "a", "userId": "b",
                                            "messageId": "alias-1"}])
    work()
    survivor = {k for k, *_ in rows_of(workspace.id)}
    assert len(survivor) == 1  # the merged-away user's rows are gone
    assert total_of(workspace.id, "b", "day", datetime(2026, 11, 30, tzinfo=UTC)) == Decimal(5)
    assert total_of(workspace.id, "b", "month", datetime(2026, 11, 1, tzinfo=UTC)) == Decimal(11)

    helpers.post_batch(client, workspace, [{"type": "delete", "userId": "b", "messageId": "del-1"}])
    work()
    assert rows_of(workspace.id) == {}


def test_force_deleting_a_feature_drops_its_totals(client, workspace, work):
    helpers.add_feature(workspace.id, "messages")
    helpers.add_feature(workspace.id, "seats")
    helpers.post_batch(client, workspace, [
        helpers.track("u", feature="messages", delta=1, timestamp="2026-11-30T10:00:00Z"),
        helpers.track("u", feature="seats", delta=2, timestamp="2026-11-30T10:00:00Z"),
    ])
    work()
    with SessionLocal.begin() as s:
        features.delete_feature(s, workspace.id, "messages", force=True)
    assert {f for _, f, *_ in rows_of(workspace.id)} == {"seats"}


def test_reprocessing_adds_the_usage_it_maps_once(client, workspace, work):
    helpers.add_feature(workspace.id, "reports")
    helpers.post_batch(client, workspace, [
        helpers.track("u", "Report Built", {"pages": 3}, timestamp="2026-11-30T10:00:00Z"),
        helpers.track("u", "Report Built", {"pages": 4}, timestamp="2026-11-15T10:00:00Z"),
    ])
    work()
    assert rows_of(workspace.id) == {}
    with SessionLocal.begin() as s:
        rules.create_rule(s, workspace.id, {"feature_id": "reports", "event": "Report Built",
                                            "delta_property": "pages"})
    for _ in range(2):  # the second run finds nothing left to map
        reprocess.reprocess(SessionLocal, workspace.id)
        assert total_of(workspace.id, "u", "month", datetime(2026, 11, 1, tzinfo=UTC), "reports") == Decimal(7)
        assert total_of(workspace.id, "u", "day", datetime(2026, 11, 15, tzinfo=UTC), "reports") == Decimal(4)


def test_rebuild_recomputes_what_was_kept(client, workspace, work):
    helpers.add_feature(workspace.id)
    helpers.post_batch(client, workspace, [
        helpers.track(f"u{i % 3}", feature="messages", delta=i + 1,
                      timestamp=f"2026-{10 + i % 2}-{1 + i:02d}T10:00:00Z")
        for i in range(12)])
    work()
    kept = rows_of(workspace.id)
    with SessionLocal.begin() as s:
        s.execute(text("UPDATE usage_totals SET total = total + 1 WHERE workspace_id = :ws"), {"ws": workspace.id})
    assert helpers.totals_mismatches() != []
    with SessionLocal.begin() as s:
        assert totals.rebuild(s, workspace.id, batch=5) == 12
    assert rows_of(workspace.id) == kept


def test_the_migration_fills_totals_from_an_existing_ledger(tmp_path):
    """Upgrading an installation with usage but no totals table sums its ledger."""
    url = os.environ.get("KANA_TEST_DATABASE_URL")
    if url:
        name = "kana_totals_migration"
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            conn.execute(text(f"CREATE DATABASE {name}"))
        target = url.rsplit("/", 1)[0] + f"/{name}"
    else:
        target = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(target, "0007")
    engine = create_engine(target)
    with engine.begin() as conn:
        # The tables other than usage_totals are the same at 0007 as in the models.
        conn.execute(insert(Workspace.__table__), {"id": 1, "name": "w"})
        conn.execute(insert(User.__table__), {"kana_id": 7, "workspace_id": 1, "user_id": "u", "source": "segment"})
        for i, (at, delta) in enumerate([(NOV, 2), (NOV.replace(day=1), 3), (NOV.replace(month=10), 5)], 1):
            conn.execute(insert(Event.__table__), {"id": i, "workspace_id": 1, "message_id": f"m{i}", "type": "track",
                                                   "user_id": "u", "kana_id": 7, "timestamp": at, "received_at": at,
                                                   "properties": {}, "status": "mapped"})
            conn.execute(insert(Usage.__table__), {"id": i, "workspace_id": 1, "kana_id": 7, "feature_id": "messages",
                                                   "delta": Decimal(delta), "at": at, "event_id": i})
    migrate.upgrade(target)
    with Session(engine) as s:
        assert totals.total(s, 1, 7, "messages", "month", datetime(2026, 11, 1, tzinfo=UTC)) == Decimal(5)
        assert totals.total(s, 1, 7, "messages", "day", datetime(2026, 11, 30, tzinfo=UTC)) == Decimal(2)
        assert totals.total(s, 1, 7, "messages", "none", None) == Decimal(10)
        assert s.scalar(select(func.count()).select_from(UsageTotal)) == 5
    engine.dispose()
    if url:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name}"))
        admin.dispose()


@pytest.mark.parametrize("period,expected", [
    ("day", {1: Decimal(1)}),
    ("month", {1: Decimal(3), 2: Decimal(5)}),
    ("none", {1: Decimal(4), 2: Decimal(5)}),
])
def test_the_current_total_of_many_users_in_one_statement(session, workspace, period, expected):
    u1 = helpers.add_user(session, workspace.id, user_id="one")
    u2 = helpers.add_user(session, workspace.id, user_id="two")
    u3 = helpers.add_user(session, workspace.id, user_id="three")
    session.flush()
    totals.add(session, workspace.id, [
        (u1.kana_id, "f", NOV, Decimal(1)), (u1.kana_id, "f", NOV.replace(day=2), 2),
        (u1.kana_id, "f", NOV.replace(month=10), 1),  # last month: only in the lifetime total
        (u2.kana_id, "f", NOV.replace(day=3), 5), (u3.kana_id, "g", NOV, 9)])
    used = totals.current(workspace.id, User.kana_id, literal("f"), literal(period),
                          NOV.replace(hour=0), NOV.replace(day=1, hour=0))
    got = dict(session.execute(select(User.kana_id, used).where(
        User.workspace_id == workspace.id, User.kana_id.in_([u1.kana_id, u2.kana_id, u3.kana_id]))).all())
    names = {u1.kana_id: 1, u2.kana_id: 2, u3.kana_id: 3}
    assert {names[k]: v for k, v in got.items() if v is not None} == expected

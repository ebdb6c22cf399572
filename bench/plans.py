"""The chunk path's query plans on a large table, with stale and with fresh planner statistics.

    python -m bench.plans [--events 1000000] [--users 20000]

Needs DATABASE_URL (PostgreSQL; the database is migrated and a fresh
workspace is used). Fills ``events``, ``usage`` (with its ``usage_totals``) and ``users`` with N rows
without ANALYZE (as a new installation or a table growing between autovacuum
runs looks to the planner), applies one chunk of every call kind (identify
with a claim and a merge, track mapped and unmapped, page, group, alias,
delete) with each statement recorded and rolled back, EXPLAINs every recorded
statement, then ANALYZEs and EXPLAINs them again. Prints the plans and writes
them, with the tables each plan scans sequentially, to a JSON report under
bench/results/.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Connection, event, text
from sqlalchemy.orm import sessionmaker

from kana.domain import keys, totals
from kana.ingest import processor
from kana.models import Feature, Plan, PlanFeature, User

BIG = ("events", "usage", "usage_totals", "users")  # tables that grow: a sequential scan of one is a slow plan


def workspace(session_factory: sessionmaker) -> int:
    """A workspace with a consumable feature on a plan with an alert threshold."""
    with session_factory.begin() as s:
        ws, _ = keys.create_workspace(s, f"plans-{uuid.uuid4().hex[:6]}")
        s.add(Feature(workspace_id=ws.id, id="messages", name="Messages", type="consumable"))
        s.add(Plan(workspace_id=ws.id, id="pro", name="Pro"))
        s.add(PlanFeature(workspace_id=ws.id, plan_id="pro", feature_id="messages", limit=Decimal(1000),
                          thresholds=[80, 100]))
        return ws.id


def fill(conn: Connection, ws_id: int, events: int, users: int) -> None:
    """``users`` users (on the plan, half of them with an email) and ``events`` events with their usage."""
    conn.execute(text(
        "INSERT INTO users (workspace_id, user_id, email, email_key, source, plan_id, created_at, updated_at) "
        "SELECT :ws, 'user-' || i, 'user-' || i || '@example.com', 'user-' || i || '@example.com', 'segment', "
        "'pro', now(), now() FROM generate_series(0, :n - 1) AS i"), {"ws": ws_id, "n": users})
    conn.execute(text(
        "INSERT INTO events (workspace_id, message_id, type, name, user_id, kana_id, timestamp, received_at, "
        "properties, status, feature_id, processed_at) "
        "SELECT :ws, 'fill-' || i, 'track', 'Message Sent', u.user_id, u.kana_id, now(), now(), "
        "'{\"featureId\": \"messages\"}', 'mapped', 'messages', now() "
        "FROM generate_series(0, :n - 1) AS i "
        "JOIN users u ON u.workspace_id = :ws AND u.user_id = 'user-' || (i % :users)"),
        {"ws": ws_id, "n": events, "users": users})
    conn.execute(text(
        "INSERT INTO usage (workspace_id, kana_id, feature_id, delta, at, event_id, created_at) "
        "SELECT workspace_id, kana_id, 'messages', 1, timestamp, id, now() FROM events "
        "WHERE workspace_id = :ws AND message_id LIKE 'fill-%'"), {"ws": ws_id})
    # The running totals of that usage, one row per user and day/month, as the workers keep them.
    conn.execute(text(totals.ADD_PG.format(
        rows="(SELECT kana_id, feature_id, at, delta FROM usage WHERE workspace_id = :ws)")), {"ws": ws_id})


def chunk(ws_id: int, users: int) -> list[dict]:
    """One call of each kind the chunk path handles, on users that exist (and two that don't yet)."""
    now = datetime.now(UTC).isoformat()

    def call(kind: str, uid: str, **extra: object) -> dict:
        return {"ws": ws_id, "type": kind, "userId": uid, "messageId": f"p-{uuid.uuid4().hex}", "timestamp": now,
                **extra}

    a, b, c = "user-1", f"user-{users // 2}", f"user-{users - 1}"
    return [
        call("identify", a, traits={"email": "user-1@example.com", "name": "A"}),
        call("identify", "new-1", traits={"email": "claim@example.com"}),  # claims the unclaimed user
        call("identify", b, traits={"email": "merge@example.com"}),  # merges with the unclaimed user
        call("track", a, event="Message Sent", properties={"featureId": "messages", "delta": 2}),
        call("track", "new-2", event="Message Sent", properties={"featureId": "messages"}),
        # A user on the plan who stays: the alert check reads its totals.
        call("track", "user-2", event="Message Sent", properties={"featureId": "messages"}),
        call("track", b, event="Report Exported", properties={"format": "csv"}),
        call("page", c, name="Pricing", properties={"url": "https://example.com"}),
        call("group", c, groupId="acme", traits={"name": "Acme"}),
        call("alias", b, previousId=c),
        call("delete", a),
    ]


def unclaimed(session_factory: sessionmaker, ws_id: int) -> None:
    """Unclaimed users (no user_id) for the chunk's claim and merge."""
    with session_factory.begin() as s:
        for email in ("claim@example.com", "merge@example.com"):
            s.add(User(workspace_id=ws_id, email=email, email_key=email, source="stripe"))


@contextmanager
def recording(conn: Connection):  # noqa: ANN201
    """Record the statements (with their first parameter set) run on ``conn``."""
    seen: list[tuple[str, object]] = []

    def before(_conn, _cursor, statement, parameters, _context, executemany):  # noqa: ANN001, ANN202
        many = executemany and isinstance(parameters, list | tuple) and parameters
        first = parameters[0] if many else parameters
        seen.append((statement, first))

    event.listen(conn, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(conn, "before_cursor_execute", before)


def statements(session_factory: sessionmaker, ws_id: int, calls: list[dict]) -> list[tuple[str, object]]:
    """The statements applying ``calls`` runs, recorded and rolled back."""
    with session_factory() as session:
        conn = session.connection()
        with recording(conn) as seen:
            processor.apply(session, calls)
        session.rollback()
    # Locks and sequences have no plan worth reading.
    return [(sql, params) for sql, params in seen
            if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE)\b", sql, re.I) and "nextval(" not in sql]


def explain(conn: Connection, recorded: list[tuple[str, object]]) -> list[dict]:
    """EXPLAIN (no ANALYZE: nothing runs) each statement; the tables among BIG it scans sequentially."""
    plans = []
    for sql, params in recorded:
        lines = [row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql, params or ())]
        plan = "\n".join(lines)
        seq = sorted({t for t in BIG if re.search(rf"Seq Scan on {t}\b", plan)})
        plans.append({"statement": " ".join(sql.split())[:300], "plan": lines, "seq_scans": seq})
    return plans


def analyze(conn: Connection) -> None:
    for table in BIG:
        conn.exec_driver_sql(f"ANALYZE {table}")


def check(session_factory: sessionmaker, events: int, users: int, *, fresh: bool) -> list[dict]:
    """Fill a new workspace, then the plans of one chunk (after ANALYZE when ``fresh``)."""
    ws_id = workspace(session_factory)
    with session_factory.begin() as s:
        fill(s.connection(), ws_id, events, users)
    unclaimed(session_factory, ws_id)
    if fresh:
        with session_factory.begin() as s:
            analyze(s.connection())
    recorded = statements(session_factory, ws_id, chunk(ws_id, users))
    with session_factory() as s:
        return explain(s.connection(), recorded)


def main(argv: list[str] | None = None) -> int:
    import bench
    from bench import write_report
    from kana import db

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench.postgres("bench.plans")
    report: dict = {"events": args.events, "users": args.users}
    for label, fresh in (("stale", False), ("fresh", True)):
        plans = check(db.SessionLocal, args.events, args.users, fresh=fresh)
        report[label] = plans
        print(f"\n=== {label} statistics: {len(plans)} statements ===")
        for p in plans:
            print(f"\n-- {p['statement']}")
            print("\n".join(p["plan"]))
    slow = {label: [p["statement"] for p in report[label] if p["seq_scans"]] for label in ("stale", "fresh")}
    report["seq_scans"] = slow
    print("\nsequential scans of events/usage/users:", slow)
    write_report("plans", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The chunk path's statements keep index plans on a large table, whatever the planner statistics say.

A drain chunk's duplicates are decided by the unique key (INSERT … ON CONFLICT
DO NOTHING), not by a lookup whose plan depends on fresh statistics; every
statement the chunk runs (identify, claim, merge, track, page, group, alias,
GDPR delete, the entitlement totals) is EXPLAINed on tables filled without
ANALYZE, then again after ANALYZE. ``python -m bench.plans`` prints the same
plans at a larger size.
"""

from __future__ import annotations

import pytest

from bench import plans
from kana.db import SessionLocal

EVENTS, USERS = 20_000, 2_000


@pytest.fixture
def postgres(app) -> None:
    if SessionLocal().get_bind().dialect.name != "postgresql":
        pytest.skip("planner statistics are PostgreSQL's (set KANA_TEST_DATABASE_URL)")


@pytest.mark.parametrize("fresh", [False, True], ids=["stale", "fresh"])
def test_no_chunk_statement_scans_a_growing_table(postgres, fresh: bool) -> None:
    explained = plans.check(SessionLocal, EVENTS, USERS, fresh=fresh)

    statements = [p["statement"] for p in explained]
    assert any(s.startswith("INSERT INTO events") for s in statements)
    assert any(s.startswith("INSERT INTO usage ") for s in statements)
    # The totals the entitlement cache and alerts read: upserted, then read per user by key.
    assert any(p["statement"].startswith("INSERT INTO usage_totals")
               and "Conflict Resolution: UPDATE" in "\n".join(p["plan"]) for p in explained)
    assert any(s.startswith("SELECT users.kana_id") and "usage_totals_pkey" in "\n".join(p["plan"])
               for s, p in zip(statements, explained, strict=True))
    assert not any(s.startswith("SELECT") and "sum(usage.delta)" in s for s in statements)
    assert any(s.startswith("DELETE FROM events") for s in statements)  # the GDPR delete ran
    assert any(s.startswith("UPDATE events SET kana_id") for s in statements)  # merges ran
    # No lookup of the chunk's messageIds before inserting: the unique key decides.
    assert not any(s.startswith("SELECT") and "events.message_id IN" in s for s in statements)
    inserts = [p for p in explained if p["statement"].startswith("INSERT INTO events")]
    assert all("Conflict Arbiter Indexes: uq_events_workspace_message" in "\n".join(p["plan"]) for p in inserts)
    assert [(p["statement"], p["seq_scans"]) for p in explained if p["seq_scans"]] == []

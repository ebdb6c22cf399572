"""SPEC §6: flag tables refreshed set-based and atomically, on a schedule and on demand."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner
from rq.cron import CronScheduler
from sqlalchemy import select

from kana.cli import main as cli
from kana.db import SessionLocal, get_engine
from kana.domain import flags, identity
from kana.models import FlagRefresh, User, UserFlag
from tests.conftest import worker_env
from tests.helpers import add_user


def flag_rows(session, ws) -> set[tuple[str, int, str | None]]:
    return {tuple(r) for r in session.execute(select(UserFlag.flag, UserFlag.kana_id, UserFlag.email_key)
                                              .where(UserFlag.workspace_id == ws))}


def test_refresh_flags_missing_billing_and_shared_emails(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="a", email="Shared@Example.com")
    b = add_user(session, ws, user_id="b", email="shared@example.com ", billing_id="cus_B")
    c = add_user(session, ws, email="solo@example.com", billing_id="cus_C")
    d = add_user(session, ws, user_id="d")
    counts = flags.refresh(session, ws)
    assert (counts["missing_billing_id"], counts["duplicate_email"], counts["duplicate_groups"]) == (2, 2, 1)
    assert flag_rows(session, ws) == {
        ("missing_billing_id", a.kana_id, None), ("missing_billing_id", d.kana_id, None),
        ("duplicate_email", a.kana_id, "shared@example.com"), ("duplicate_email", b.kana_id, "shared@example.com"),
    }
    assert c.kana_id not in {k for _, k, _ in flag_rows(session, ws)}


def test_refresh_writes_only_the_difference_and_follows_changes(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="a", email="x@example.com")
    b = add_user(session, ws, user_id="b", email="x@example.com")
    c = add_user(session, ws, user_id="c", email="y@example.com", billing_id="cus_C")
    flags.refresh(session, ws)
    # a gets a billing id, b moves to c's email, a new user shares x with a.
    a.billing_id = "cus_A"
    b.email, b.email_key = "Y@example.com", "y@example.com"
    e = add_user(session, ws, user_id="e", email="x@example.com", billing_id="cus_E")
    session.flush()
    counts = flags.refresh(session, ws)
    assert flag_rows(session, ws) == {
        ("missing_billing_id", b.kana_id, None),
        ("duplicate_email", a.kana_id, "x@example.com"), ("duplicate_email", e.kana_id, "x@example.com"),
        ("duplicate_email", b.kana_id, "y@example.com"), ("duplicate_email", c.kana_id, "y@example.com"),
    }
    assert counts["duplicate_groups"] == 2
    # Deleted users drop out; a refresh with nothing changed changes nothing.
    identity.delete_users(session, ws, [e.kana_id], trigger="api")
    flags.refresh(session, ws)
    before = flag_rows(session, ws)
    assert ("duplicate_email", a.kana_id, "x@example.com") not in before
    flags.refresh(session, ws)
    assert flag_rows(session, ws) == before


def test_flags_are_per_workspace(session, workspace, new_workspace):
    other = new_workspace("other")
    add_user(session, workspace.id, user_id="a", email="same@example.com", billing_id="cus_1")
    add_user(session, other.id, user_id="a", email="same@example.com")
    assert flags.refresh(session, workspace.id)["duplicate_email"] == 0
    assert flags.refresh(session, other.id)["missing_billing_id"] == 1
    assert flags.refresh(session, workspace.id)["missing_billing_id"] == 0


def test_summary_shape_groups_and_pagination(session, workspace):
    ws = workspace.id
    assert flags.summary(session, ws) == {
        "missing_billing_id": {"count": 0},
        "duplicate_email": {"count": 0, "groups": [], "groups_total": 0, "next_cursor": None},
        "refreshed_at": None,
    }
    groups = {}
    for i in range(5):
        users = [add_user(session, ws, user_id=f"u{i}-{j}", email=f"g{i}@example.com") for j in range(2)]
        groups[f"g{i}@example.com"] = [u.kana_id for u in users]
    flags.refresh(session, ws)
    page = flags.summary(session, ws, groups_limit=2)
    assert page["missing_billing_id"] == {"count": 10}
    assert page["duplicate_email"]["count"] == 10 and page["duplicate_email"]["groups_total"] == 5
    assert page["duplicate_email"]["groups"] == [{"email": e, "kana_ids": groups[e]} for e in sorted(groups)[:2]]
    assert page["refreshed_at"] is not None
    seen = [g["email"] for g in page["duplicate_email"]["groups"]]
    cursor = page["duplicate_email"]["next_cursor"]
    while cursor:
        page = flags.summary(session, ws, groups_limit=2, after=cursor)
        seen += [g["email"] for g in page["duplicate_email"]["groups"]]
        cursor = page["duplicate_email"]["next_cursor"]
    assert seen == sorted(groups)
    # A group merged down to one user since the refresh is no longer shown.
    survivor_group = "g0@example.com"
    users = list(session.scalars(select(User).where(User.kana_id.in_(groups[survivor_group]))))
    identity.merge(session, ws, users, trigger="api")
    emails = [g["email"] for g in flags.summary(session, ws, groups_limit=50)["duplicate_email"]["groups"]]
    assert survivor_group not in emails and len(emails) == 4


def test_flagged_user_ids_query_filters_users(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="a", email="d@example.com", billing_id="cus_A")
    b = add_user(session, ws, user_id="b", email="d@example.com")
    add_user(session, ws, user_id="c", billing_id="cus_C")
    flags.refresh(session, ws)

    def ids(flag):
        return set(session.scalars(select(User.kana_id).where(
            User.workspace_id == ws, User.kana_id.in_(flags.flagged_user_ids_query(ws, flag)))))

    assert ids("missing_billing_id") == {b.kana_id}
    assert ids("duplicate_email") == {a.kana_id, b.kana_id}
    assert ids("any") == {a.kana_id, b.kana_id}
    with pytest.raises(ValueError, match="unknown flag"):
        flags.flagged_user_ids_query(ws, "nope")


def _reader_counts(ws: int) -> tuple[int, int | None]:
    """What another connection sees right now (autocommit reads, outside any ORM session)."""
    conn = get_engine().raw_connection()
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT count(*) FROM user_flags WHERE workspace_id = {int(ws)}")
        rows = cur.fetchone()[0]
        cur.execute(f"SELECT missing_billing_id FROM flag_refreshes WHERE workspace_id = {int(ws)}")
        found = cur.fetchone()
        return rows, (found[0] if found else None)
    finally:
        conn.rollback()
        conn.close()


def test_refresh_is_atomic_for_readers(workspace):
    ws = workspace.id
    with SessionLocal.begin() as s:
        for i in range(20):
            add_user(s, ws, user_id=f"u{i}")
        flags.refresh(s, ws)
    assert _reader_counts(ws) == (20, 20)
    with SessionLocal.begin() as s:
        for user in s.scalars(select(User).where(User.workspace_id == ws)):
            user.billing_id = f"cus_{user.kana_id}"
    s = SessionLocal()
    try:
        s.begin()
        assert flags.refresh(s, ws)["missing_billing_id"] == 0
        # Uncommitted: readers still see the complete old set, not a half-deleted one.
        assert _reader_counts(ws) == (20, 20)
        s.commit()
    finally:
        s.close()
    assert _reader_counts(ws) == (0, 0)


def test_concurrent_refreshes_of_one_workspace_serialise(workspace):
    ws = workspace.id
    with SessionLocal.begin() as s:
        for i in range(10):
            add_user(s, ws, user_id=f"u{i}", email="same@example.com")
    errors: list[BaseException] = []
    first = SessionLocal()
    first.begin()
    flags.refresh(first, ws)

    def second() -> None:
        try:
            with SessionLocal.begin() as s2:
                flags.refresh(s2, ws)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # waits for the first refresh's lock instead of racing it
    first.commit()
    first.close()
    thread.join(30)
    assert not thread.is_alive() and not errors
    with SessionLocal() as s:
        assert s.get(FlagRefresh, ws).duplicate_email == 10


def test_refresh_all_covers_every_workspace(workspace, new_workspace):
    other = new_workspace("other")
    with SessionLocal.begin() as s:
        add_user(s, workspace.id, user_id="a")
        add_user(s, other.id, user_id="a")
        add_user(s, other.id, user_id="b")
    results = flags.refresh_all(SessionLocal)
    assert results[workspace.id]["missing_billing_id"] == 1
    assert results[other.id]["missing_billing_id"] == 2


def test_api_flags_before_and_after_an_on_demand_refresh(client, workspace, work):
    body = client.get("/api/v1/flags", headers=workspace.headers).get_json()
    assert body["missing_billing_id"] == {"count": 0} and body["refreshed_at"] is None
    with SessionLocal.begin() as s:
        a = add_user(s, workspace.id, user_id="a", email="dup@example.com")
        b = add_user(s, workspace.id, email="DUP@example.com", billing_id="cus_1")
    resp = client.post("/api/v1/flags/refresh", headers=workspace.headers)
    assert resp.status_code == 202
    job_id = resp.get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "finished" and job["result"]["duplicate_email"] == 2
    body = client.get("/api/v1/flags", headers=workspace.headers).get_json()
    assert body["missing_billing_id"] == {"count": 1}
    assert body["duplicate_email"]["count"] == 2
    assert body["duplicate_email"]["groups"] == [{"email": "dup@example.com", "kana_ids": [a.kana_id, b.kana_id]}]
    assert body["refreshed_at"]
    users = client.get("/api/v1/users?flag=duplicate_email", headers=workspace.headers).get_json()["users"]
    assert {u["kana_id"] for u in users} == {a.kana_id, b.kana_id}
    bad = client.get("/api/v1/flags?groups_limit=0", headers=workspace.headers)
    assert bad.status_code == 400 and "groups_limit" in bad.get_json()["errors"]


def test_api_flags_need_an_admin_key(client, workspace):
    assert client.get("/api/v1/flags").status_code == 401
    ingest = {"Authorization": f"Bearer {workspace.ingest_key}"}
    assert client.post("/api/v1/flags/refresh", headers=ingest).status_code == 403


def test_cron_registers_the_refresh_at_the_configured_interval(redis, monkeypatch, work, workspace):
    monkeypatch.setenv("KANA_FLAGS_INTERVAL", "120")
    scheduler = CronScheduler(connection=redis)
    scheduler.load_config_from_file("config.cron")
    jobs = {j.name: j for j in scheduler.get_jobs()}
    assert jobs["flags-refresh"].interval == 120
    assert jobs["flags-refresh"].func_name == "jobs.flags.refresh_all"
    with SessionLocal.begin() as s:
        add_user(s, workspace.id, user_id="a")
    jobs["flags-refresh"].enqueue(redis)
    work()
    with SessionLocal() as s:
        assert s.get(FlagRefresh, workspace.id).missing_billing_id == 1


def test_cli_flags_refresh(settings, workspace):
    with SessionLocal.begin() as s:
        add_user(s, workspace.id, user_id="a")
    env = worker_env(settings)
    result = CliRunner().invoke(cli, ["flags", "refresh", "--workspace", str(workspace.id)], env=env)
    assert result.exit_code == 0, result.output
    assert '"missing_billing_id": 1' in result.output
    missing = CliRunner().invoke(cli, ["flags", "refresh", "--workspace", "999999"], env=env)
    assert missing.exit_code != 0 and "no workspace 999999" in missing.output

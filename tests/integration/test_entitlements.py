"""Plans and the entitlement check (SPEC §10, §11): real Redis, real workers, real HTTP."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy import event, func, select

from kana.db import SessionLocal, get_engine, read_only
from kana.domain import keys
from kana.imports import csvfile
from kana.models import Usage, User
from tests import helpers


def api(client, ws, method: str, path: str, **kwargs):
    return client.open(path, method=method, headers=ws.headers, **kwargs)


def setup_plan(client, ws, *, limit=5, period="month", overage=False, thresholds=(), plan_id="pro") -> None:
    assert api(client, ws, "POST", "/api/v1/features", json={"id": "messages", "name": "Messages",
                                                              "type": "consumable"}).status_code == 201
    assert api(client, ws, "POST", "/api/v1/features", json={"id": "sso", "name": "SSO",
                                                              "type": "binary"}).status_code == 201
    resp = api(client, ws, "POST", "/api/v1/plans", json={"id": plan_id, "name": "Pro", "features": [
        {"feature_id": "messages", "limit": limit, "period": period, "overage": overage,
         "thresholds": list(thresholds)},
        {"feature_id": "sso"},
    ]})
    assert resp.status_code == 201, resp.get_json()


# The calls these tests send: one message of the "messages" feature unless told otherwise.
track = partial(helpers.track, feature="messages", delta=1)


def send(client, ws, calls) -> None:
    resp = client.post("/v1/batch", json={"batch": calls}, headers={"Authorization": f"Bearer {ws.ingest_key}"})
    assert resp.status_code == 200, resp.get_json()


def kana_id_of(ws_id: int, user_id: str) -> int:
    with read_only(SessionLocal()) as s:
        return s.scalar(select(User.kana_id).where(User.workspace_id == ws_id, User.user_id == user_id))


def assign(client, ws, user_id: str, plan_id: str = "pro"):
    resp = api(client, ws, "PUT", f"/api/v1/users/{kana_id_of(ws.id, user_id)}/plan", json={"plan_id": plan_id})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def check(client, ws, user_id: str, feature_id: str = "messages", delta=None, key: str | None = None):
    query = {"user_id": user_id, "feature_id": feature_id}
    if delta is not None:
        query["delta"] = delta
    resp = client.get("/api/v1/entitlements/check", query_string=query,
                      headers={"Authorization": f"Bearer {key or ws.key}"})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def ledger_total(ws_id: int, kana_id: int, feature_id: str = "messages") -> float:
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    with read_only(SessionLocal()) as s:
        return float(s.scalar(select(func.coalesce(func.sum(Usage.delta), 0)).where(
            Usage.workspace_id == ws_id, Usage.kana_id == kana_id, Usage.feature_id == feature_id,
            Usage.at >= start)))


@contextmanager
def statements():
    """The SQL statements on users, plans and usage the process runs inside the block.

    (The tests' key cache is off, so API key lookups are left out.)
    """
    seen: list[str] = []

    def record(conn, cursor, statement, *args):  # noqa: ANN001, ANN202
        if any(table in statement for table in ("users", "aliases", "plan", "usage")):
            seen.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_plan_validation_names_the_field(client, workspace, work):
    setup_plan(client, workspace)
    bad = [
        ({"id": "x", "name": "X", "features": [{"feature_id": "nope"}]}, "features[0].feature_id"),
        ({"id": "x", "name": "X", "features": [{"feature_id": "messages", "limit": -1}]}, "features[0].limit"),
        ({"id": "x", "name": "X", "features": [{"feature_id": "messages", "thresholds": [0]}]},
         "features[0].thresholds"),
        ({"id": "x", "name": "X", "features": [{"feature_id": "messages", "thresholds": [1001]}]},
         "features[0].thresholds"),
        ({"id": "x", "name": "X", "features": [{"feature_id": "messages", "period": "week"}]}, "features[0].period"),
        ({"id": "x", "name": "X", "features": [{"feature_id": "messages", "limit": "lots"}]}, "features[0].limit"),
        ({"id": "Not A Slug", "name": "X"}, "id"),
    ]
    for body, field in bad:
        resp = api(client, workspace, "POST", "/api/v1/plans", json=body)
        assert resp.status_code == 400, body
        assert field in resp.get_json()["errors"], resp.get_json()
    assert api(client, workspace, "POST", "/api/v1/plans", json={"id": "pro", "name": "Again"}).status_code == 409
    resp = api(client, workspace, "PUT", "/api/v1/plans/missing", json={"name": "M"})
    assert resp.status_code == 404
    send(client, workspace, [track("u1")])
    work()
    kana_id = kana_id_of(workspace.id, "u1")
    resp = api(client, workspace, "PUT", f"/api/v1/users/{kana_id}/plan", json={"plan_id": "ghost"})
    assert resp.status_code == 400 and "plan_id" in resp.get_json()["errors"]
    assert api(client, workspace, "PUT", "/api/v1/users/999999999/plan", json={"plan_id": "pro"}).status_code == 404
    listed = api(client, workspace, "GET", "/api/v1/plans").get_json()["plans"]
    assert [p["id"] for p in listed] == ["pro"]
    assert {f["feature_id"]: f["type"] for f in listed[0]["features"]} == {"messages": "consumable",
                                                                          "sso": "binary"}


def test_feature_in_a_plan_needs_force_to_delete(client, workspace):
    setup_plan(client, workspace)
    resp = api(client, workspace, "DELETE", "/api/v1/features/sso")
    assert resp.status_code == 409 and "pro" in resp.get_json()["message"]
    assert api(client, workspace, "DELETE", "/api/v1/features/sso?force=true").status_code == 204
    plan = api(client, workspace, "GET", "/api/v1/plans/pro").get_json()
    assert [f["feature_id"] for f in plan["features"]] == ["messages"]


def test_check_answers_from_the_ledger_then_from_redis(client, workspace, work):
    setup_plan(client, workspace, limit=5)
    send(client, workspace, [track("ann", delta=2), track("bob"), track("ann", delta=1, feature="sso")])
    work()
    assert check(client, workspace, "nobody")["reason"] == "unknown_user"
    assert check(client, workspace, "ann")["reason"] == "no_plan"
    user = assign(client, workspace, "ann")
    assert user["plan_id"] == "pro"

    first = check(client, workspace, "ann")
    assert first["access"] is True and first["used"] == 2 and first["limit"] == 5 and first["remaining"] == 3
    assert first["overage"] is False
    start = datetime.fromisoformat(first["period_start"])
    assert start.day == 1 and start.hour == 0 and start.tzinfo is not None
    assert datetime.fromisoformat(first["period_end"]) > datetime.now(UTC)
    with statements() as seen:
        warm = check(client, workspace, "ann", delta=3)
        denied = check(client, workspace, "ann", delta=4)
        binary = check(client, workspace, "ann", feature_id="sso")
        other = check(client, workspace, "ann", feature_id="unplanned")
    assert seen == []  # warm: no database query at all
    assert warm["access"] is True and warm["used"] == 2
    assert denied == {**warm, "access": False, "reason": "limit_exceeded"}
    assert binary["access"] is True
    assert other["access"] is False and other["reason"] == "not_in_plan"

    # The worker writes the new total after its commit: still no database query for the check.
    send(client, workspace, [track("ann", delta=2)])
    work()
    with statements() as seen:
        after = check(client, workspace, "ann")
    assert seen == []
    assert after["used"] == 4 == ledger_total(workspace.id, kana_id_of(workspace.id, "ann"))
    assert after["remaining"] == 1


def test_usage_outside_the_period_and_plan_changes(client, workspace, work):
    setup_plan(client, workspace, limit=10, period="day")
    yesterday = datetime.now(UTC) - timedelta(days=1, hours=1)
    send(client, workspace, [track("ann", delta=7, timestamp=yesterday), track("ann", delta=1)])
    work()
    assign(client, workspace, "ann")
    assert check(client, workspace, "ann")["used"] == 1
    # A lower limit takes effect on the next check.
    resp = api(client, workspace, "PUT", "/api/v1/plans/pro", json={"features": [
        {"feature_id": "messages", "limit": 1, "period": "none"}]})
    assert resp.status_code == 200, resp.get_json()
    answer = check(client, workspace, "ann")
    assert answer["used"] == 8 and answer["access"] is False and answer["reason"] == "limit_exceeded"
    assert answer["period_start"] is None
    resp = api(client, workspace, "PUT", "/api/v1/plans/pro", json={"features": [
        {"feature_id": "messages", "limit": 1, "period": "none", "overage": True}]})
    assert check(client, workspace, "ann")["access"] is True
    assert api(client, workspace, "DELETE", f"/api/v1/users/{kana_id_of(workspace.id, 'ann')}/plan").status_code == 204
    assert check(client, workspace, "ann")["reason"] == "no_plan"


def test_merged_and_aliased_ids_resolve_with_merged_usage(client, workspace, work):
    setup_plan(client, workspace, limit=100)
    send(client, workspace, [track("a", delta=3), track("b", delta=4)])
    work()
    assign(client, workspace, "a")
    assert check(client, workspace, "a")["used"] == 3
    resp = api(client, workspace, "POST", "/api/v1/users/merge",
               json={"kana_ids": [kana_id_of(workspace.id, "a"), kana_id_of(workspace.id, "b")]})
    assert resp.status_code == 200, resp.get_json()
    assert check(client, workspace, "a")["used"] == 7
    assert check(client, workspace, "b")["used"] == 7  # the merged-away id resolves to the survivor
    send(client, workspace, [{"type": "alias", "previousId": "a", "userId": "a-new", "messageId": "al1"}])
    work()
    assert check(client, workspace, "a-new")["used"] == 7
    send(client, workspace, [track("b", delta=1)])
    work()
    assert check(client, workspace, "a")["used"] == 8
    # A GDPR delete: the user is gone from checks too.
    send(client, workspace, [{"type": "delete", "userId": "a-new", "messageId": "del1"}])
    work()
    assert check(client, workspace, "a")["reason"] == "unknown_user"


def test_redis_restart_refills_from_the_database(client, workspace, work, redis):
    setup_plan(client, workspace, limit=10)
    send(client, workspace, [track("ann", delta=6)])
    work()
    assign(client, workspace, "ann")
    assert check(client, workspace, "ann")["used"] == 6
    redis.flushdb()  # what a restart without persistence looks like
    with statements() as seen:
        assert check(client, workspace, "ann")["used"] == 6
    assert seen  # a miss reads the database…
    with statements() as seen:
        assert check(client, workspace, "ann")["used"] == 6
    assert seen == []  # …and refills the cache


def test_check_key_scope(client, workspace):
    setup_plan(client, workspace)
    with SessionLocal.begin() as s:
        _, check_key = keys.create_key(s, workspace.id, "check")
    assert check(client, workspace, "x", key=check_key)["reason"] == "unknown_user"
    bearer = {"Authorization": f"Bearer {check_key}"}
    assert client.get("/api/v1/users", headers=bearer).status_code == 403
    assert client.post("/v1/batch", json={"batch": [track("x")]}, headers=bearer).status_code == 403
    resp = client.get("/api/v1/entitlements/check?user_id=x&feature_id=messages",
                      headers={"Authorization": f"Bearer {workspace.ingest_key}"})
    assert resp.status_code == 403
    resp = client.get("/api/v1/entitlements/check?user_id=x&feature_id=messages&delta=-1", headers=bearer)
    assert resp.status_code == 400 and "delta" in resp.get_json()["errors"]
    resp = client.get("/api/v1/entitlements/check?feature_id=messages", headers=bearer)
    assert resp.status_code == 400 and "user_id" in resp.get_json()["errors"]


def test_user_entitlements_lists_every_plan_feature(client, workspace, work):
    setup_plan(client, workspace, limit=5)
    send(client, workspace, [track("ann", delta=2)])
    work()
    assign(client, workspace, "ann")
    body = api(client, workspace, "GET", f"/api/v1/users/{kana_id_of(workspace.id, 'ann')}/entitlements").get_json()
    by_id = {e["feature_id"]: e for e in body["entitlements"]}
    assert by_id["messages"]["used"] == 2 and by_id["messages"]["remaining"] == 3
    assert by_id["sso"]["access"] is True and body["plan_id"] == "pro"


def test_check_fed_by_the_official_segment_client(live_server, workspace, work, app):
    segment = pytest.importorskip("segment.analytics")
    client = app.test_client()
    setup_plan(client, workspace, limit=10)
    errors: list = []
    lib = segment.Client(write_key=workspace.ingest_key, host=live_server, sync_mode=True,
                         on_error=lambda e, batch: errors.append(e))
    lib.identify("seg-user", {"email": "seg@example.com"})
    lib.track("seg-user", "Message Sent", {"featureId": "messages", "delta": 4})
    lib.flush()
    work()
    assign(client, workspace, "seg-user")
    assert check(client, workspace, "seg-user")["used"] == 4
    lib.track("seg-user", "Message Sent", {"featureId": "messages", "delta": 5})
    lib.alias("seg-user", "seg-user-2")
    lib.flush()
    assert errors == []
    work()
    answer = check(client, workspace, "seg-user-2", delta=2)
    assert answer["used"] == 9 and answer["access"] is False and answer["reason"] == "limit_exceeded"
    assert check(client, workspace, "seg-user", delta=1)["access"] is True


def test_cli_plans_assign_webhook_and_check_keys(settings, client, workspace, work):
    import json

    from click.testing import CliRunner

    import jobs
    from kana.cli import main as cli

    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url or "",
           "KANA_DATA_DIR": str(settings.data_dir)}

    def kana(*args: object, **extra: str):
        result = CliRunner().invoke(cli, [str(a) for a in args], env={**env, **extra})
        jobs.init(settings)  # the command built its own runtime from the environment
        return result

    assert api(client, workspace, "POST", "/api/v1/features", json={"id": "messages", "name": "M"}).status_code == 201
    send(client, workspace, [track("ann", delta=3)])
    work()
    bad = kana("plan", "create", "--workspace", workspace.id, "pro", "--features",
               '[{"feature_id": "messages", "limit": -2}]')
    assert bad.exit_code != 0 and "features[0].limit" in bad.output
    made = kana("plan", "create", "--workspace", workspace.id, "pro", "--name", "Pro", "--json", "--features",
                '[{"feature_id": "messages", "limit": 10, "thresholds": [80]}]')
    assert made.exit_code == 0, made.output
    assert json.loads(made.output)["features"][0]["limit"] == 10
    listed = kana("plan", "list", "--workspace", workspace.id, "--json")
    assert [p["id"] for p in json.loads(listed.output)] == ["pro"]
    assert check(client, workspace, "ann")["reason"] == "no_plan"  # cached: no plan
    assigned = kana("plan", "assign", "--workspace", workspace.id, "--user", "ann", "pro")
    assert assigned.exit_code == 0, assigned.output
    assert check(client, workspace, "ann")["used"] == 3  # the CLI's commit moved the cache on
    send(client, workspace, [track("bob", delta=2)])
    work()
    merged = kana("users", "merge", "--workspace", workspace.id, kana_id_of(workspace.id, "ann"),
                  kana_id_of(workspace.id, "bob"))
    assert merged.exit_code == 0, merged.output
    assert check(client, workspace, "bob")["used"] == 5 and check(client, workspace, "ann")["used"] == 5

    refused = kana("webhook", "set", "--workspace", workspace.id, "http://127.0.0.1:9/hook")
    assert refused.exit_code != 0 and "private" in refused.output
    allowed = kana("webhook", "set", "--workspace", workspace.id, "http://127.0.0.1:9/hook", "--json",
                   KANA_WEBHOOK_ALLOW_PRIVATE="1")
    assert allowed.exit_code == 0 and json.loads(allowed.output)["secret"].startswith("whsec_")

    made = kana("key", "create", "--workspace", workspace.id, "--scope", "check", "--json")
    key = json.loads(made.output)
    assert key["key_id"] and check(client, workspace, "ann", key=key["api_key"])["used"] == 5


def test_check_answers_from_the_database_while_redis_is_down(client, workspace, work, runtime, monkeypatch):
    from redis import Redis

    setup_plan(client, workspace, limit=10)
    send(client, workspace, [track("ann", delta=4)])
    work()
    assign(client, workspace, "ann")
    monkeypatch.setattr(runtime, "redis", Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2))
    answer = check(client, workspace, "ann", delta=7)
    assert answer["used"] == 4 and answer["access"] is False and answer["reason"] == "limit_exceeded"


def test_csv_import_plan_column_sets_the_plan_and_the_next_check_sees_it(client, workspace, work):
    setup_plan(client, workspace, limit=5)
    send(client, workspace, [track("ann", delta=2), track("bob")])
    work()
    assign(client, workspace, "bob")
    assert check(client, workspace, "ann")["reason"] == "no_plan"  # now cached
    data = b"user_id,email,plan\nann,,pro\nbob,bob@acme.test,\ncarl,,ghost\ndan,,Not A Plan\n"
    with SessionLocal.begin() as s:
        results = {r.line: r for r in csvfile.apply_rows(s, workspace.id, None, csvfile.parse(data).rows()).results}
    assert results[2].status == "updated" and "plan pro" in results[2].actions
    assert results[3].status == "updated"  # the email; an empty plan cell leaves bob's plan as is
    assert results[4].status == "failed" and "ghost" in results[4].errors["plan"]
    assert results[5].status == "failed" and "plan" in results[5].errors
    with read_only(SessionLocal()) as s:
        plans = dict(s.execute(select(User.user_id, User.plan_id).where(User.workspace_id == workspace.id)).all())
    assert plans == {"ann": "pro", "bob": "pro"}  # carl's row failed as a whole: no user created
    answer = check(client, workspace, "ann")
    assert answer["access"] is True and answer["used"] == 2




def test_a_merge_keeps_the_plan_of_a_merged_away_user(client, workspace, work):
    """The survivor (created first) fills a missing plan from the others, like any blank."""
    setup_plan(client, workspace, limit=100)
    send(client, workspace, [track("old", delta=1)])
    work()
    send(client, workspace, [track("young", delta=2)])
    work()
    assign(client, workspace, "young")
    resp = api(client, workspace, "POST", "/api/v1/users/merge",
               json={"kana_ids": [kana_id_of(workspace.id, "young"), kana_id_of(workspace.id, "old")]})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["user_id"] == "old" and resp.get_json()["plan_id"] == "pro"
    body = check(client, workspace, "young")
    assert body["access"] and body["used"] == 3 and body["limit"] == 100

"""Mapping rules (SPEC §7): operators, validation, live mapping, retroactive reprocessing, idempotency."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from kana.db import SessionLocal
from kana.domain import reprocess, rules
from kana.models import Event, Feature, Usage, User
from tests.helpers import add_feature, count, post_batch, track, usage_total, wait_until


def add_rule(ws_id: int, **data) -> int:
    with SessionLocal.begin() as s:
        return rules.create_rule(s, ws_id, data).id


def events_by_status(ws_id: int) -> dict[str, int]:
    with SessionLocal() as s:
        rows = s.execute(select(Event.status, func.count()).where(Event.workspace_id == ws_id)
                         .group_by(Event.status)).all()
    return dict(rows)


VALIDATION_CASES = [
    ({"feature_id": "ghost"}, "feature_id"),
    ({"conditions": [{"property": "plan", "operator": "matches", "value": "x"}]}, "conditions.0.operator"),
    ({"conditions": [{"property": "a", "operator": "equals", "value": 1},
                     {"property": "seats", "operator": "gt", "value": "ten"}]}, "conditions.1.value"),
    ({"conditions": [{"property": "seats", "operator": "lte", "value": True}]}, "conditions.0.value"),
    ({"conditions": [{"property": "kind", "operator": "in", "value": "email"}]}, "conditions.0.value"),
    ({"conditions": [{"property": "kind", "operator": "in", "value": []}]}, "conditions.0.value"),
    ({"conditions": [{"property": "kind", "operator": "exists", "value": "yes"}]}, "conditions.0.value"),
    ({"conditions": [{"property": "kind", "operator": "equals"}]}, "conditions.0.value"),
    ({"conditions": [{"property": "kind", "operator": "contains", "value": None}]}, "conditions.0.value"),
    ({"conditions": [{"property": "a..b", "operator": "exists"}]}, "conditions.0.property"),
    ({"conditions": [{"property": "a", "operator": "exists", "extra": 1}]}, "conditions.0.extra"),
    ({"conditions": "plan.tier=pro"}, "conditions"),
    ({"delta_property": "usage..credits"}, "delta_property"),
    ({"type": "identify"}, "type"),
    ({"event": ""}, "event"),
    ({"priority": "high"}, "priority"),
    ({"typo": 1}, "typo"),
]


@pytest.mark.parametrize(("change", "field"), VALIDATION_CASES)
def test_invalid_rules_are_400_naming_the_field(client, workspace, change, field):
    add_feature(workspace.id, "exports")
    body = {"feature_id": "exports", "event": "Export", **change}
    resp = client.post("/api/v1/rules", json=body, headers=workspace.headers)
    assert resp.status_code == 400, resp.get_json()
    error = resp.get_json()
    assert error["code"] == "invalid_request"
    assert field in error["errors"], error
    assert field in error["message"]


def test_missing_required_fields_and_non_object_body(client, workspace):
    resp = client.post("/api/v1/rules", json={}, headers=workspace.headers)
    assert resp.status_code == 400 and {"feature_id", "event"} <= set(resp.get_json()["errors"])
    assert client.post("/api/v1/rules", json=[1], headers=workspace.headers).status_code == 400


def test_rules_api_needs_an_admin_key(client, workspace):
    assert client.get("/api/v1/rules").status_code == 401
    ingest = {"Authorization": f"Bearer {workspace.ingest_key}"}
    assert client.get("/api/v1/rules", headers=ingest).status_code == 403


def test_rule_crud_and_workspace_isolation(client, workspace, new_workspace):
    add_feature(workspace.id, "exports")
    add_feature(workspace.id, "reports")
    body = {"feature_id": "exports", "event": "Export", "type": "track",
            "conditions": [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
            "delta_property": "rows", "priority": 5}
    resp = client.post("/api/v1/rules", json=body, headers=workspace.headers)
    assert resp.status_code == 201, resp.get_json()
    created = resp.get_json()
    assert created["job_id"] and created["id"] and created["enabled"] is True
    assert {k: created[k] for k in body} == body
    rid = created["id"]

    listed = client.get("/api/v1/rules", headers=workspace.headers).get_json()["rules"]
    assert [r["id"] for r in listed] == [rid]
    assert client.get(f"/api/v1/rules/{rid}", headers=workspace.headers).get_json()["event"] == "Export"

    resp = client.patch(f"/api/v1/rules/{rid}", json={"feature_id": "reports", "conditions": []},
                        headers=workspace.headers)
    assert resp.status_code == 200, resp.get_json()
    changed = resp.get_json()
    assert changed["feature_id"] == "reports" and changed["conditions"] == [] and changed["priority"] == 5
    assert changed["job_id"]
    bad = client.patch(f"/api/v1/rules/{rid}", json={"feature_id": "ghost"}, headers=workspace.headers)
    assert bad.status_code == 400 and "feature_id" in bad.get_json()["errors"]

    other = new_workspace("other")
    assert client.get(f"/api/v1/rules/{rid}", headers=other.headers).status_code == 404
    assert client.delete(f"/api/v1/rules/{rid}", headers=other.headers).status_code == 404
    assert client.get("/api/v1/rules", headers=other.headers).get_json()["rules"] == []

    assert client.delete(f"/api/v1/rules/{rid}", headers=workspace.headers).status_code == 204
    assert client.get(f"/api/v1/rules/{rid}", headers=workspace.headers).status_code == 404
    assert client.get(f"/api/v1/rules/{2**70}", headers=workspace.headers).status_code == 404


def test_rules_map_live_events_through_the_pipeline(client, workspace, work):
    add_feature(workspace.id, "pro-messages")
    add_feature(workspace.id, "messages")
    add_feature(workspace.id, "pricing-views")
    add_rule(workspace.id, feature_id="pro-messages", event="Message Sent", priority=1,
             conditions=[{"property": "plan.tier", "operator": "equals", "value": "pro"},
                         {"property": "channel.kind", "operator": "in", "value": ["email", "sms"]}],
             delta_property="batch.size")
    add_rule(workspace.id, feature_id="messages", event="Message Sent", priority=2)
    add_rule(workspace.id, feature_id="pricing-views", event="Pricing", type="page")
    post_batch(client, workspace, [
        track("u1", "Message Sent", {"plan": {"tier": "pro"}, "channel": {"kind": "email"}, "batch": {"size": 40}}),
        track("u1", "Message Sent", {"plan": {"tier": "free"}, "channel": {"kind": "email"}}),
        track("u2", "Message Sent", {"plan": {"tier": "pro"}, "channel": {"kind": "push"}, "delta": 2}),
        track("u2", "Message Sent", {"featureId": "messages", "delta": 5}),  # featureId wins over rules
        track("u2", "Pricing"),  # a track call named like the page rule: not a page
        {"type": "page", "userId": "u3", "name": "Pricing", "messageId": "p1"},
        {"type": "screen", "userId": "u3", "name": "Pricing", "messageId": "s1"},
        track("u3", "Never Mapped", {"plan": {"tier": "pro"}}),
    ])
    work()
    assert usage_total(workspace.id, "pro-messages") == 40
    assert usage_total(workspace.id, "messages") == 1 + 2 + 5
    assert usage_total(workspace.id, "pricing-views") == 1
    assert events_by_status(workspace.id) == {"mapped": 5, "unmapped": 3}
    unmapped = client.get("/api/v1/events?status=unmapped", headers=workspace.headers).get_json()["events"]
    assert sorted((e["type"], e["name"], e["reason"]) for e in unmapped) == [
        ("screen", "Pricing", "no rule matched"),
        ("track", "Never Mapped", "no rule matched"),
        ("track", "Pricing", "no rule matched"),
    ]


def test_rules_are_loaded_once_per_chunk_not_per_event(client, workspace, work, monkeypatch):
    add_feature(workspace.id, "exports")
    add_rule(workspace.id, feature_id="exports", event="Export")
    calls = []
    real = rules.load_rules

    def counting(session, workspace_id):
        calls.append(workspace_id)
        return real(session, workspace_id)

    monkeypatch.setattr(rules, "load_rules", counting)
    post_batch(client, workspace, [track("same-user", "Export", message_id=f"e{i}") for i in range(300)])
    work()
    assert usage_total(workspace.id, "exports") == 300
    assert 1 <= len(calls) <= 2  # one chunk (one more if the drain re-checks an emptied partition)


def test_disabled_rules_and_rules_of_deleted_features_do_not_apply(client, workspace, work):
    add_feature(workspace.id, "exports")
    add_feature(workspace.id, "gone")
    rid = add_rule(workspace.id, feature_id="exports", event="Export")
    add_rule(workspace.id, feature_id="gone", event="Import")
    with SessionLocal.begin() as s:
        rules.update_rule(s, workspace.id, rid, {"enabled": False})
        s.delete(s.get(Feature, (workspace.id, "gone")))
    post_batch(client, workspace, [track("u1", "Export"), track("u1", "Import")])
    work()
    assert events_by_status(workspace.id) == {"unmapped": 2}


def test_segment_library_with_rules(live_server, workspace, work):
    segment = pytest.importorskip("segment.analytics")
    add_feature(workspace.id, "seats")
    add_feature(workspace.id, "docs-views")
    add_feature(workspace.id, "app-opens")
    add_rule(workspace.id, feature_id="seats", event="Seat Added",
             conditions=[{"property": "plan.tier", "operator": "not_equals", "value": "free"}],
             delta_property="plan.seats_added")
    add_rule(workspace.id, feature_id="docs-views", event="Docs", type="page",
             conditions=[{"property": "url", "operator": "contains", "value": "/docs/"}])
    add_rule(workspace.id, feature_id="app-opens", event="Home", type="screen")
    errors = []
    client = segment.Client(write_key=workspace.ingest_key, host=live_server, sync_mode=True,
                            on_error=lambda e, batch: errors.append(e))
    client.track("lib-user", "Seat Added", {"plan": {"tier": "team", "seats_added": 3}})
    client.track("lib-user", "Seat Added", {"plan": {"tier": "free", "seats_added": 9}})
    client.page("lib-user", None, "Docs", {"url": "https://example.com/docs/rules"})
    client.page("lib-user", None, "Docs", {"url": "https://example.com/blog"})
    client.screen("lib-user", None, "Home", {})
    client.flush()
    assert errors == []
    work()
    assert usage_total(workspace.id, "seats") == 3
    assert usage_total(workspace.id, "docs-views") == 1
    assert usage_total(workspace.id, "app-opens") == 1
    assert events_by_status(workspace.id) == {"mapped": 3, "unmapped": 2}


def test_new_rule_reprocesses_stored_events_at_their_original_time(client, workspace, work):
    add_feature(workspace.id, "exports")
    post_batch(client, workspace, [
        track("u1", "Report Exported", {"format": "csv", "plan": {"tier": "pro"}, "rows": 10},
              timestamp="2025-03-01T10:15:00Z"),
        track("u1", "Report Exported", {"format": "csv", "plan": {"tier": "pro"}, "rows": 5},
              timestamp="2025-03-03T23:59:00Z"),
        track("u1", "Report Exported", {"format": "pdf", "plan": {"tier": "pro"}, "rows": 7},
              timestamp="2025-03-02T08:00:00Z"),
        track("u1", "Report Exported", {"format": "csv", "plan": {"tier": "free"}, "rows": 100},
              timestamp="2025-03-02T09:00:00Z"),
        {"type": "page", "userId": "u1", "name": "Report Exported", "messageId": "pg1",
         "properties": {"format": "csv", "plan": {"tier": "pro"}, "rows": 1}},
    ])
    work()
    assert events_by_status(workspace.id) == {"unmapped": 5}
    listed = client.get("/api/v1/events?status=unmapped", headers=workspace.headers).get_json()["events"]
    assert {e["reason"] for e in listed} == {"no rule matched"}

    resp = client.post("/api/v1/rules", json={
        "feature_id": "exports", "event": "Report Exported", "type": "track", "delta_property": "rows",
        "conditions": [{"property": "format", "operator": "equals", "value": "csv"},
                       {"property": "plan.tier", "operator": "in", "value": ["pro", "team"]}],
    }, headers=workspace.headers)
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["job_id"]
    queued = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert queued["status"] == "queued" and queued["progress"] == 0
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "finished" and job["progress"] == 1
    assert job["result"] == {"scanned": 5, "mapped": 2}
    assert usage_total(workspace.id, "exports") == 15
    with SessionLocal() as s:
        ats = sorted(u.at.isoformat() for u in s.scalars(select(Usage).where(Usage.workspace_id == workspace.id)))
        kana_id = s.scalar(select(User.kana_id).where(User.workspace_id == workspace.id, User.user_id == "u1"))
    assert ats == ["2025-03-01T10:15:00+00:00", "2025-03-03T23:59:00+00:00"]

    # The usage query sees it where it happened, zero-filled in between.
    usage_resp = client.get(f"/api/v1/users/{kana_id}/usage?feature=exports&from=2025-03-01T00:00:00Z"
                            f"&to=2025-03-05T00:00:00Z&window=day", headers=workspace.headers).get_json()
    assert Decimal(str(usage_resp["total"])) == 15
    assert [Decimal(str(p["total"])) for p in usage_resp["series"]] == [10, 0, 5, 0]
    top = client.get("/api/v1/usage?feature=exports", headers=workspace.headers).get_json()
    assert Decimal(str(top["total"])) == 15 and [u["kana_id"] for u in top["users"]] == [kana_id]

    # Running it again changes nothing; the leftovers keep their reason.
    with SessionLocal() as s:
        before = s.scalar(select(func.count()).select_from(Usage).where(Usage.workspace_id == workspace.id))
    again = reprocess.reprocess(SessionLocal, workspace.id)
    assert (again.scanned, again.mapped) == (3, 0)
    assert count(Usage, workspace.id) == before == 2
    assert events_by_status(workspace.id) == {"mapped": 2, "unmapped": 3}


def test_creating_the_feature_maps_events_stored_with_an_unknown_feature_id(client, workspace, work):
    post_batch(client, workspace, [track("u1", "Anything", {"featureId": "credits", "delta": 4},
                                         timestamp="2025-01-02T03:04:05Z")])
    work()
    listed = client.get("/api/v1/events?status=unmapped", headers=workspace.headers).get_json()["events"]
    assert [e["reason"] for e in listed] == ["unknown featureId 'credits'"]
    resp = client.post("/api/v1/features", json={"id": "credits", "name": "Credits", "type": "consumable"},
                       headers=workspace.headers)
    assert resp.status_code == 201 and resp.get_json()["job_id"]
    work()
    assert usage_total(workspace.id, "credits") == 4
    with SessionLocal() as s:
        assert s.scalar(select(Usage.at).where(Usage.workspace_id == workspace.id)).isoformat() == \
            "2025-01-02T03:04:05+00:00"


def test_changing_a_rule_reprocesses_and_reasons_follow(client, workspace, work):
    add_feature(workspace.id, "credits")
    rid = add_rule(workspace.id, feature_id="credits", event="Spend", delta_property="credits")
    post_batch(client, workspace, [track("u1", "Spend", {"amount": 3}), track("u1", "Spend", {"credits": 2})])
    work()
    assert usage_total(workspace.id, "credits") == 2
    listed = client.get("/api/v1/events?status=unmapped", headers=workspace.headers).get_json()["events"]
    assert listed[0]["reason"] == f"rule {rid} matched but its amount property 'credits' is missing"
    resp = client.patch(f"/api/v1/rules/{rid}", json={"delta_property": "amount"}, headers=workspace.headers)
    assert resp.status_code == 200 and resp.get_json()["job_id"]
    work()
    assert usage_total(workspace.id, "credits") == 5
    assert events_by_status(workspace.id) == {"mapped": 2}


def test_reprocessing_progress_and_chunks(client, workspace, work):
    add_feature(workspace.id, "exports")
    post_batch(client, workspace, [track(f"u{i % 7}", "Export", {"n": i}) for i in range(95)])
    work()
    add_rule(workspace.id, feature_id="exports", event="Export",
             conditions=[{"property": "n", "operator": "lt", "value": 50}])
    seen = []
    state = reprocess.reprocess(SessionLocal, workspace.id, chunk=10,
                                progress=lambda p: seen.append((p.scanned, p.fraction)))
    assert (state.total, state.scanned, state.mapped, state.chunks) == (95, 95, 50, 10)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert usage_total(workspace.id, "exports") == 50


def test_reprocess_job_reports_progress_in_meta(client, workspace, work, runtime):
    add_feature(workspace.id, "exports")
    post_batch(client, workspace, [track("u1", "Export")])
    work()
    add_rule(workspace.id, feature_id="exports", event="Export")
    job_id = reprocess.enqueue(runtime.queue, workspace.id)
    # A second change while the first job is still queued shares that job.
    assert reprocess.enqueue(runtime.queue, workspace.id) == job_id
    work()
    job = runtime.queue.fetch_job(job_id)
    assert job.meta["progress"] == 1.0 and job.meta["workspace_id"] == workspace.id
    assert job.return_value() == {"scanned": 1, "mapped": 1}
    assert reprocess.enqueue(runtime.queue, workspace.id) != job_id  # finished: a new pass is queued


def test_concurrent_reprocessing_runs_never_double_usage(client, workspace, work):
    add_feature(workspace.id, "exports")
    n = 600
    post_batch(client, workspace, [track(f"u{i % 13}", "Export", {"rows": 2}) for i in range(n)])
    work()
    add_rule(workspace.id, feature_id="exports", event="Export", delta_property="rows")
    results, failures = [], []

    def run() -> None:
        try:
            results.append(reprocess.reprocess(SessionLocal, workspace.id, chunk=25))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert sum(r.mapped for r in results) == n
    assert count(Usage, workspace.id) == n and usage_total(workspace.id, "exports") == 2 * n
    assert events_by_status(workspace.id) == {"mapped": n}


def test_reprocessing_with_live_traffic_and_workers_is_exact(app, client, workspace, work, spawn_worker, runtime):
    """A rule is created mid-traffic: backlog, live events and extra runs all count exactly once."""
    add_feature(workspace.id, "exports")
    backlog = [track(f"u{i % 17}", "Export", {"format": "csv" if i % 2 else "pdf"}) for i in range(400)]
    post_batch(client, workspace, backlog)
    work()
    live = [track(f"u{i % 17}", "Export", {"format": "csv" if i % 3 else "pdf"}) for i in range(900)]
    expected = sum(1 for c in backlog + live if c["properties"]["format"] == "csv")
    for _ in range(2):
        spawn_worker()
    failures = []

    def send() -> None:
        sender = app.test_client()
        for i in range(0, len(live), 30):
            resp = sender.post("/v1/batch", json={"batch": live[i : i + 30]}, headers=workspace.headers)
            if resp.status_code != 200:
                failures.append(resp.get_json())

    def extra_run() -> None:
        try:
            reprocess.reprocess(SessionLocal, workspace.id, chunk=40)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: events_by_status(workspace.id).get("unmapped", 0) > 450, timeout=60)
    resp = client.post("/api/v1/rules", json={
        "feature_id": "exports", "event": "Export",
        "conditions": [{"property": "format", "operator": "equals", "value": "csv"}]}, headers=workspace.headers)
    assert resp.status_code == 201
    job_id = resp.get_json()["job_id"]
    runners = [threading.Thread(target=extra_run) for _ in range(2)]
    for t in runners:
        t.start()
    sender.join(timeout=120)
    for t in runners:
        t.join(timeout=120)
    assert failures == []
    total = len(backlog) + len(live)
    wait_until(lambda: sum(events_by_status(workspace.id).values()) == total, timeout=120, interval=0.2)
    wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers)
               .get_json()["status"] == "finished", timeout=120, interval=0.2)
    assert count(Usage, workspace.id) == expected
    assert usage_total(workspace.id, "exports") == expected
    # No csv event was left behind by a chunk that mapped with the rules from before the change.
    with SessionLocal() as s:
        left = [e.properties for e in s.scalars(select(Event).where(
            Event.workspace_id == workspace.id, Event.status == "unmapped"))]
    assert len(left) == total - expected and all(p["format"] == "pdf" for p in left)
    assert reprocess.reprocess(SessionLocal, workspace.id).mapped == 0


def test_a_rule_change_waits_for_chunks_mapping_with_the_old_rules(workspace):
    """The race a reprocessing job could otherwise lose: a drain chunk that loaded the rules
    before a change and commits after the job scanned past its events."""
    from kana.ingest import processor

    add_feature(workspace.id, "exports")
    now = "2026-01-01T00:00:00+00:00"
    call = {"ws": workspace.id, "type": "track", "userId": "u1", "event": "Export", "properties": {},
            "messageId": "in-flight", "timestamp": now, "receivedAt": now}
    chunk = SessionLocal()
    chunk.begin()
    processor.apply(chunk, [call])  # mapped with no rules, not committed yet
    done = threading.Event()

    def change() -> None:
        add_rule(workspace.id, feature_id="exports", event="Export")
        reprocess.reprocess(SessionLocal, workspace.id)
        done.set()

    thread = threading.Thread(target=change)
    thread.start()
    assert not done.wait(0.5), "the rule change did not wait for the in-flight chunk"
    chunk.commit()
    chunk.close()
    thread.join(timeout=30)
    assert done.is_set()
    assert usage_total(workspace.id, "exports") == 1
    assert events_by_status(workspace.id) == {"mapped": 1}


def test_cli_rule_create_list_and_reprocess(settings, client, workspace, work):
    from kana.cli import main

    add_feature(workspace.id, "exports")
    post_batch(client, workspace, [track("u1", "Export", {"plan": {"tier": "pro"}, "rows": 3}),
                                   track("u1", "Export", {"plan": {"tier": "free"}, "rows": 9})])
    work()
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url or "",
           "KANA_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()
    result = runner.invoke(main, ["rule", "create", "--workspace", str(workspace.id), "--feature", "exports",
                                  "--event", "Export", "--condition", "plan.tier", "equals", "pro",
                                  "--condition", "rows", "gte", "1", "--delta-property", "rows",
                                  "--reprocess", "none", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "job_id" not in result.output
    result = runner.invoke(main, ["rule", "list", "--workspace", str(workspace.id)], env=env)
    assert result.exit_code == 0 and 'plan.tier equals "pro" AND rows gte 1' in result.output
    result = runner.invoke(main, ["reprocess", "--workspace", str(workspace.id), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert '{"scanned": 2, "mapped": 1}' in result.output
    assert usage_total(workspace.id, "exports") == 3
    post_batch(client, workspace, [track("u1", "Spend", {"featureId": "credits", "delta": 6})])
    work()
    result = runner.invoke(main, ["feature", "create", "--workspace", str(workspace.id), "credits"], env=env)
    assert result.exit_code == 0 and "reprocessing job" in result.output, result.output
    work()
    assert usage_total(workspace.id, "credits") == 6
    bad = runner.invoke(main, ["rule", "create", "--workspace", str(workspace.id), "--feature", "exports",
                               "--event", "Export", "--condition", "rows", "gt", "many"], env=env)
    assert bad.exit_code != 0 and "conditions.0.value" in bad.output



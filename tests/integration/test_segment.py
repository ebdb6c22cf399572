"""Segment's own deliveries (SPEC §2, §3): Actions batches, shared-secret signing, per-item
writeKeys, and what an event keeps (context, the four timestamps, the user's locale/timezone).

Bodies come from tests/fixtures/segment: events as Segment's Webhooks (Actions) destination sends them.
"""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import datetime

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import jobs
from kana.cli import main as cli
from kana.db import SessionLocal, read_only
from kana.ingest import spool
from kana.models import Event, User, Workspace
from tests.fixtures import segment as fixtures
from tests.integration.test_dashboard import admin, browser, post, text  # noqa: F401 - fixtures

SECRET = "whsec-Segment-shared-secret"


def set_secret(client, ws, secret: str | None = SECRET, **more) -> dict:
    resp = client.patch("/api/v1/workspace", headers=ws.headers, json={"segment_shared_secret": secret, **more})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def signed_post(client, ws_id: int, raw: bytes, signature: str | None, **headers):
    if signature is not None:
        headers["X-Signature"] = signature
    return client.post(f"/segment/{ws_id}", data=raw, headers={"Content-Type": "application/json", **headers})


def queued(redis, runtime) -> list[dict]:
    out = []
    for p in range(runtime.settings.partitions):
        out += [json.loads(x) for x in redis.lrange(spool.queue_key(p), 0, -1)]
    return out


def stored(ws_id: int) -> list[Event]:
    with read_only(SessionLocal()) as s:
        return list(s.scalars(select(Event).where(Event.workspace_id == ws_id)))


# --- signing -----------------------------------------------------------------------------------


def test_signed_actions_batch_of_4000_is_stored_once_each_with_context(client, workspace, redis, runtime, work):
    assert SECRET not in json.dumps(set_secret(client, workspace))
    events = fixtures.actions_batch(4000, tag=uuid.uuid4().hex[:8])
    raw = fixtures.body(events)
    assert len(raw) > 5_000_000  # what a full Actions batch weighs: over ten times /v1/batch's 500 KB
    resp = signed_post(client, workspace.id, raw, fixtures.sign(raw, SECRET))
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"success": True, "accepted": 4000}
    work()
    # Segment redelivers the same batch (a timeout on its side): nothing changes.
    assert signed_post(client, workspace.id, raw, fixtures.sign(raw, SECRET)).status_code == 200
    work()
    rows = stored(workspace.id)
    assert len(rows) == 4000
    assert {r.message_id for r in rows} == {e["messageId"] for e in events}
    sent = {e["messageId"]: e for e in events}
    for row in rows:
        call = sent[row.message_id]
        assert {k: datetime.fromisoformat(v) for k, v in row.timestamps.items()} == {
            k: datetime.fromisoformat(call[k]) for k in ("originalTimestamp", "sentAt", "receivedAt")}
        assert row.timestamp == datetime.fromisoformat(call["timestamp"])
        want = {k: call["context"][k] for k in ("library", "locale", "timezone", "userAgent", "page", "campaign")
                if k in call["context"]}
        assert row.context == want  # ip is not kept by default; os, screen, userAgentData are not kept
    # The Segment source's own writeKey rode along in every event and is stored nowhere.
    with read_only(SessionLocal()) as s:
        dumped = json.dumps([[r.context, r.properties, r.timestamps] for r in s.scalars(
            select(Event).where(Event.workspace_id == workspace.id))])
    assert "kYqQn6nNu2wVZ7tHqP4mXo1sSegmentSrc" not in dumped


def test_unsigned_and_wrongly_signed_requests_are_401_and_say_which(client, workspace, redis):
    set_secret(client, workspace)
    raw = fixtures.body(fixtures.actions_batch(10))
    missing = signed_post(client, workspace.id, raw, None)
    assert missing.status_code == 401 and "Missing X-Signature" in missing.get_json()["message"]
    wrong = signed_post(client, workspace.id, raw, fixtures.sign(raw, "not-the-secret"))
    assert wrong.status_code == 401 and "Wrong X-Signature" in wrong.get_json()["message"]
    # Signed over other bytes than those sent (the body was altered on the way).
    altered = signed_post(client, workspace.id, raw + b" ", fixtures.sign(raw, SECRET))
    assert altered.status_code == 401
    garbage = signed_post(client, workspace.id, raw, "zz\u00e9")
    assert garbage.status_code == 401
    assert spool.depth(redis, 8) == 0


def test_signature_needs_a_secret_and_the_right_workspace(client, workspace, new_workspace, redis):
    other = new_workspace("other")
    set_secret(client, other, "other-secret")
    raw = fixtures.body([fixtures.sample("track")])
    # No secret set on this workspace: no signature can be right.
    resp = signed_post(client, workspace.id, raw, fixtures.sign(raw, ""))
    assert resp.status_code == 401 and "no Segment shared secret" in resp.get_json()["message"]
    # Another workspace's secret signs for that workspace only.
    assert signed_post(client, workspace.id, raw, fixtures.sign(raw, "other-secret")).status_code == 401
    assert signed_post(client, 2**70, raw, fixtures.sign(raw, "other-secret")).status_code in (401, 404)
    assert signed_post(client, other.id, raw, fixtures.sign(raw, "other-secret")).status_code == 200
    # A key works instead of a signature, but only one of that workspace.
    assert signed_post(client, other.id, raw, None, Authorization=f"Bearer {other.ingest_key}").status_code == 200
    resp = signed_post(client, other.id, raw, None, Authorization=f"Bearer {workspace.ingest_key}")
    assert resp.status_code == 401 and "not a key of workspace" in resp.get_json()["message"]


def test_gzip_signed_body_and_a_single_event(client, workspace, redis, runtime):
    set_secret(client, workspace)
    call = fixtures.sample("identify")
    raw = json.dumps(call).encode()
    # Segment signs the JSON it sends; a gzip-encoded body is verified once decoded.
    resp = signed_post(client, workspace.id, gzip.compress(raw), fixtures.sign(raw, SECRET), **{
        "Content-Encoding": "gzip"})
    assert resp.status_code == 200, resp.get_json()
    [event] = queued(redis, runtime)
    assert event["context"]["locale"] == "fr-FR" and event["context"]["timezone"] == "Europe/Paris"
    assert "ip" not in event["context"] and "writeKey" not in event


def test_secret_is_set_by_the_cli_and_never_printed(settings, client, workspace, redis):
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url or "",
           "KANA_DATA_DIR": str(settings.data_dir)}
    result = CliRunner().invoke(cli, ["workspace", "update", "--workspace", str(workspace.id),
                                      "--segment-shared-secret", "-", "--keep-ip"], input="cli-secret\n", env=env)
    jobs.init(settings)
    assert result.exit_code == 0, result.output
    assert "cli-secret" not in result.output and "shared secret: set" in result.output
    raw = fixtures.body([fixtures.sample("page")])
    assert signed_post(client, workspace.id, raw, fixtures.sign(raw, "cli-secret")).status_code == 200
    result = CliRunner().invoke(cli, ["workspace", "update", "--workspace", "999999999"], env=env)
    assert result.exit_code != 0


# --- writeKeys inside items (SPEC §2; never attributed to another workspace) ----------------------


@pytest.mark.parametrize("path", ["/segment", "/v1/batch"])
def test_item_with_another_workspaces_key_is_rejected_alone(client, workspace, new_workspace, redis, runtime, path):
    other = new_workspace("other")
    calls = [fixtures.sample("track") for _ in range(3)]
    for i, call in enumerate(calls):
        call["messageId"] = f"wk-{i}-{uuid.uuid4().hex}"
    calls[0]["writeKey"] = other.ingest_key          # another workspace's key: rejected
    calls[1]["writeKey"] = "kana_i_not-issued-here"   # looks like ours, is no key here: ignored
    calls[2]["writeKey"] = workspace.ingest_key       # this workspace's own key: fine
    body = calls if path == "/segment" else {"batch": calls}
    resp = client.post(path, json=body, headers=workspace.headers)
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    assert answer["accepted"] == 2
    [rejected] = answer["rejected"]
    assert rejected["index"] == 0 and rejected["code"] == "forbidden" and "writeKey" in rejected["errors"]
    got = queued(redis, runtime)
    assert {e["messageId"] for e in got} == {calls[1]["messageId"], calls[2]["messageId"]}
    assert all(e["ws"] == workspace.id and "writeKey" not in e for e in got)


def test_array_authenticated_by_item_writekey_still_works(client, workspace, redis, runtime):
    call = fixtures.sample("track")
    call["writeKey"] = workspace.ingest_key
    resp = client.post("/segment", json=[call, {**call, "messageId": "second"}])
    assert resp.status_code == 200 and resp.get_json()["accepted"] == 2


# --- limits ------------------------------------------------------------------------------------


def test_actions_array_limits(client, workspace, redis, runtime):
    limit = runtime.settings.max_segment_items
    small = {"type": "track", "userId": "u", "event": "E"}
    resp = client.post("/segment", json=[small] * (limit + 1), headers=workspace.headers)
    assert resp.status_code == 413 and f"{limit:,}" in resp.get_json()["message"]
    assert spool.depth(redis, runtime.settings.partitions) == 0
    # 32 KB per event still holds, per event: the big one is rejected, the rest accepted.
    big = {**small, "messageId": "big", "properties": {"blob": "x" * 40_000}}
    resp = client.post("/segment", json=[small, big, small], headers=workspace.headers)
    assert resp.status_code == 200
    assert resp.get_json()["accepted"] == 2 and resp.get_json()["rejected"][0]["code"] == "payload_too_large"
    # /v1/batch keeps Segment's inbound limits.
    resp = client.post("/v1/batch", json={"batch": [small] * 2501}, headers=workspace.headers)
    assert resp.status_code == 413


@pytest.mark.parametrize("raw, status", [
    (b"[{\"type\":\"track\",\"userId\":\"u\",\"event\":\"E\"}, oops]", 400),
    (b"[{\"type\":\"track\",\"userId\":\"u\",\"event\":\"E\"}] trailing", 400),
    (b"[{\"type\":\"track\",\"userId\":\"u\",\"event\":\"\xff\"}]", 400),
    (b"[", 400),
    (b"[]", 400),
])
def test_malformed_arrays_are_400_and_queue_nothing(client, workspace, redis, runtime, raw, status):
    resp = client.post("/segment", data=raw, headers={**workspace.headers, "Content-Type": "application/json"})
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["code"] in ("invalid_json", "invalid_batch")
    assert spool.depth(redis, runtime.settings.partitions) == 0


def test_lone_surrogates_and_nul_are_rejected_per_item_in_arrays(client, workspace, redis, runtime):
    raw = (b'\xef\xbb\xbf [{"type":"track","userId":"u","event":"E","messageId":"a"},'
           b'{"type":"track","userId":"u","event":"\\ud800","messageId":"b"},'
           b'{"type":"track","userId":"u","event":"\\u0000","messageId":"c"},'
           b'{"type":"track","userId":"u","event":"\\ud83d\\ude00","messageId":"d"}]')
    resp = client.post("/segment", data=raw, headers={**workspace.headers, "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.get_json()
    assert [r["messageId"] for r in resp.get_json()["rejected"]] == ["b", "c"]
    assert {e["event"] for e in queued(redis, runtime)} == {"E", "\U0001f600"}


# --- what an event keeps ---------------------------------------------------------------------------


def test_ip_is_kept_only_when_the_workspace_keeps_ips(client, workspace, redis, runtime, work):
    call = fixtures.sample("track")
    assert client.post("/segment", json=call, headers=workspace.headers).status_code == 200
    set_secret(client, workspace, None, keep_ip=True)
    kept = {**call, "messageId": "with-ip"}
    assert client.post("/segment", json=kept, headers=workspace.headers).status_code == 200
    work()
    rows = {r.message_id: r for r in stored(workspace.id)}
    assert "ip" not in rows[call["messageId"]].context
    assert rows["with-ip"].context["ip"] == "203.0.113.42"


def test_user_keeps_the_latest_locale_and_timezone_of_its_identifies(client, workspace, redis, work):
    newer = fixtures.sample("identify")
    newer["context"].update(locale="de-DE", timezone="Europe/Berlin")
    older = fixtures.sample("identify")
    older["messageId"] = "older"
    older["timestamp"] = "2020-01-01T00:00:00Z"
    older["context"].update(locale="en-US", timezone="America/New_York")
    # Segment does not guarantee order: the older identify arrives last.
    for call in (newer, older):
        assert client.post("/segment", json=call, headers=workspace.headers).status_code == 200
    work()
    with read_only(SessionLocal()) as s:
        user = s.scalar(select(User).where(User.workspace_id == workspace.id, User.user_id == "user-42"))
        assert (user.locale, user.timezone) == ("de-DE", "Europe/Berlin")
        assert s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == workspace.id)) == 2
        assert s.get(Workspace, workspace.id).keep_ip is False


# --- dashboard -----------------------------------------------------------------------------------


def test_dashboard_shows_context_locale_and_sets_the_secret(browser, admin, workspace, client, redis, work):  # noqa: F811
    for kind in ("identify", "track", "page"):
        assert client.post("/segment", json=fixtures.sample(kind), headers=workspace.headers).status_code == 200
    work()
    with read_only(SessionLocal()) as s:
        kana_id = s.scalar(select(User.kana_id).where(User.workspace_id == workspace.id, User.user_id == "user-42"))
    page = text(browser.get(f"/dashboard/users/{kana_id}"))
    assert 'data-field="locale">fr-FR' in page and "Europe/Paris" in page
    assert 'data-context="library"' in page and "analytics.js next-1.70.0" in page
    assert "Reports · Project 42 · Acme" in page  # the page the track call was made on
    assert "spring-launch · newsletter / email" in page
    assert "originalTimestamp" in page and "203.0.113.42" not in page
    resp = post(browser, "/dashboard/settings", {"name": "Acme", "segment_shared_secret": "dash-secret",
                                                 "keep_ip": "1"})
    assert resp.status_code == 302
    settings_page = text(browser.get("/dashboard/settings"))
    assert "dash-secret" not in settings_page and f"/segment/{workspace.id}" in settings_page
    with read_only(SessionLocal()) as s:
        row = s.get(Workspace, workspace.id)
        assert (row.segment_shared_secret, row.keep_ip) == ("dash-secret", True)
    raw = fixtures.body([fixtures.sample("alias")])
    assert signed_post(client, workspace.id, raw, fixtures.sign(raw, "dash-secret")).status_code == 200

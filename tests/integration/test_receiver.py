"""The Segment receiver against the real app, database and Redis: what lands in the queue, and what does not."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from datetime import UTC, datetime

import pytest

import config
from app import create_app
from kana.db import SessionLocal
from kana.domain import keys
from kana.ingest import spool

TS = "2024-05-01T12:00:00+00:00"


# -- helpers ------------------------------------------------------------------


def queued(redis, runtime) -> list[dict]:
    """Every event in the partition lists, in no particular partition order."""
    out: list[dict] = []
    for p in range(runtime.settings.partitions):
        out += [json.loads(raw) for raw in redis.lrange(spool.queue_key(p), 0, -1)]
    return out


def assert_nothing_queued(redis) -> None:
    # Rejected calls must not touch Redis: no event, no counter, no wake-up (the
    # record of a verified API key, kana.domain.keys.remember, is not a call's).
    left = sorted(k.decode() for k in redis.keys("*") if not k.startswith(keys.RECORD_PREFIX.encode()))
    assert left == [], left


def post(client, path: str, body, workspace, headers: dict | None = None, **kwargs):
    hdrs = dict(workspace.headers)
    hdrs.update(headers or {})
    if isinstance(body, bytes | str):
        return client.post(path, data=body, headers=hdrs, content_type="application/json", **kwargs)
    return client.post(path, json=body, headers=hdrs, **kwargs)


def one_event(redis, runtime) -> dict:
    events = queued(redis, runtime)
    assert len(events) == 1, events
    return events[0]


def strip_received(event: dict) -> dict:
    received = event.pop("receivedAt")
    assert datetime.fromisoformat(received).tzinfo is not None
    assert received.endswith("+00:00")
    return event


def deep(levels: int) -> dict:
    """A properties value nested so that the whole call is ``levels`` deep."""
    value: dict = {}
    # call (1) > properties (2) > ... : ``levels - 2`` more dicts inside properties.
    for _ in range(levels - 2):
        value = {"a": value}
    return value


# -- authentication -------------------------------------------------------------


@pytest.mark.parametrize("style", ["basic", "bearer", "bare", "writeKey", "basic-ingest"])
def test_every_auth_style_is_accepted(client, workspace, redis, runtime, style):
    call = {"userId": "u1", "event": "Signed Up", "messageId": "m-1"}
    key = workspace.ingest_key if style == "basic-ingest" else workspace.key
    headers = {}
    if style.startswith("basic"):
        headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    elif style == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    elif style == "bare":
        headers["Authorization"] = key
    else:
        call["writeKey"] = key
    res = client.post("/v1/track", json=call, headers=headers)
    assert res.status_code == 200, res.json
    assert res.json == {"success": True, "accepted": 1}
    assert one_event(redis, runtime)["ws"] == workspace.id


def test_missing_and_unknown_keys_are_401(client, workspace, redis):
    call = {"userId": "u1", "event": "Signed Up"}
    res = client.post("/v1/track", json=call)
    assert res.status_code == 401
    assert res.json["code"] == "unauthorized"
    res = client.post("/v1/track", json=call, headers={"Authorization": "Bearer kana_a_nope"})
    assert res.status_code == 401
    assert set(res.json) == {"code", "message"}
    res = client.post("/v1/track", json={**call, "writeKey": "kana_a_nope"})
    assert res.status_code == 401
    assert_nothing_queued(redis)


def test_revoked_key_is_401(client, workspace, redis):
    with SessionLocal.begin() as s:
        principal = keys.lookup(s, workspace.ingest_key)
        assert keys.revoke_key(s, workspace.id, principal.key_id)
    res = client.post("/v1/track", json={"userId": "u1", "event": "E"},
                      headers={"Authorization": f"Bearer {workspace.ingest_key}"})
    assert res.status_code == 401
    assert_nothing_queued(redis)


def test_batch_write_key_in_envelope_and_in_items(client, workspace, redis, runtime):
    res = client.post("/v1/batch", json={"writeKey": workspace.key, "batch": [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "m1"}]})
    assert res.status_code == 200, res.json
    res = client.post("/v1/batch", json={"batch": [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "m2", "writeKey": workspace.key}]})
    assert res.status_code == 200, res.json
    res = client.post("/segment", json=[
        {"type": "track", "userId": "u1", "event": "E", "messageId": "m3", "writeKey": workspace.key}])
    assert res.status_code == 200, res.json
    assert sorted(e["messageId"] for e in queued(redis, runtime)) == ["m1", "m2", "m3"]


# -- the normalized event, per type --------------------------------------------


def test_track_event_is_normalized_exactly(client, workspace, redis, runtime):
    call = {
        "type": "track", "userId": "u1", "messageId": "m-1", "event": "Message Sent",
        "properties": {"featureId": "messages", "delta": 2.5, "plan": {"tier": "pro"}},
        "timestamp": "2024-05-01T12:00:00Z", "anonymousId": "anon", "context": {"ip": "1.2.3.4"},
        "integrations": {"All": True}, "sentAt": "2024-05-01T12:00:01Z", "channel": "server",
    }
    res = post(client, "/v1/track", call, workspace)
    assert res.status_code == 200, res.json
    assert strip_received(one_event(redis, runtime)) == {
        "ws": workspace.id, "type": "track", "messageId": "m-1", "userId": "u1", "timestamp": TS,
        "event": "Message Sent", "properties": {"featureId": "messages", "delta": 2.5, "plan": {"tier": "pro"}},
        # context.ip is dropped (the workspace does not keep IPs); the sender's sentAt is kept.
        "timestamps": {"sentAt": "2024-05-01T12:00:01+00:00"},
    }


def test_identify_event(client, workspace, redis, runtime):
    call = {"userId": "u1", "messageId": "m-1", "traits": {"email": "a@example.com", "name": "A", "plan": "x"},
            "timestamp": "2024-05-01T14:00:00+02:00"}
    assert post(client, "/v1/identify", call, workspace).status_code == 200
    assert strip_received(one_event(redis, runtime)) == {
        "ws": workspace.id, "type": "identify", "messageId": "m-1", "userId": "u1", "timestamp": TS,
        "traits": {"email": "a@example.com", "name": "A", "plan": "x"},
    }


@pytest.mark.parametrize("kind", ["page", "screen"])
def test_page_and_screen_events(client, workspace, redis, runtime, kind):
    call = {"userId": "u1", "messageId": "m-1", "name": "Pricing", "properties": {"path": "/pricing"},
            "timestamp": "2024-05-01T12:00:00"}
    assert post(client, f"/v1/{kind}", call, workspace).status_code == 200
    assert strip_received(one_event(redis, runtime)) == {
        "ws": workspace.id, "type": kind, "messageId": "m-1", "userId": "u1", "timestamp": TS,
        "name": "Pricing", "properties": {"path": "/pricing"},
    }


def test_page_name_falls_back_to_properties_name_then_none(client, workspace, redis, runtime):
    post(client, "/v1/page", {"userId": "u1", "messageId": "a", "properties": {"name": "Docs"}}, workspace)
    post(client, "/v1/page", {"userId": "u1", "messageId": "b", "name": None}, workspace)
    post(client, "/v1/page", {"userId": "u1", "messageId": "c", "name": "Top", "properties": {"name": "Prop"}},
         workspace)
    names = {e["messageId"]: e["name"] for e in queued(redis, runtime)}
    assert names == {"a": "Docs", "b": None, "c": "Top"}


def test_group_alias_and_delete_events(client, workspace, redis, runtime):
    assert post(client, "/v1/group", {"userId": "u1", "messageId": "g", "groupId": 7,
                                      "traits": {"name": "Acme"}, "timestamp": TS}, workspace).status_code == 200
    assert post(client, "/v1/alias", {"userId": "u2", "messageId": "a", "previous_id": "u1",
                                      "timestamp": TS}, workspace).status_code == 200
    assert post(client, "/segment", {"type": "delete", "userId": "u2", "messageId": "d", "timestamp": TS},
                workspace).status_code == 200
    events = {e["messageId"]: strip_received(e) for e in queued(redis, runtime)}
    base = {"ws": workspace.id, "timestamp": TS}
    assert events == {
        "g": {**base, "type": "group", "messageId": "g", "userId": "u1", "groupId": "7", "traits": {"name": "Acme"}},
        "a": {**base, "type": "alias", "messageId": "a", "userId": "u2", "previousId": "u1"},
        "d": {**base, "type": "delete", "messageId": "d", "userId": "u2"},
    }


def test_timestamp_falls_back_to_original_timestamp_then_received_at(client, workspace, redis, runtime):
    post(client, "/v1/track", {"userId": "u", "event": "E", "messageId": "o",
                               "originalTimestamp": "2024-05-01T07:00:00-05:00"}, workspace)
    post(client, "/v1/track", {"userId": "u", "event": "E", "messageId": "r"}, workspace)
    post(client, "/v1/track", {"userId": "u", "event": "E", "messageId": "t", "timestamp": "2024-05-01T12:00:00.250Z",
                               "originalTimestamp": "2020-01-01T00:00:00Z"}, workspace)
    events = {e["messageId"]: e for e in queued(redis, runtime)}
    assert events["o"]["timestamp"] == TS
    assert events["r"]["timestamp"] == events["r"]["receivedAt"]
    assert abs(datetime.fromisoformat(events["r"]["receivedAt"]) - datetime.now(UTC)).total_seconds() < 60
    assert events["t"]["timestamp"] == "2024-05-01T12:00:00.250000+00:00"


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp"])
@pytest.mark.parametrize("value", ["yesterday", "2024-13-01T00:00:00Z", 1714564800, ""])
def test_unparseable_timestamp_is_400(client, workspace, redis, field, value):
    res = post(client, "/v1/track", {"userId": "u", "event": "E", field: value}, workspace)
    assert res.status_code == 400
    assert res.json["code"] == "invalid_call"
    assert field in res.json["errors"]
    assert field in res.json["message"]
    assert_nothing_queued(redis)


# -- ids ------------------------------------------------------------------------


def test_numeric_ids_become_strings(client, workspace, redis, runtime):
    post(client, "/v1/track", {"user_id": 42, "message_id": 1001, "event": "E"}, workspace)
    event = one_event(redis, runtime)
    assert event["userId"] == "42"
    assert event["messageId"] == "1001"


@pytest.mark.parametrize("value", ["", "   ", "null", "undefined", "[object Object]", "NaN", "NULL", True, {}, [1]])
def test_placeholder_and_invalid_user_ids_are_400(client, workspace, redis, value):
    res = post(client, "/v1/identify", {"userId": value, "traits": {}}, workspace)
    assert res.status_code == 400, res.json
    assert list(res.json["errors"]) == ["userId"]
    assert res.json["message"].startswith("Invalid identify call: userId ")
    assert_nothing_queued(redis)


@pytest.mark.parametrize("body", [
    {"anonymousId": "anon-1", "event": "E"},
    {"userId": None, "anonymousId": "anon-1", "event": "E"},
    {"event": "E"},
])
def test_anonymous_calls_are_dropped_with_400(client, workspace, redis, body):
    res = post(client, "/v1/track", body, workspace)
    assert res.status_code == 400
    assert "userId" in res.json["errors"]
    assert "anonymous" in res.json["message"]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("field", ["messageId", "message_id"])
def test_placeholder_message_id_is_400(client, workspace, redis, field):
    res = post(client, "/v1/track", {"userId": "u", "event": "E", field: "undefined"}, workspace)
    assert res.status_code == 400
    assert "messageId" in res.json["errors"]
    assert_nothing_queued(redis)


def test_deterministic_message_id(client, workspace, redis, runtime):
    call = {"userId": "u1", "event": "E", "properties": {"a": 1, "b": [1, 2]}, "timestamp": TS}
    post(client, "/v1/track", {**call, "sentAt": "2024-05-01T12:00:01Z"}, workspace)
    # Same call redelivered: other sentAt, key in the body, keys in another order.
    reordered = {"timestamp": TS, "properties": {"b": [1, 2], "a": 1}, "event": "E", "userId": "u1",
                 "sentAt": "2024-05-01T13:00:00Z", "writeKey": workspace.key}
    post(client, "/v1/track", reordered, workspace)
    post(client, "/v1/track", {**call, "properties": {"a": 2, "b": [1, 2]}}, workspace)
    ids = [e["messageId"] for e in sorted(queued(redis, runtime), key=lambda e: e["receivedAt"])]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    assert ids[0].startswith("kana-") and len(ids[0]) == 5 + 64


def test_batch_context_merges_into_items_for_the_derived_message_id(client, workspace, redis, runtime):
    context = {"library": {"name": "x"}, "ip": "1.2.3.4"}
    item = {"userId": "u1", "event": "E", "timestamp": TS}
    # The same call, alone with its context, and in a batch that factored the context out.
    post(client, "/v1/track", {**item, "context": context}, workspace)
    post(client, "/v1/batch", {"batch": [{**item, "type": "track", "context": {"ip": "1.2.3.4"}}],
                               "context": {"library": {"name": "x"}, "ip": "9.9.9.9"}}, workspace)
    post(client, "/v1/batch", {"batch": [{**item, "type": "track"}]}, workspace)
    ids = [e["messageId"] for e in sorted(queued(redis, runtime), key=lambda e: e["receivedAt"])]
    assert ids[0] == ids[1]  # the item's own context.ip won over the envelope's
    assert ids[2] != ids[0]  # without the context it is another call


# -- per-type rules -----------------------------------------------------------


@pytest.mark.parametrize("event", [None, "", "  ", 5])
def test_track_needs_a_non_empty_event(client, workspace, redis, event):
    body = {"userId": "u"} if event is None else {"userId": "u", "event": event}
    res = post(client, "/v1/track", body, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == ["event"]
    assert "event" in res.json["message"]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("path,field,value", [
    ("/v1/track", "properties", [1]),
    ("/v1/track", "properties", "x"),
    ("/v1/identify", "traits", "x"),
    ("/v1/group", "traits", 3),
    ("/v1/track", "context", "ctx"),
    ("/v1/track", "integrations", [True]),
])
def test_objects_must_be_objects(client, workspace, redis, path, field, value):
    res = post(client, path, {"userId": "u", "event": "E", "groupId": "g", field: value}, workspace)
    assert res.status_code == 400
    assert res.json["errors"] == {field: ["must be an object"]}
    assert_nothing_queued(redis)


@pytest.mark.parametrize("raw", ['"2"', "true", "null", "NaN", "Infinity", "-Infinity", "1e400", "[1]", "1e19"])
def test_delta_must_be_a_finite_number(client, workspace, redis, raw):
    body = '{"userId": "u", "event": "E", "properties": {"featureId": "f", "delta": ' + raw + "}}"
    res = post(client, "/v1/track", body, workspace)
    assert res.status_code == 400, res.json
    assert list(res.json["errors"]) == ["properties.delta"]
    assert "properties.delta must be a finite number" in res.json["message"]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("delta", [1, -3, 0.5, 0])
def test_valid_deltas(client, workspace, redis, runtime, delta):
    assert post(client, "/v1/track", {"userId": "u", "event": "E", "properties": {"delta": delta}},
                workspace).status_code == 200
    assert one_event(redis, runtime)["properties"]["delta"] == delta


@pytest.mark.parametrize("feature", ["", " ", 3, None, {"a": 1}])
def test_feature_id_must_be_a_non_empty_string(client, workspace, redis, feature):
    res = post(client, "/v1/track", {"userId": "u", "event": "E", "properties": {"featureId": feature}}, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == ["properties.featureId"]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("provider,trait,value,ok", [
    ("stripe", "billingUserId", "cus_ABC123", True),
    ("stripe", "billingUserId", "12345", False),
    ("stripe", "billingId", "sub_1", False),
    ("chargebee", "billingId", "AzZ-1.2_x", True),
    ("chargebee", "billingUserId", "has space", False),
    (None, "billingUserId", "cus_1", True),
    (None, "billingId", "x" * 60, False),
    (None, "billingUserId", 12345, False),
])
def test_billing_ids_follow_the_workspace_provider(client, new_workspace, redis, runtime, provider, trait, value, ok):
    ws = new_workspace("billing", provider)
    res = post(client, "/v1/identify", {"userId": "u", "traits": {trait: value}}, ws)
    if ok:
        assert res.status_code == 200, res.json
        assert one_event(redis, runtime)["traits"] == {trait: value}
    else:
        assert res.status_code == 400, res.json
        assert list(res.json["errors"]) == [f"traits.{trait}"]
        assert f"traits.{trait}" in res.json["message"]
        assert_nothing_queued(redis)


@pytest.mark.parametrize("body,field", [
    ({"userId": "u"}, "groupId"),
    ({"userId": "u", "groupId": None}, "groupId"),
    ({"userId": "u", "groupId": "undefined"}, "groupId"),
])
def test_group_needs_group_id(client, workspace, redis, body, field):
    res = post(client, "/v1/group", body, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == [field]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("body", [
    {"userId": "u"},
    {"userId": "u", "previousId": ""},
    {"userId": "u", "previous_id": "[object Object]"},
    {"userId": "u", "previousId": False},
])
def test_alias_needs_previous_id(client, workspace, redis, body):
    res = post(client, "/v1/alias", body, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == ["previousId"]
    assert_nothing_queued(redis)


def test_delete_needs_user_id(client, workspace, redis):
    res = post(client, "/segment", {"type": "delete", "anonymousId": "x"}, workspace)
    assert res.status_code == 400
    assert "userId" in res.json["errors"]
    assert_nothing_queued(redis)


def test_conflicting_type_in_body_is_400(client, workspace, redis, runtime):
    res = post(client, "/v1/track", {"type": "identify", "userId": "u", "event": "E"}, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == ["type"]
    assert_nothing_queued(redis)
    # The matching type is fine.
    assert post(client, "/v1/track", {"type": "track", "userId": "u", "event": "E"}, workspace).status_code == 200


# -- document-level checks ----------------------------------------------------------


@pytest.mark.parametrize("raw,code", [
    (b'{"userId": "u", "event": ', "invalid_json"),
    (b"{'userId': 'u'}", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"userId": "\xff\xfe", "event": "E"}', "invalid_json"),
    ('{"userId": "u", "event": "E"}'.encode("utf-16"), "invalid_json"),
    (b'"just a string"', "invalid_call"),
    (b'[{"userId": "u", "event": "E"}]', "invalid_call"),
    (b"42", "invalid_call"),
])
def test_malformed_bodies_are_400(client, workspace, redis, raw, code):
    res = post(client, "/v1/track", raw, workspace)
    assert res.status_code == 400, res.json
    assert res.json["code"] == code
    assert res.json["message"]
    assert_nothing_queued(redis)


@pytest.mark.parametrize("raw,field", [
    ('{"userId": "u", "event": "E", "properties": {"note": "a\\u0000b"}}', "properties.note"),
    ('{"userId": "u\\u0000", "event": "E"}', "userId"),
    ('{"userId": "u", "event": "E", "properties": {"k\\u0000": 1}}', "properties.k\\u0000"),
    ('{"userId": "u", "event": "E", "properties": {"list": ["ok", "\\u0000"]}}', "properties.list.1"),
    ('{"userId": "u", "event": "E", "properties": {"s": "\\ud800"}}', "properties.s"),
])
def test_nul_and_lone_surrogates_are_400_naming_the_field(client, workspace, redis, raw, field):
    res = post(client, "/v1/track", raw, workspace)
    assert res.status_code == 400, res.json
    assert list(res.json["errors"]) == [field]
    assert field in res.json["message"]
    assert_nothing_queued(redis)


def test_escaped_backslash_u0000_is_just_text(client, workspace, redis, runtime):
    res = post(client, "/v1/track", '{"userId": "u", "event": "E", "properties": {"s": "\\\\u0000"}}', workspace)
    assert res.status_code == 200, res.json
    assert one_event(redis, runtime)["properties"]["s"] == "\\u0000"


def test_nesting_limit(client, workspace, redis, runtime):
    limit = runtime.settings.max_depth
    ok = post(client, "/v1/track", {"userId": "u", "event": "E", "properties": deep(limit)}, workspace)
    assert ok.status_code == 200, ok.json
    redis.flushdb()
    res = post(client, "/v1/track", {"userId": "u", "event": "E", "properties": deep(limit + 1)}, workspace)
    assert res.status_code == 400
    (field,) = res.json["errors"]
    assert field.startswith("properties.a.a")
    assert "nested too deeply" in res.json["message"]
    assert_nothing_queued(redis)


def test_absurd_nesting_is_400_not_a_crash(client, workspace, redis):
    raw = '{"userId": "u", "event": "E", "properties": ' + "[" * 10000 + "]" * 10000 + "}"
    res = post(client, "/v1/track", raw, workspace)
    assert res.status_code == 400
    assert "nested too deeply" in res.json["message"]
    raw = '{"userId": "u", "event": "E", "properties": {"a": ' + "[" * 200000 + "]" * 200000 + "}}"
    res = post(client, "/v1/batch", '{"batch": [' + raw.replace('{"userId"', '{"type": "track", "userId"') + "]}",
               workspace)
    assert res.status_code in (400, 413)
    assert_nothing_queued(redis)


def test_unicode_is_preserved(client, workspace, redis, runtime):
    props = {"emoji": "🚀🎉 ok", "rtl": "مرحبا بالعالم", "hebrew": "שלום", "mixed": "a\u200fb", "cjk": "漢字"}
    post(client, "/v1/track", {"userId": "ユーザー-😀", "event": "Événement ✓", "properties": props}, workspace)
    # Libraries that escape everything (ensure_ascii) send surrogate pairs as \u escapes.
    raw = json.dumps({"userId": "u2", "event": "E", "properties": props}, ensure_ascii=True)
    assert "\\ud83d" in raw
    post(client, "/v1/track", raw, workspace)
    events = {e["userId"]: e for e in queued(redis, runtime)}
    assert events["ユーザー-😀"]["event"] == "Événement ✓"
    assert events["ユーザー-😀"]["properties"] == props
    assert events["u2"]["properties"] == props


# -- limits ---------------------------------------------------------------------------


def test_single_call_over_32kb_is_413(client, workspace, redis, runtime):
    limit = runtime.settings.max_call_bytes
    big = {"userId": "u", "event": "E", "properties": {"blob": "x" * limit}}
    res = post(client, "/v1/track", big, workspace)
    assert res.status_code == 413
    assert res.json["code"] == "payload_too_large"
    res = post(client, "/segment", {**big, "type": "track"}, workspace)
    assert res.status_code == 413
    # Just under the limit is fine.
    fits = {"userId": "u", "event": "E", "properties": {"blob": "x" * (limit - 200)}}
    assert post(client, "/v1/track", fits, workspace).status_code == 200
    redis.flushdb()
    # Compressed small, inflated too big: still 413.
    res = post(client, "/v1/track", gzip.compress(json.dumps(big).encode()), workspace,
               headers={"Content-Encoding": "gzip"})
    assert res.status_code == 413
    assert_nothing_queued(redis)


def test_batch_over_500kb_is_413(client, workspace, redis, runtime):
    item = {"type": "track", "userId": "u", "event": "E", "properties": {"blob": "y" * 20_000}}
    body = {"batch": [item] * (runtime.settings.max_batch_bytes // 20_000 + 1)}
    res = post(client, "/v1/batch", body, workspace)
    assert res.status_code == 413
    assert res.json["code"] == "payload_too_large"
    assert_nothing_queued(redis)


def test_segment_body_over_its_limit_is_413(client, workspace, redis, runtime):
    # /segment takes Actions batches (16 MB), not the 500 KB of /v1/batch.
    body = b"[" + b" " * runtime.settings.max_segment_bytes + b"]"
    res = client.post("/segment", data=body, headers={**workspace.headers, "Content-Type": "application/json"})
    assert res.status_code == 413
    assert "16,777,216 bytes" in res.json["message"]
    assert_nothing_queued(redis)


def test_batch_over_2500_items_is_413(client, workspace, redis, runtime):
    item = {"type": "track", "userId": "u", "event": "E"}
    res = post(client, "/v1/batch", {"batch": [item] * (runtime.settings.max_batch_items + 1)}, workspace)
    assert res.status_code == 413
    assert res.json["code"] == "payload_too_large"
    assert_nothing_queued(redis)
    res = post(client, "/v1/batch", {"batch": [{**item, "messageId": f"m{i}"} for i in range(2500)]}, workspace)
    assert res.status_code == 200
    assert res.json == {"success": True, "accepted": 2500}
    assert len(queued(redis, runtime)) == 2500


def test_oversized_item_in_a_batch_is_rejected_alone(client, workspace, redis, runtime):
    big = {"type": "track", "userId": "u", "event": "E", "messageId": "big",
           "properties": {"blob": "z" * runtime.settings.max_call_bytes}}
    small = {"type": "track", "userId": "u", "event": "E", "messageId": "small"}
    res = post(client, "/v1/batch", {"batch": [small, big]}, workspace)
    assert res.status_code == 200
    assert res.json["accepted"] == 1
    (rejected,) = res.json["rejected"]
    assert (rejected["index"], rejected["messageId"], rejected["code"]) == (1, "big", "payload_too_large")
    assert [e["messageId"] for e in queued(redis, runtime)] == ["small"]
    redis.flushdb()
    res = post(client, "/v1/batch", {"batch": [big]}, workspace)
    assert res.status_code == 413
    assert_nothing_queued(redis)


def test_content_length_over_limit_is_413_before_reading(client, workspace, redis, runtime):
    res = client.post("/v1/track", data=b"{}", headers=workspace.headers,
                      environ_overrides={"CONTENT_LENGTH": str(10**9)})
    assert res.status_code == 413
    assert_nothing_queued(redis)


# -- compression ----------------------------------------------------------------


def test_gzip_bodies(client, workspace, redis, runtime):
    body = {"batch": [{"type": "identify", "userId": "u", "messageId": "gz", "traits": {"name": "Zoë"}}]}
    res = post(client, "/v1/batch", gzip.compress(json.dumps(body).encode()), workspace,
               headers={"Content-Encoding": "gzip"})
    assert res.status_code == 200, res.json
    res = post(client, "/v1/identify", zlib.compress(json.dumps(body["batch"][0]).encode()), workspace,
               headers={"Content-Encoding": "deflate"})
    assert res.status_code == 200, res.json
    events = queued(redis, runtime)
    assert [e["traits"]["name"] for e in events] == ["Zoë", "Zoë"]


@pytest.mark.parametrize("raw", [
    b"not gzip at all",
    gzip.compress(b'{"userId": "u", "event": "E"}')[:-12],  # truncated
    gzip.compress(b'{"userId": "u", "event": "E"}')[:10] + b"\x00" * 20,
])
def test_corrupt_gzip_is_400(client, workspace, redis, raw):
    res = post(client, "/v1/track", raw, workspace, headers={"Content-Encoding": "gzip"})
    assert res.status_code == 400
    assert res.json["code"] == "invalid_encoding"
    assert_nothing_queued(redis)


def test_gzip_bomb_is_413(client, workspace, redis):
    bomb = gzip.compress(b'{"batch": [' + b" " * (50 * 1024 * 1024) + b"]}")
    assert len(bomb) < 100_000
    res = post(client, "/v1/batch", bomb, workspace, headers={"Content-Encoding": "gzip"})
    assert res.status_code == 413
    assert_nothing_queued(redis)


def test_unknown_content_encoding_is_415(client, workspace, redis):
    res = post(client, "/v1/track", b"{}", workspace, headers={"Content-Encoding": "br"})
    assert res.status_code == 415
    assert_nothing_queued(redis)


# -- batches and /segment ---------------------------------------------------------------


def test_partial_batch_accepts_the_valid_items(client, workspace, redis, runtime):
    batch = [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "ok-1"},
        {"type": "track", "userId": "u1", "event": "E", "messageId": "bad-delta", "properties": {"delta": "3"}},
        {"type": "identify", "anonymousId": "a", "messageId": "anon"},
        {"type": "track", "userId": "u2", "event": "E", "messageId": "nul", "properties": {"x": "\u0000"}},
        {"type": "screenview", "userId": "u1", "messageId": "weird"},
        "not an object",
        {"type": "page", "userId": "u3", "name": "Home", "messageId": "ok-2"},
    ]
    res = post(client, "/v1/batch", {"batch": batch, "sentAt": "2024-05-01T12:00:00Z"}, workspace)
    assert res.status_code == 200, res.json
    body = res.json
    assert body["success"] is True and body["accepted"] == 2
    summary = [(r["index"], r["messageId"], r["code"], sorted(r["errors"])) for r in body["rejected"]]
    assert summary == [
        (1, "bad-delta", "invalid_call", ["properties.delta"]),
        (2, "anon", "invalid_call", ["userId"]),
        (3, "nul", "invalid_call", ["properties.x"]),
        (4, "weird", "unsupported_type", ["type"]),
        (5, None, "invalid_call", ["_call"]),
    ]
    assert sorted(e["messageId"] for e in queued(redis, runtime)) == ["ok-1", "ok-2"]


def test_batch_with_none_valid_is_400(client, workspace, redis):
    batch = [{"type": "track", "userId": "u"}, {"type": "identify", "userId": "null"}]
    res = post(client, "/v1/batch", {"batch": batch}, workspace)
    assert res.status_code == 400
    assert res.json["code"] == "invalid_batch"
    assert res.json["errors"] == {"batch.0.event": ["is required"], "batch.1.userId": [
        "must be a real id, not the placeholder 'null'"]}
    assert_nothing_queued(redis)


@pytest.mark.parametrize("body,field", [
    ({"batch": "nope"}, "batch"),
    ({"events": []}, "batch"),
    ({"batch": []}, "batch"),
    ({"batch": [{"type": "track", "userId": "u", "event": "E"}], "context": "x"}, "context"),
    ({"batch": [{"type": "track", "userId": "u", "event": "E"}], "context": {"a": "\u0000"}}, "context.a"),
    ([{"type": "track", "userId": "u", "event": "E"}], "_call"),
])
def test_bad_batch_envelopes_are_400(client, workspace, redis, body, field):
    res = post(client, "/v1/batch", body, workspace)
    assert res.status_code == 400, res.json
    assert field in res.json["errors"]
    assert_nothing_queued(redis)


def test_segment_endpoint_single_and_array(client, workspace, redis, runtime):
    res = post(client, "/segment", {"type": "track", "userId": "u", "event": "E", "messageId": "s1"}, workspace)
    assert res.json == {"success": True, "accepted": 1}
    res = post(client, "/segment", [
        {"type": "identify", "userId": "u", "messageId": "s2", "traits": {"email": "u@example.com"}},
        {"type": "Page", "userId": "u", "messageId": "s3", "name": "Home"},
        {"type": "unknown", "userId": "u", "messageId": "s4"},
    ], workspace)
    assert res.status_code == 200
    assert res.json["accepted"] == 2
    assert [(r["index"], r["code"]) for r in res.json["rejected"]] == [(2, "unsupported_type")]
    events = {e["messageId"]: e["type"] for e in queued(redis, runtime)}
    assert events == {"s1": "track", "s2": "identify", "s3": "page"}


def test_unsupported_type_is_501(client, workspace, redis):
    res = post(client, "/segment", {"type": "screenview", "userId": "u"}, workspace)
    assert res.status_code == 501
    assert res.json["code"] == "unsupported_type"
    assert "screenview" in res.json["message"]
    res = post(client, "/segment", {"userId": "u", "event": "E"}, workspace)
    assert res.status_code == 400
    assert list(res.json["errors"]) == ["type"]
    res = post(client, "/v1/screenview", {"userId": "u"}, workspace)
    assert res.status_code == 404
    assert_nothing_queued(redis)


def test_accepted_calls_wake_a_drain_and_count_in_stats(client, workspace, redis, runtime):
    post(client, "/v1/batch", {"batch": [{"type": "track", "userId": f"u{i}", "event": "E"} for i in range(20)]},
         workspace)
    counters = spool.workspace_counters(redis, workspace.id)
    assert counters["received"] == 20 and counters["pending"] == 20
    partitions = {spool.partition_of(workspace.id, f"u{i}", runtime.settings.partitions) for i in range(20)}
    assert all(redis.exists(spool.wake_key(p)) for p in partitions)
    # One drain job per group of woken partitions, covering each exactly once.
    covered = [p for job_id in runtime.queue.get_job_ids() for p in spool.partitions_of_job(job_id)]
    assert sorted(covered) == sorted(partitions)
    assert runtime.queue.count == -(-len(partitions) // runtime.settings.drain_group)


# -- Redis down ---------------------------------------------------------------------


@pytest.fixture
def redisless_client(settings, redis):
    broken = create_app(config.load(environ={}, database_url=settings.database_url, redis_url="redis://127.0.0.1:1/0",
                                    data_dir=settings.data_dir, secret_key="x", key_cache_ttl=0.0))
    broken.config.update(TESTING=True)
    return broken.test_client()


def test_redis_unreachable_is_503_and_nothing_is_queued(redisless_client, workspace, redis):
    res = redisless_client.post("/v1/track", json={"userId": "u", "event": "E"}, headers=workspace.headers)
    assert res.status_code == 503
    assert res.json["code"] == "unavailable"
    res = redisless_client.post("/v1/batch", json={"batch": [{"type": "track", "userId": "u", "event": "E"}]},
                                headers=workspace.headers)
    assert res.status_code == 503
    assert_nothing_queued(redis)


# -- the official Segment library ------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_segment_analytics_python_client(live_server, workspace, redis, runtime, compress):
    import segment.analytics as analytics
    from segment.analytics.request import APIError

    client = analytics.Client(write_key=workspace.ingest_key, host=live_server, sync_mode=True, gzip=compress,
                              max_retries=0)
    _, identify = client.identify("user-7", {"email": "seven@example.com", "billingUserId": "cus_777"})
    _, track = client.track("user-7", "Message Sent", {"featureId": "messages", "delta": 3},
                            timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    _, page = client.page("user-7", name="Pricing", properties={"path": "/p"})
    _, group = client.group("user-7", 99, {"name": "Acme"})
    _, alias = client.alias("old-7", "user-7")
    client.flush()
    events = {e["messageId"]: strip_received(e) for e in queued(redis, runtime)}
    assert set(events) == {m["messageId"] for m in (identify, track, page, group, alias)}
    tracked = events[track["messageId"]]
    assert tracked.pop("context")["library"]["name"] == "analytics-python"
    assert datetime.fromisoformat(tracked.pop("timestamps")["sentAt"]).tzinfo is not None
    assert tracked == {
        "ws": workspace.id, "type": "track", "messageId": track["messageId"], "userId": "user-7",
        "timestamp": TS, "event": "Message Sent", "properties": {"featureId": "messages", "delta": 3},
    }
    assert events[identify["messageId"]]["traits"] == {"email": "seven@example.com", "billingUserId": "cus_777"}
    assert events[page["messageId"]]["name"] == "Pricing"
    assert events[group["messageId"]]["groupId"] == "99"
    assert events[alias["messageId"]]["previousId"] == "old-7"
    # Anonymous calls are refused with a non-retryable 400.
    with pytest.raises(APIError) as info:
        client.track(anonymous_id="anon", event="E")
    assert info.value.status == 400
    assert len(queued(redis, runtime)) == 5


def test_chunked_bodies_without_content_length(live_server, workspace, redis, runtime):
    import requests

    def chunks(data: bytes, size: int = 1000):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    call = json.dumps({"userId": "u", "event": "E", "messageId": "chunked"}).encode()
    res = requests.post(f"{live_server}/v1/track", data=chunks(call), headers=workspace.headers, timeout=10)
    assert res.status_code == 200, res.text
    assert [e["messageId"] for e in queued(redis, runtime)] == ["chunked"]
    big = json.dumps({"userId": "u", "event": "E", "properties": {"b": "x" * 100_000}}).encode()
    res = requests.post(f"{live_server}/v1/track", data=chunks(big), headers=workspace.headers, timeout=10)
    assert res.status_code == 413
    assert len(queued(redis, runtime)) == 1

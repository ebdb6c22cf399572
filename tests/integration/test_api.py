"""The admin JSON API under /api/v1 (SPEC §8, §10): auth, isolation, every endpoint."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from openapi_spec_validator import validate
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select

from kana.api.common import encode_cursor
from kana.db import SessionLocal
from kana.domain import flags, identity, ledger, totals
from kana.ingest import spool
from kana.models import ApiKey, Audit, DeadLetter, Event, Usage, User
from tests.helpers import add_feature as make_feature
from tests.helpers import count, make_user

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def add_usage(ws_id: int, kana_id: int, delta, at: datetime, feature_id: str = "messages", user_id: str = "u") -> int:
    """One mapped event and its ledger row, as the pipeline would store them."""
    with SessionLocal.begin() as s:
        event = Event(
            workspace_id=ws_id, message_id=f"m-{uuid.uuid4().hex}", type="track", name="Used", user_id=user_id,
            kana_id=kana_id, timestamp=at, received_at=at, properties={"featureId": feature_id},
            status="mapped", feature_id=feature_id,
        )
        s.add(event)
        s.add(Usage(workspace_id=ws_id, kana_id=kana_id, feature_id=feature_id, delta=Decimal(str(delta)), at=at,
                    event=event))
        totals.add(s, ws_id, [(kana_id, feature_id, at, Decimal(str(delta)))])
        s.flush()
        return event.id


def add_event(ws_id: int, kana_id: int | None, status: str, user_id: str = "u", kind: str = "track") -> int:
    with SessionLocal.begin() as s:
        event = Event(
            workspace_id=ws_id, message_id=f"m-{uuid.uuid4().hex}", type=kind, name="Something", user_id=user_id,
            kana_id=kana_id, timestamp=T0, received_at=T0, properties={}, status=status,
            reason="no rule matched" if status == "unmapped" else None,
        )
        s.add(event)
        s.flush()
        return event.id


def add_dead_letter(ws_id: int, user_id: str = "dl-user", message_id: str | None = None) -> int:
    message_id = message_id or f"dead-{uuid.uuid4().hex}"
    payload = {"ws": ws_id, "type": "track", "userId": user_id, "event": "Broke", "messageId": message_id,
               "properties": {}, "receivedAt": T0.isoformat(), "timestamp": T0.isoformat()}
    with SessionLocal.begin() as s:
        row = DeadLetter(workspace_id=ws_id, message_id=message_id, user_id=user_id, payload=payload,
                         error="ValueError: boom", attempts=2)
        s.add(row)
        s.flush()
        return row.id


def get(client, ws, url, **kwargs):
    return client.get(url, headers=ws.headers, **kwargs)


def post(client, ws, url, body=None, **kwargs):
    return client.post(url, json=body, headers=ws.headers, **kwargs)


def assert_invalid(resp, field: str) -> None:
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()
    assert body["code"] == "invalid_request"
    assert field in body["errors"], body
    assert field in body["message"], body


API_BLUEPRINTS = ("api.",)


def api_rules(app) -> list:
    return [r for r in app.url_map.iter_rules() if r.endpoint.startswith(API_BLUEPRINTS)]


def openapi_path(rule) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)


def sample_url(rule) -> str:
    return re.sub(r"<(?:[^:<>]+:)?[^<>]+>", lambda m: "1" if m.group(0).startswith(("<int:", "<id:")) else "x",
                  rule.rule)


def test_every_endpoint_needs_an_admin_key(app, client, workspace):
    rules = [r for r in api_rules(app) if r.endpoint != "api.openapi"]
    assert len(rules) >= 20
    for rule in rules:
        url = sample_url(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            call = getattr(client, method.lower())
            resp = call(url, json={})
            assert resp.status_code == 401, (method, url, resp.status_code)
            assert resp.get_json()["code"] == "unauthorized"
            resp = call(url, json={}, headers={"Authorization": "Bearer kana_a_nope"})
            assert resp.status_code == 401, (method, url)
            resp = call(url, json={}, headers={"Authorization": f"Bearer {workspace.ingest_key}"})
            assert resp.status_code == 403, (method, url)
            assert resp.get_json()["code"] == "forbidden"


def test_admin_key_in_any_receiver_form(client, workspace):
    import base64

    basic = base64.b64encode(f"{workspace.key}:".encode()).decode()
    assert client.get("/api/v1/features", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert client.get("/api/v1/features", headers={"Authorization": workspace.key}).status_code == 200
    # writeKey in a JSON body authenticates too, and is not taken for an unknown field.
    resp = client.post("/api/v1/features", json={"id": "wk", "writeKey": workspace.key})
    assert resp.status_code == 201, resp.get_json()


def test_revoked_key_is_refused(client, workspace):
    created = post(client, workspace, "/api/v1/keys", {"scope": "admin", "name": "temp"})
    assert created.status_code == 201
    temp = {"Authorization": f"Bearer {created.get_json()['api_key']}"}
    assert client.get("/api/v1/stats", headers=temp).status_code == 200
    assert client.delete(f"/api/v1/keys/{created.get_json()['id']}", headers=workspace.headers).status_code == 204
    assert client.get("/api/v1/stats", headers=temp).status_code == 401


def test_openapi_document_is_valid_and_complete(app, client):
    resp = client.get("/api/v1/openapi.json")  # no key needed
    assert resp.status_code == 200
    doc = resp.get_json()
    validate(doc)  # openapi-spec-validator: a structurally valid OpenAPI 3 document
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    for path, item in doc["paths"].items():
        assert path.startswith("/api/v1/")
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (path, method)
            assert op.get("operationId")
    # Every route of the blueprint, every method, is documented...
    documented = {(p, m.upper()) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    routed = {
        (openapi_path(r), m) for r in api_rules(app) for m in r.methods - {"HEAD", "OPTIONS"}
    }
    assert routed == documented
    # ...with its path parameters and its request schema.
    assert {p["name"] for p in doc["paths"]["/api/v1/users/{kana_id}"]["parameters"]} == {"kana_id"}
    usage_params = {p["name"] for p in doc["paths"]["/api/v1/users/{kana_id}/usage"]["get"]["parameters"]}
    assert {"feature", "from", "to", "window"} <= usage_params
    body = doc["paths"]["/api/v1/users/merge"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = body["$ref"].rsplit("/", 1)[-1]
    assert "kana_ids" in doc["components"]["schemas"][ref]["properties"]


def test_create_and_get_user(client, workspace):
    resp = post(client, workspace, "/api/v1/users",
                {"user_id": "u1", "email": "Ada@Example.com", "name": "Ada", "billing_id": "cus_123"})
    assert resp.status_code == 201, resp.get_json()
    user = resp.get_json()
    assert user["user_id"] == "u1" and user["email"] == "Ada@Example.com" and user["source"] == "api"
    assert user["billing_id"] == "cus_123" and user["billing_provider"] == "stripe"
    assert user["aliases"] == []
    for field in ("kana_id", "name", "created_at", "updated_at", "group_id", "group_name"):
        assert field in user
    datetime.fromisoformat(user["created_at"])
    assert resp.headers["Location"].endswith(f"/api/v1/users/{user['kana_id']}")

    fetched = get(client, workspace, f"/api/v1/users/{user['kana_id']}").get_json()
    assert fetched == user

    # An unclaimed user: no user_id at all.
    unclaimed = post(client, workspace, "/api/v1/users", {"email": "stripe@example.com"})
    assert unclaimed.status_code == 201 and unclaimed.get_json()["user_id"] is None

    assert get(client, workspace, "/api/v1/users/999999999").status_code == 404
    # Past BIGINT: still a plain 404, not a database overflow.
    huge = 2**70
    assert get(client, workspace, f"/api/v1/users/{huge}").status_code == 404
    assert get(client, workspace, f"/api/v1/users/{huge}/usage?feature=x").status_code == 404
    assert client.delete(f"/api/v1/users/{huge}", headers=workspace.headers).status_code == 404
    assert client.delete(f"/api/v1/keys/{huge}", headers=workspace.headers).status_code == 404
    assert post(client, workspace, f"/api/v1/events/failed/{huge}/retry").status_code == 404
    assert_invalid(post(client, workspace, "/api/v1/users/merge", {"kana_ids": [user["kana_id"], huge]}), "kana_ids")


def test_create_user_conflicts_and_validation(client, workspace):
    assert post(client, workspace, "/api/v1/users", {"user_id": "taken"}).status_code == 201
    resp = post(client, workspace, "/api/v1/users", {"user_id": "taken"})
    assert resp.status_code == 409 and resp.get_json()["code"] == "conflict"
    # An alias is taken as well.
    a, b = make_user(workspace.id, "old-a"), make_user(workspace.id, "old-b")
    assert post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a, b]}).status_code == 200
    assert post(client, workspace, "/api/v1/users", {"user_id": "old-b"}).status_code == 409

    assert_invalid(post(client, workspace, "/api/v1/users", {"email": "not-an-email"}), "email")
    assert_invalid(post(client, workspace, "/api/v1/users", {"user_id": 12}), "user_id")
    assert_invalid(post(client, workspace, "/api/v1/users", {"user_id": "undefined"}), "user_id")
    assert_invalid(post(client, workspace, "/api/v1/users", {"user_id": "   "}), "user_id")
    assert_invalid(post(client, workspace, "/api/v1/users", {"name": "a\u0000b"}), "name")
    assert_invalid(post(client, workspace, "/api/v1/users", {"user_id": "x", "plan": "pro"}), "plan")
    assert_invalid(post(client, workspace, "/api/v1/users", {"billing_id": "has spaces!"}), "billing_id")
    resp = client.post("/api/v1/users", data="[1, 2]", headers={**workspace.headers,
                                                               "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_request"


def test_billing_id_checked_against_workspace_provider(client, workspace):
    assert client.patch("/api/v1/workspace", json={"billing_provider": "stripe"},
                        headers=workspace.headers).status_code == 200
    assert_invalid(post(client, workspace, "/api/v1/users", {"billing_id": "cb-42"}), "billing_id")
    assert post(client, workspace, "/api/v1/users", {"billing_id": "cus_ok"}).status_code == 201
    client.patch("/api/v1/workspace", json={"billing_provider": "chargebee"}, headers=workspace.headers)
    resp = post(client, workspace, "/api/v1/users", {"billing_id": "cb-42"})
    assert resp.status_code == 201 and resp.get_json()["billing_provider"] == "chargebee"


def test_list_users_paginates_with_cursors(client, workspace, new_workspace):
    ids = [make_user(workspace.id, f"p{i}") for i in range(7)]
    make_user(new_workspace("other").id, "p-other")
    seen, cursor, pages = [], None, 0
    while True:
        url = "/api/v1/users?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = get(client, workspace, url).get_json()
        seen += [u["kana_id"] for u in body["users"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids) and pages == 3

    assert_invalid(get(client, workspace, "/api/v1/users?cursor=garbage!"), "cursor")
    assert_invalid(get(client, workspace, f"/api/v1/users?cursor={encode_cursor(2**70)}"), "cursor")
    assert_invalid(get(client, workspace, "/api/v1/users?limit=0"), "limit")
    assert_invalid(get(client, workspace, "/api/v1/users?limit=abc"), "limit")
    assert_invalid(get(client, workspace, "/api/v1/users?emial=x@y.z"), "emial")
    assert_invalid(get(client, workspace, "/api/v1/users?flag=vip"), "flag")


def test_list_users_filters(client, workspace):
    ada = make_user(workspace.id, "ada", email="Ada@Example.com", name="Ada Lovelace", billing_id="cus_1")
    twin = make_user(workspace.id, "twin", email="ada@example.COM")
    solo = make_user(workspace.id, "solo", email="solo@example.com", billing_id="cus_2")
    nobody = make_user(workspace.id, None, name="Unclaimed")

    def kana_ids(query: str) -> list[int]:
        resp = get(client, workspace, f"/api/v1/users?{query}")
        assert resp.status_code == 200, resp.get_json()
        return [u["kana_id"] for u in resp.get_json()["users"]]

    assert kana_ids("user_id=ada") == [ada]
    assert kana_ids("user_id=ADA") == []  # user ids are case-sensitive
    assert kana_ids("user_id=missing") == []
    assert kana_ids("email=ADA@example.com") == [ada, twin]
    assert kana_ids("q=lovelace") == [ada]
    assert kana_ids("q=SOLO") == [solo]
    assert kana_ids("q=100%25") == []  # LIKE wildcards are literal
    # Flag filters read the refreshed flag set (SPEC §6), the one GET /flags counts.
    assert kana_ids("flag=missing_billing_id") == []
    with SessionLocal.begin() as s:
        flags.refresh(s, workspace.id)
    assert kana_ids("flag=missing_billing_id") == [twin, nobody]
    assert kana_ids("flag=duplicate_email") == [ada, twin]
    assert kana_ids("flag=duplicate_email&q=twin") == [twin]
    assert kana_ids("flag=any") == [ada, twin, nobody]
    late = make_user(workspace.id, "late")
    assert late not in kana_ids("flag=missing_billing_id")  # until the next refresh
    with SessionLocal.begin() as s:
        flags.refresh(s, workspace.id)
    assert kana_ids("flag=missing_billing_id") == [twin, nobody, late]

    # user_id also finds the user it is an alias of.
    other = make_user(workspace.id, "ada-old")
    post(client, workspace, "/api/v1/users/merge", {"kana_ids": [ada, other]})
    assert kana_ids("user_id=ada-old") == [ada]


def test_merge_users(client, workspace):
    make_feature(workspace.id)
    first = make_user(workspace.id, "first", email="f@example.com")
    second = make_user(workspace.id, "second", name="Second", billing_id="cus_9")
    third = make_user(workspace.id, None, email="third@example.com")
    add_usage(workspace.id, second, 5, T0)
    add_event(workspace.id, third, "unmapped")

    resp = post(client, workspace, "/api/v1/users/merge", {"kana_ids": [third, second, first, first]})
    assert resp.status_code == 200, resp.get_json()
    survivor = resp.get_json()
    assert survivor["kana_id"] == first  # created first
    assert survivor["user_id"] == "first" and survivor["email"] == "f@example.com"
    assert survivor["name"] == "Second" and survivor["billing_id"] == "cus_9"  # blanks filled
    assert survivor["aliases"] == ["second"]
    assert count(User, workspace.id) == 1
    assert count(Usage, workspace.id, Usage.kana_id == first) == 1
    assert count(Event, workspace.id, Event.kana_id == first) == 2
    with SessionLocal() as s:
        audit = s.scalars(select(Audit).where(Audit.workspace_id == workspace.id)).one()
    assert audit.action == "merge" and audit.trigger == "api" and audit.actor.startswith("api-key:")
    assert sorted(audit.kana_ids) == sorted([first, second, third])


def test_merge_validation(client, workspace):
    a = make_user(workspace.id, "a")
    assert_invalid(post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a]}), "kana_ids")
    assert_invalid(post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a, a]}), "kana_ids")
    assert_invalid(post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a, "b"]}), "kana_ids")
    assert_invalid(post(client, workspace, "/api/v1/users/merge", {}), "kana_ids")
    resp = post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a, 987654321]})
    assert resp.status_code == 404 and "987654321" in resp.get_json()["message"]
    assert count(User, workspace.id) == 1


def test_delete_user(client, workspace):
    make_feature(workspace.id)
    keep = make_user(workspace.id, "keep")
    gone = make_user(workspace.id, "gone")
    add_usage(workspace.id, gone, 3, T0)
    add_usage(workspace.id, keep, 1, T0)
    resp = client.delete(f"/api/v1/users/{gone}", headers=workspace.headers)
    assert resp.status_code == 204 and resp.data == b""
    assert get(client, workspace, f"/api/v1/users/{gone}").status_code == 404
    assert client.delete(f"/api/v1/users/{gone}", headers=workspace.headers).status_code == 404
    assert count(Usage, workspace.id) == 1 and count(Event, workspace.id) == 1
    audit = get(client, workspace, "/api/v1/audit").get_json()["audit"]
    assert audit[0]["action"] == "delete" and audit[0]["kana_ids"] == [gone] and audit[0]["trigger"] == "api"


def test_workspace_isolation(client, workspace, new_workspace):
    other = new_workspace("B")
    make_feature(workspace.id, "secret-feature")
    a1 = make_user(workspace.id, "a1", email="a1@example.com")
    a2 = make_user(workspace.id, "a2")
    add_usage(workspace.id, a1, 7, T0, feature_id="secret-feature")
    add_event(workspace.id, a1, "unmapped", user_id="a1")
    dead = add_dead_letter(workspace.id, "a1")
    b1 = make_user(other.id, "b1")

    # B's key sees none of A's users...
    assert get(client, other, f"/api/v1/users/{a1}").status_code == 404
    assert get(client, other, "/api/v1/users?user_id=a1").get_json()["users"] == []
    assert get(client, other, "/api/v1/users?email=a1@example.com").get_json()["users"] == []
    assert [u["kana_id"] for u in get(client, other, "/api/v1/users").get_json()["users"]] == [b1]
    # ...cannot merge or delete them...
    assert post(client, other, "/api/v1/users/merge", {"kana_ids": [a1, a2]}).status_code == 404
    assert post(client, other, "/api/v1/users/merge", {"kana_ids": [b1, a1]}).status_code == 404
    assert client.delete(f"/api/v1/users/{a1}", headers=other.headers).status_code == 404
    assert count(User, workspace.id) == 2 and count(User, other.id) == 1
    # ...nor their usage, features, events, dead letters or audit.
    assert get(client, other, f"/api/v1/users/{a1}/usage?feature=secret-feature").status_code == 404
    assert get(client, other, "/api/v1/usage?feature=secret-feature").status_code == 404
    assert get(client, other, "/api/v1/features/secret-feature").status_code == 404
    assert get(client, other, "/api/v1/features").get_json()["features"] == []
    assert client.patch("/api/v1/features/secret-feature", json={"name": "x"},
                        headers=other.headers).status_code == 404
    assert client.delete("/api/v1/features/secret-feature", headers=other.headers).status_code == 404
    assert get(client, other, "/api/v1/events").get_json()["events"] == []
    assert get(client, other, "/api/v1/events?user_id=a1").get_json()["events"] == []
    assert get(client, other, "/api/v1/events?status=failed").get_json()["events"] == []
    assert post(client, other, f"/api/v1/events/failed/{dead}/retry").status_code == 404
    assert count(DeadLetter, workspace.id) == 1
    stats = get(client, other, "/api/v1/stats").get_json()
    assert stats["events_processed"] == 0 and stats["events_failed"] == 0
    post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a1, a2]})
    assert get(client, other, "/api/v1/audit").get_json()["audit"] == []
    # A feature id is per workspace: B may have its own.
    assert post(client, other, "/api/v1/features", {"id": "secret-feature"}).status_code == 201
    # Keys too.
    with SessionLocal() as s:
        a_key = s.scalars(select(ApiKey.id).where(ApiKey.workspace_id == workspace.id)).first()
    assert client.delete(f"/api/v1/keys/{a_key}", headers=other.headers).status_code == 404
    assert all(k["id"] != a_key for k in get(client, other, "/api/v1/keys").get_json()["keys"])
    assert get(client, other, "/api/v1/workspace").get_json()["id"] == other.id


def test_user_usage_total_and_series(client, workspace):
    make_feature(workspace.id)
    make_feature(workspace.id, "seats")
    user = make_user(workspace.id, "u")
    other = make_user(workspace.id, "v")
    add_usage(workspace.id, user, 2, T0 + timedelta(hours=1))
    add_usage(workspace.id, user, 3, T0 + timedelta(hours=1, minutes=59))
    add_usage(workspace.id, user, 0.5, T0 + timedelta(days=2, hours=5))
    add_usage(workspace.id, user, -1, T0 + timedelta(days=40))
    add_usage(workspace.id, user, 100, T0, feature_id="seats")
    add_usage(workspace.id, other, 1000, T0)

    url = f"/api/v1/users/{user}/usage"
    body = get(client, workspace, f"{url}?feature=messages").get_json()
    assert body["feature"] == "messages" and body["total"] == 4.5 and "series" not in body

    frm, to = T0.isoformat(), (T0 + timedelta(days=4)).isoformat()
    query = {"feature": "messages", "from": frm, "to": to, "window": "day"}
    body = get(client, workspace, url, query_string=query).get_json()
    assert body["total"] == 5.5
    assert body["series"] == [
        {"start": "2024-03-01T00:00:00+00:00", "total": 5},
        {"start": "2024-03-02T00:00:00+00:00", "total": 0},
        {"start": "2024-03-03T00:00:00+00:00", "total": 0.5},
        {"start": "2024-03-04T00:00:00+00:00", "total": 0},
    ]
    query = {"feature": "messages", "from": "2024-03-01T00:30:00Z", "to": "2024-03-01T03:00:00Z", "window": "hour"}
    body = get(client, workspace, url, query_string=query).get_json()
    assert [p["total"] for p in body["series"]] == [0, 5, 0]
    assert body["series"][0]["start"] == "2024-03-01T00:00:00+00:00"
    assert body["total"] == 5
    # Month windows, from the first usage when 'from' is open: adds up to the total.
    body = get(client, workspace, url, query_string={"feature": "messages", "window": "month"}).get_json()
    assert body["series"][:2] == [
        {"start": "2024-03-01T00:00:00+00:00", "total": 5.5},
        {"start": "2024-04-01T00:00:00+00:00", "total": -1},
    ]
    assert sum(p["total"] for p in body["series"]) == body["total"] == 4.5
    # A date alone is midnight UTC.
    body = get(client, workspace, url, query_string={"feature": "messages", "from": "2024-03-03"}).get_json()
    assert body["total"] == -0.5


def test_usage_validation(client, workspace):
    make_feature(workspace.id)
    user = make_user(workspace.id, "u")
    url = f"/api/v1/users/{user}/usage"
    assert_invalid(get(client, workspace, url), "feature")
    assert_invalid(get(client, workspace, url, query_string={"feature": "messages", "from": "yesterday"}), "from")
    assert_invalid(get(client, workspace, url, query_string={"feature": "messages", "to": "2024-13-01"}), "to")
    assert_invalid(get(client, workspace, url, query_string={"feature": "messages", "window": "week"}), "window")
    assert_invalid(get(client, workspace, url, query_string={
        "feature": "messages", "from": "2024-02-01", "to": "2024-01-01"}), "to")
    assert_invalid(get(client, workspace, url, query_string={
        "feature": "messages", "from": "2000-01-01", "to": "2024-01-01", "window": "hour"}), "window")
    resp = get(client, workspace, url, query_string={"feature": "nope"})
    assert resp.status_code == 404 and "nope" in resp.get_json()["message"]
    assert get(client, workspace, "/api/v1/users/424242/usage?feature=messages").status_code == 404


def test_top_usage(client, workspace):
    make_feature(workspace.id)
    a, b, c = make_user(workspace.id, "a"), make_user(workspace.id, "b"), make_user(workspace.id, "c")
    add_usage(workspace.id, a, 1, T0)
    add_usage(workspace.id, b, 10, T0)
    add_usage(workspace.id, b, 0.25, T0 + timedelta(days=1))
    add_usage(workspace.id, c, 5, T0 + timedelta(days=1))
    body = get(client, workspace, "/api/v1/usage?feature=messages&limit=2").get_json()
    assert body["feature"] == "messages" and body["total"] == 16.25
    assert body["users"] == [{"kana_id": b, "user_id": "b", "total": 10.25}, {"kana_id": c, "user_id": "c", "total": 5}]
    body = get(client, workspace, "/api/v1/usage", query_string={
        "feature": "messages", "from": (T0 + timedelta(days=1)).isoformat()}).get_json()
    assert body["total"] == 5.25 and [u["kana_id"] for u in body["users"]] == [c, b]
    assert_invalid(get(client, workspace, "/api/v1/usage"), "feature")
    assert_invalid(get(client, workspace, "/api/v1/usage?feature=messages&limit=100000"), "limit")


def test_ledger_sums_exactly(session, workspace):
    make_feature(workspace.id)
    user = make_user(workspace.id, "u")
    for _ in range(3):
        add_usage(workspace.id, user, 0.1, T0)
    add_usage(workspace.id, user, 0.2, T0)
    assert ledger.total(session, workspace.id, user, "messages") == Decimal("0.5")
    assert ledger.total(session, workspace.id, user, "messages", end=T0) == 0
    points = ledger.series(session, workspace.id, user, "messages", T0, T0 + timedelta(days=2), "day")
    assert [p["total"] for p in points] == [Decimal("0.5"), 0]


def test_feature_crud(client, workspace):
    resp = post(client, workspace, "/api/v1/features", {"id": "api-calls", "name": "API calls", "type": "consumable"})
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["id"] == "api-calls" and resp.get_json()["type"] == "consumable"
    sso = post(client, workspace, "/api/v1/features", {"id": "sso", "name": "SSO", "type": "binary"})
    assert sso.status_code == 201
    dup = post(client, workspace, "/api/v1/features", {"id": "sso", "name": "again", "type": "binary"})
    assert dup.status_code == 409 and "id" in dup.get_json()["errors"]

    listed = get(client, workspace, "/api/v1/features").get_json()["features"]
    assert [f["id"] for f in listed] == ["api-calls", "sso"]
    assert get(client, workspace, "/api/v1/features/sso").get_json()["name"] == "SSO"

    resp = client.patch("/api/v1/features/sso", json={"name": "Single sign-on"}, headers=workspace.headers)
    assert resp.status_code == 200 and resp.get_json()["name"] == "Single sign-on"
    assert resp.get_json()["type"] == "binary"
    assert_invalid(client.patch("/api/v1/features/sso", json={"type": "metered"}, headers=workspace.headers), "type")
    assert_invalid(client.patch("/api/v1/features/sso", json={"id": "x"}, headers=workspace.headers), "id")
    assert client.patch("/api/v1/features/none", json={"name": "x"}, headers=workspace.headers).status_code == 404

    assert client.delete("/api/v1/features/sso", headers=workspace.headers).status_code == 204
    assert get(client, workspace, "/api/v1/features/sso").status_code == 404
    assert client.delete("/api/v1/features/sso", headers=workspace.headers).status_code == 404
    assert get(client, workspace, "/api/v1/features/bad%00id").status_code == 404
    assert get(client, workspace, "/api/v1/features/" + "x" * 300).status_code == 404


def test_feature_validation(client, workspace):
    for bad in ("Upper", "-lead", "has space", "x" * 101, ""):
        assert_invalid(post(client, workspace, "/api/v1/features", {"id": bad, "name": "n"}), "id")
    assert_invalid(post(client, workspace, "/api/v1/features", {"name": "n"}), "id")
    assert_invalid(post(client, workspace, "/api/v1/features", {"id": "ok", "type": "metered"}), "type")
    assert_invalid(post(client, workspace, "/api/v1/features", {"id": "ok", "colour": "red"}), "colour")
    # name defaults to the id.
    assert post(client, workspace, "/api/v1/features", {"id": "ok"}).get_json()["name"] == "ok"


def test_delete_feature_with_usage_needs_force(client, workspace):
    make_feature(workspace.id)
    user = make_user(workspace.id, "u")
    event_id = add_usage(workspace.id, user, 3, T0)
    resp = client.delete("/api/v1/features/messages", headers=workspace.headers)
    assert resp.status_code == 409 and "force" in resp.get_json()["message"]
    assert client.delete("/api/v1/features/messages?force=true", headers=workspace.headers).status_code == 204
    assert count(Usage, workspace.id) == 0
    with SessionLocal() as s:
        event = s.get(Event, event_id)
        assert event.status == "unmapped" and event.feature_id is None


def test_events_by_status_user_and_pages(client, workspace, work):
    make_feature(workspace.id)
    calls = [
        {"type": "identify", "userId": "ev-user", "traits": {"email": "ev@example.com"}, "messageId": "i1"},
        {"type": "track", "userId": "ev-user", "event": "Sent", "properties": {"featureId": "messages"},
         "messageId": "t1"},
        {"type": "track", "userId": "ev-user", "event": "Clicked", "messageId": "t2"},
        {"type": "track", "userId": "someone", "event": "Clicked", "messageId": "t3"},
    ]
    assert client.post("/v1/batch", json={"batch": calls}, headers=workspace.headers).status_code == 200
    work()

    def ids(query: str) -> list[str]:
        resp = get(client, workspace, f"/api/v1/events?{query}")
        assert resp.status_code == 200, resp.get_json()
        return [e["message_id"] for e in resp.get_json()["events"]]

    assert ids("") == ["t3", "t2", "t1", "i1"]  # newest first
    assert ids("status=mapped") == ["t1"]
    assert ids("status=unmapped") == ["t3", "t2"]
    assert ids("status=processed") == ["i1"]
    assert ids("user_id=ev-user") == ["t2", "t1", "i1"]
    assert ids("status=unmapped&user_id=ev-user") == ["t2"]
    assert ids("user_id=nobody") == []
    event = get(client, workspace, "/api/v1/events?status=mapped").get_json()["events"][0]
    assert event["feature_id"] == "messages" and event["type"] == "track" and event["name"] == "Sent"
    assert event["kana_id"] is not None and event["properties"] == {"featureId": "messages"}

    # Events of a merged-away user follow it; its old id finds them.
    other = make_user(workspace.id, "someone-else")
    with SessionLocal() as s:
        someone = identity.find_user(s, workspace.id, "someone").kana_id
    post(client, workspace, "/api/v1/users/merge", {"kana_ids": [someone, other]})
    assert ids("user_id=someone-else") == ["t3"]

    first = get(client, workspace, "/api/v1/events?limit=3").get_json()
    assert len(first["events"]) == 3 and first["next_cursor"]
    rest = get(client, workspace, f"/api/v1/events?limit=3&cursor={first['next_cursor']}").get_json()
    assert [e["message_id"] for e in rest["events"]] == ["i1"] and rest["next_cursor"] is None

    assert_invalid(get(client, workspace, "/api/v1/events?status=lost"), "status")


def test_failed_events_are_dead_letters(client, workspace):
    first = add_dead_letter(workspace.id, "dl-a")
    second = add_dead_letter(workspace.id, "dl-b")
    body = get(client, workspace, "/api/v1/events?status=failed").get_json()
    assert [e["id"] for e in body["events"]] == [second, first]
    row = body["events"][1]
    assert row["status"] == "failed" and row["error"] == "ValueError: boom" and row["attempts"] == 2
    assert row["payload"]["userId"] == "dl-a" and row["message_id"]
    assert [e["id"] for e in get(client, workspace, "/api/v1/events?status=failed&user_id=dl-b")
            .get_json()["events"]] == [second]
    page = get(client, workspace, "/api/v1/events?status=failed&limit=1").get_json()
    assert len(page["events"]) == 1 and page["next_cursor"]


def test_retry_dead_letter_requeues_it(client, workspace, runtime, work):
    dead = add_dead_letter(workspace.id, "retry-user", message_id="retry-me")
    received = get(client, workspace, "/api/v1/stats").get_json()["events_received"]
    resp = post(client, workspace, f"/api/v1/events/failed/{dead}/retry")
    assert resp.status_code == 202 and resp.get_json()["requeued"] is True
    stats = get(client, workspace, "/api/v1/stats").get_json()
    # Received once already: a retry is pending work, not a new call.
    assert stats["events_received"] == received and stats["events_pending"] == 1
    assert count(DeadLetter, workspace.id) == 0
    partition = spool.partition_of(workspace.id, "retry-user", runtime.settings.partitions)
    queued = [json.loads(x) for x in runtime.redis.lrange(spool.queue_key(partition), 0, -1)]
    assert [c["messageId"] for c in queued] == ["retry-me"] and queued[0]["ws"] == workspace.id
    work()
    assert count(Event, workspace.id, Event.message_id == "retry-me") == 1
    assert post(client, workspace, f"/api/v1/events/failed/{dead}/retry").status_code == 404


def test_retry_keeps_the_row_when_redis_is_down(client, workspace, monkeypatch):
    dead = add_dead_letter(workspace.id)

    def down(*args, **kwargs):
        raise RedisConnectionError("redis is gone")

    monkeypatch.setattr(spool, "push", down)
    resp = post(client, workspace, f"/api/v1/events/failed/{dead}/retry")
    assert resp.status_code == 503 and resp.get_json()["code"] == "unavailable"
    assert count(DeadLetter, workspace.id) == 1


def test_stats(client, workspace, work):
    calls = [{"type": "track", "userId": "s", "event": "E", "messageId": f"s{i}"} for i in range(3)]
    client.post("/v1/batch", json={"batch": calls}, headers=workspace.headers)
    body = get(client, workspace, "/api/v1/stats").get_json()
    assert body == {"events_received": 3, "events_processed": 0, "events_pending": 3, "events_failed": 0}
    work()
    add_dead_letter(workspace.id)
    body = get(client, workspace, "/api/v1/stats").get_json()
    assert body == {"events_received": 3, "events_processed": 3, "events_pending": 0, "events_failed": 1}


def test_job_status(client, workspace, new_workspace, runtime, work):
    mine = {"workspace_id": workspace.id}
    ok = runtime.queue.enqueue("builtins.len", [1, 2], meta=dict(mine))
    bad = runtime.queue.enqueue("builtins.int", "not a number", meta=dict(mine))
    untagged = runtime.queue.enqueue("builtins.len", [])  # like a drain job: no workspace's
    body = get(client, workspace, f"/api/v1/jobs/{ok.id}").get_json()
    assert body["status"] == "queued" and body["progress"] == 0.0
    work()
    body = get(client, workspace, f"/api/v1/jobs/{ok.id}").get_json()
    assert body["status"] == "finished" and body["progress"] == 1.0 and body["result"] == 2
    body = get(client, workspace, f"/api/v1/jobs/{bad.id}").get_json()
    assert body["status"] == "failed" and "ValueError" in body["error"]
    assert get(client, workspace, "/api/v1/jobs/no-such-job").status_code == 404
    assert get(client, workspace, f"/api/v1/jobs/{untagged.id}").status_code == 404

    # Progress comes from the job's meta; a job tagged with a workspace is only its own.
    mine = runtime.queue.enqueue("builtins.len", [1], meta={"workspace_id": workspace.id, "progress": 0.25})
    assert get(client, workspace, f"/api/v1/jobs/{mine.id}").get_json()["progress"] == 0.25
    assert get(client, new_workspace("B"), f"/api/v1/jobs/{mine.id}").status_code == 404
    mine.cancel()
    assert get(client, workspace, f"/api/v1/jobs/{mine.id}").get_json()["status"] == "failed"


def test_workspace_settings_never_echo_secrets(client, workspace):
    body = get(client, workspace, "/api/v1/workspace").get_json()
    assert body == {"id": workspace.id, "name": "test", "billing_provider": None, "stripe_api_key_set": False,
                    "chargebee_site": None, "chargebee_api_key_set": False, "segment_shared_secret_set": False,
                    "keep_ip": False}
    resp = client.patch("/api/v1/workspace", headers=workspace.headers, json={
        "billing_provider": "stripe", "stripe_api_key": "sk_test_SECRET", "chargebee_site": "acme",
        "chargebee_api_key": "cb_SECRET", "segment_shared_secret": "seg_SECRET", "keep_ip": True})
    assert resp.status_code == 200
    assert b"SECRET" not in resp.data
    body = resp.get_json()
    assert body["billing_provider"] == "stripe" and body["stripe_api_key_set"] is True
    assert body["chargebee_site"] == "acme" and body["chargebee_api_key_set"] is True
    assert body["segment_shared_secret_set"] is True and body["keep_ip"] is True
    assert b"SECRET" not in get(client, workspace, "/api/v1/workspace").data
    resp = client.patch("/api/v1/workspace", headers=workspace.headers, json={"segment_shared_secret": None})
    assert resp.get_json()["segment_shared_secret_set"] is False
    resp = client.patch("/api/v1/workspace", headers=workspace.headers, json={"keep_ip": "maybe"})
    assert resp.status_code == 400 and "keep_ip" in resp.get_json()["errors"]

    body = client.patch("/api/v1/workspace", json={"billing_provider": None, "stripe_api_key": None},
                        headers=workspace.headers).get_json()
    assert body["billing_provider"] is None and body["stripe_api_key_set"] is False
    assert body["chargebee_api_key_set"] is True  # untouched
    assert_invalid(client.patch("/api/v1/workspace", json={"billing_provider": "paypal"},
                                headers=workspace.headers), "billing_provider")
    assert_invalid(client.patch("/api/v1/workspace", json={"plan": "pro"}, headers=workspace.headers), "plan")


def test_workspace_billing_provider_reaches_the_receiver(client, workspace):
    identify = {"type": "identify", "userId": "u", "traits": {"billingUserId": "cb-1"}}
    assert client.post("/v1/identify", json=identify, headers=workspace.headers).status_code == 200
    client.patch("/api/v1/workspace", json={"billing_provider": "stripe"}, headers=workspace.headers)
    resp = client.post("/v1/identify", json=identify, headers=workspace.headers)
    assert resp.status_code == 400


def test_audit_log_pages(client, workspace):
    for i in range(3):
        a, b = make_user(workspace.id, f"a{i}"), make_user(workspace.id, f"b{i}")
        post(client, workspace, "/api/v1/users/merge", {"kana_ids": [a, b]})
    page = get(client, workspace, "/api/v1/audit?limit=2").get_json()
    assert len(page["audit"]) == 2 and page["next_cursor"]
    assert page["audit"][0]["action"] == "merge" and page["audit"][0]["id"] > page["audit"][1]["id"]
    rest = get(client, workspace, f"/api/v1/audit?limit=2&cursor={page['next_cursor']}").get_json()
    assert len(rest["audit"]) == 1 and rest["next_cursor"] is None
    datetime.fromisoformat(rest["audit"][0]["at"])


def test_keys(client, workspace):
    listed = get(client, workspace, "/api/v1/keys").get_json()["keys"]
    assert {k["scope"] for k in listed} == {"admin", "ingest"}
    assert all("key_hash" not in k and "api_key" not in k for k in listed)

    resp = post(client, workspace, "/api/v1/keys", {"scope": "ingest", "name": "server"})
    assert resp.status_code == 201
    created = resp.get_json()
    assert created["scope"] == "ingest" and created["api_key"].startswith(created["prefix"])
    new_headers = {"Authorization": f"Bearer {created['api_key']}"}
    assert client.post("/v1/track", json={"userId": "k", "event": "E"}, headers=new_headers).status_code == 200
    assert client.get("/api/v1/users", headers=new_headers).status_code == 403

    assert client.delete(f"/api/v1/keys/{created['id']}", headers=workspace.headers).status_code == 204
    assert client.post("/v1/track", json={"userId": "k", "event": "E"}, headers=new_headers).status_code == 401
    revoked = [k for k in get(client, workspace, "/api/v1/keys").get_json()["keys"] if k["id"] == created["id"]]
    assert revoked[0]["revoked_at"] is not None
    assert client.delete("/api/v1/keys/99999999", headers=workspace.headers).status_code == 404
    assert_invalid(post(client, workspace, "/api/v1/keys", {"scope": "root"}), "scope")
    assert_invalid(post(client, workspace, "/api/v1/keys", {}), "scope")



"""Usage alerts and their webhooks (SPEC §11): a real HTTP receiver checks every signature."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import func, select, update

import jobs
from jobs import webhooks as webhook_jobs
from kana.db import SessionLocal, read_only
from kana.domain import webhooks
from kana.models import Alert, WebhookDelivery
from tests.helpers import wait_until
from tests.integration.test_dashboard import admin, browser, post, text  # noqa: F401 - fixtures
from tests.integration.test_entitlements import api, assign, kana_id_of, send, setup_plan, track


@dataclass
class Receiver:
    url: str
    secret: str = ""
    # Status codes to answer, in order; then 200. "hang" holds the request open.
    script: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def bodies(self, status: int = 200) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["answer"] == status]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = state.script.pop(0) if state.script else 200
            record = {"body": body, "headers": dict(self.headers), "answer": answer,
                      "valid": webhooks.verify(state.secret, body, self.headers.get("Kana-Signature", ""))}
            state.requests.append(record)
            state.arrived.set()
            if answer == "hang":
                state.release.wait(60)
                return
            self.send_response(answer)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hooks/kana"
    yield state
    state.release.set()
    server.shutdown()


@pytest.fixture
def allow_private(runtime, monkeypatch):
    """The test receiver is on localhost: allowed here as `make dev` allows it."""
    for rt in (runtime, jobs.runtime()):
        monkeypatch.setattr(rt, "settings", replace(rt.settings, webhook_allow_private=True, webhook_timeout=3.0))


def set_webhook(client, ws, receiver: Receiver) -> None:
    resp = api(client, ws, "PUT", "/api/v1/webhook", json={"url": receiver.url})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["url"] == receiver.url and body["secret"].startswith("whsec_")
    receiver.secret = body["secret"]


def deliveries(client, ws) -> list[dict]:
    return api(client, ws, "GET", "/api/v1/webhook/deliveries").get_json()["deliveries"]


def alert_count(ws_id: int) -> int:
    with read_only(SessionLocal()) as s:
        return s.scalar(select(func.count()).select_from(Alert).where(Alert.workspace_id == ws_id))


def test_thresholds_are_sent_once_signed(client, workspace, work, receiver, allow_private):
    setup_plan(client, workspace, limit=4, thresholds=[50, 100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann")])
    work()
    assign(client, workspace, "ann")
    first = [track("ann", message_id="m2")]
    send(client, workspace, first)
    work()
    assert len(receiver.requests) == 1
    hit = receiver.requests[0]
    assert hit["valid"] and hit["answer"] == 200
    body = json.loads(hit["body"])
    assert body["type"] == "usage.threshold_crossed"
    assert body["id"] == hit["headers"]["Kana-Idempotency-Key"]
    data = body["data"]
    assert (data["user_id"], data["feature_id"], data["threshold"], data["used"], data["limit"]) == \
        ("ann", "messages", 50, 2, 4)
    assert data["kana_id"] == kana_id_of(workspace.id, "ann") and data["period_start"] and data["period_end"]

    # Past 100% in one chunk, with redeliveries of old calls mixed in.
    send(client, workspace, first + [track("ann", message_id="m3", delta=3)] + first)
    work()
    assert sorted(b["data"]["threshold"] for b in receiver.bodies()) == [50, 100]
    assert all(r["valid"] for r in receiver.requests)

    # Replays, more usage, reprocessing and sweeps: nothing new is sent.
    send(client, workspace, first + [track("ann", message_id="m3", delta=3), track("ann", message_id="m4")])
    assert api(client, workspace, "POST", "/api/v1/rules/reprocess").status_code == 202
    work()
    webhook_jobs.sweep()
    work()
    assert len(receiver.requests) == 2 and alert_count(workspace.id) == 2
    listed = deliveries(client, workspace)
    assert [d["status"] for d in listed] == ["delivered", "delivered"]
    assert [d["attempts"] for d in listed] == [1, 1]
    assert {d["idempotency_key"] for d in listed} == {r["headers"]["Kana-Idempotency-Key"] for r in receiver.requests}


def test_failed_attempts_back_off_then_fail_after_24_hours(client, workspace, work, receiver, allow_private):
    setup_plan(client, workspace, limit=2, thresholds=[100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann")])
    work()
    assign(client, workspace, "ann")
    receiver.script = [500, 503]
    send(client, workspace, [track("ann")])
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "pending" and row["attempts"] == 1 and row["last_status"] == 500
    assert row["next_attempt_at"] is not None
    webhook_jobs.sweep()  # not due yet (backoff): nothing is sent
    work()
    assert len(receiver.requests) == 1
    # Retry now (the dashboard's button): 503 this time, still pending.
    assert api(client, workspace, "POST", f"/api/v1/webhook/deliveries/{row['id']}/retry").status_code == 202
    work()
    [row] = deliveries(client, workspace)
    assert row["attempts"] == 2 and row["status"] == "pending" and row["last_status"] == 503
    # A delivery failing past its 24 hours is given up.
    receiver.script = [500]
    long_ago = datetime.now(UTC) - timedelta(hours=25)
    with SessionLocal.begin() as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == row["id"]).values(
            created_at=long_ago, next_attempt_at=long_ago))
    webhook_jobs.sweep()
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "failed" and row["attempts"] == 3
    # The retry button gives it another go: delivered.
    api(client, workspace, "POST", f"/api/v1/webhook/deliveries/{row['id']}/retry")
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "delivered" and row["attempts"] == 4
    assert len({r["headers"]["Kana-Idempotency-Key"] for r in receiver.requests}) == 1
    assert all(r["valid"] for r in receiver.requests)


def test_a_lost_delivery_job_is_swept_up(client, workspace, work, receiver, allow_private, runtime):
    setup_plan(client, workspace, limit=1, thresholds=[100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann")])
    work()
    assign(client, workspace, "ann")
    send(client, workspace, [track("ann")])
    # Apply the chunk in this process, then lose the queued delivery job: what a
    # crash right after the commit leaves behind.
    from jobs import events

    for partition in range(runtime.settings.partitions):
        events.drain(partition)
    assert alert_count(workspace.id) == 1
    runtime.queue.empty()
    assert receiver.requests == []
    webhook_jobs.sweep()
    work()
    assert len(receiver.bodies()) == 1


def test_worker_killed_mid_delivery_still_delivers_once(client, workspace, work, receiver, allow_private,
                                                        spawn_worker, monkeypatch):
    setup_plan(client, workspace, limit=1, thresholds=[100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann")])
    work()
    assign(client, workspace, "ann")
    receiver.script = ["hang"]
    monkeypatch.setenv("KANA_WEBHOOK_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("KANA_WEBHOOK_TIMEOUT", "3")
    proc = spawn_worker()
    send(client, workspace, [track("ann")])
    assert receiver.arrived.wait(60), "the delivery never started"
    proc.send_signal(signal.SIGKILL)  # the alert is committed; the POST is in flight
    proc.wait(10)
    with read_only(SessionLocal()) as s:
        row = s.scalars(select(WebhookDelivery).where(WebhookDelivery.workspace_id == workspace.id)).one()
    assert row.status == "pending" and row.attempts == 1
    receiver.release.set()
    spawn_worker()
    # Once the attempt's lease passes, the scheduler's sweep queues it again.
    wait_until(lambda: webhook_jobs.sweep()["queued"] > 0, timeout=60, interval=0.5)

    def delivered() -> bool:
        with read_only(SessionLocal()) as s:
            return s.get(WebhookDelivery, row.id).status == "delivered"

    wait_until(delivered, timeout=60)
    assert len(receiver.bodies()) == 1 and alert_count(workspace.id) == 1
    assert {r["headers"]["Kana-Idempotency-Key"] for r in receiver.requests} == {row.idempotency_key}


def test_webhook_urls_are_checked_against_ssrf(client, workspace):
    for url, reason in [("ftp://example.com/x", "http"), ("http://127.0.0.1:8080/hook", "private"),
                        ("http://10.1.2.3/hook", "private"), ("http://169.254.169.254/latest", "private"),
                        ("http://[::1]/hook", "private"), ("not a url", "http"), (None, "required")]:
        resp = api(client, workspace, "PUT", "/api/v1/webhook", json={"url": url})
        assert resp.status_code == 400, url
        assert "url" in resp.get_json()["errors"] and reason in resp.get_json()["message"], resp.get_json()


def test_dashboard_plans_user_entitlements_and_delivery_retry(browser, admin, client, workspace, work, receiver,  # noqa: F811
                                                              allow_private):
    setup_plan(client, workspace, limit=2, thresholds=[100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann"), track("ann")])
    work()
    page = text(browser.get("/dashboard/plans"))
    assert 'data-plan="pro"' in page and "alerts at 100%" in page
    kana_id = kana_id_of(workspace.id, "ann")
    resp = post(browser, f"/dashboard/users/{kana_id}/plan", {"plan_id": "pro"})
    assert resp.status_code == 302
    page = text(browser.get(f"/dashboard/users/{kana_id}"))
    assert 'id="entitlements"' in page and 'data-entitlement="messages"' in page
    # The plan was assigned after the usage: the next event records the crossing.
    receiver.script = [500]
    send(client, workspace, [track("ann", delta=0)])
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "pending" and row["attempts"] == 1
    page = text(browser.get("/dashboard/webhook"))
    assert f'data-delivery="{row["id"]}"' in page and "HTTP 500" in page
    assert post(browser, f"/dashboard/webhook/deliveries/{row['id']}/retry").status_code == 302
    work()
    assert deliveries(client, workspace)[0]["status"] == "delivered"
    assert post(browser, "/dashboard/webhook/deliveries/999999/retry").status_code == 404


def test_retry_with_redis_down_stays_due_and_the_sweep_sends_it(client, workspace, work, receiver, allow_private,
                                                                  monkeypatch):
    setup_plan(client, workspace, limit=1, thresholds=[100])
    set_webhook(client, workspace, receiver)
    send(client, workspace, [track("ann")])
    work()
    assign(client, workspace, "ann")
    receiver.script = [500]
    send(client, workspace, [track("ann")])
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "pending" and row["attempts"] == 1

    def down(*args, **kwargs):
        raise RedisConnectionError("redis is gone")

    with monkeypatch.context() as patch:
        patch.setattr(webhooks, "enqueue", down)
        resp = api(client, workspace, "POST", f"/api/v1/webhook/deliveries/{row['id']}/retry")
    # The re-armed delivery is committed: not an error, and the answer says it was not queued.
    assert resp.status_code == 202 and "Redis" in resp.get_json()["queue_error"]
    webhook_jobs.sweep()
    work()
    [row] = deliveries(client, workspace)
    assert row["status"] == "delivered" and row["attempts"] == 2
    resp = api(client, workspace, "GET", "/api/v1/webhook/deliveries?status=AAA")
    assert resp.status_code == 400 and "status" in resp.get_json()["errors"]
    assert api(client, workspace, "POST", "/api/v1/webhook/deliveries/99999999999999999999/retry").status_code == 404



"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import config
from app import create_app
from kana.ingest import spool


def sample(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_healthz(client):
    res = client.get("/healthz")
    assert res.status_code == 200
    assert res.json == {"status": "ok"}


def test_readyz_ok(client):
    res = client.get("/readyz")
    assert res.status_code == 200
    assert res.json == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_names_the_failed_dependency(settings, redis):
    broken = create_app(config.load(environ={}, database_url=settings.database_url, redis_url="redis://127.0.0.1:1/0",
                                    data_dir=settings.data_dir, secret_key="x"))
    res = broken.test_client().get("/readyz")
    assert res.status_code == 503
    assert res.json["checks"]["database"] == "ok"
    assert res.json["checks"]["redis"].startswith("unreachable")
    assert "redis" in res.json["message"]
    # Liveness does not depend on Redis.
    assert broken.test_client().get("/healthz").status_code == 200


def test_metrics(client, workspace, redis, runtime):
    before = client.get("/metrics").get_data(as_text=True)
    received = sample(before, "kana_calls_received_total", '{type="track"}') or 0
    rejected = sample(before, "kana_calls_rejected_total", '{reason="invalid_call"}') or 0
    unauthorized = sample(before, "kana_calls_rejected_total", '{reason="unauthorized"}') or 0

    batch = [{"type": "track", "userId": f"u{i}", "event": "E"} for i in range(3)] + [{"type": "track"}]
    assert client.post("/v1/batch", json={"batch": batch}, headers=workspace.headers).status_code == 200
    assert client.post("/v1/track", json={"userId": "u", "event": "E"}).status_code == 401
    # An event that has waited a minute, as the worker would see it at the head of a partition.
    old = (datetime.now(UTC) - timedelta(seconds=60)).isoformat()
    redis.rpush(spool.inflight_key(0), json.dumps({"ws": 1, "userId": "x", "receivedAt": old}))
    redis.hset("kana:stats:global", "processed", 41)

    res = client.get("/metrics")
    assert res.status_code == 200
    assert res.content_type.startswith("text/plain")
    text = res.get_data(as_text=True)
    assert sample(text, "kana_calls_received_total", '{type="track"}') == received + 3
    assert sample(text, "kana_calls_rejected_total", '{reason="invalid_call"}') == rejected + 1
    assert sample(text, "kana_calls_rejected_total", '{reason="unauthorized"}') == unauthorized + 1
    assert sample(text, "kana_queue_depth") == 4
    assert 59 <= sample(text, "kana_processing_lag_seconds") < 120
    assert sample(text, "kana_events_processed_total") == 41
    assert sample(text, "kana_redis_up") == 1


def test_metrics_on_an_empty_queue(client):
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "kana_queue_depth") == 0
    assert sample(text, "kana_processing_lag_seconds") == 0
    assert sample(text, "kana_events_processed_total") == 0


def test_metrics_without_redis_still_answer(settings, redis):
    broken = create_app(config.load(environ={}, database_url=settings.database_url, redis_url="redis://127.0.0.1:1/0",
                                    data_dir=settings.data_dir, secret_key="x"))
    res = broken.test_client().get("/metrics")
    assert res.status_code == 200
    assert sample(res.get_data(as_text=True), "kana_redis_up") == 0

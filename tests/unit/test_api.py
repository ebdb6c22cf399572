"""The API's pure parts: zero-filled usage buckets and the one error model's mapping of outages and domain errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from kana.domain import ledger


@pytest.mark.parametrize("window", ["hour", "day", "month"])
def test_buckets_are_zero_filled_and_aligned(window):
    start = datetime(2023, 12, 31, 22, 30, tzinfo=UTC)
    points = ledger.buckets(start, start + timedelta(days=3), window)
    assert points[0] == ledger.floor(start, window)
    assert all(a < b for a, b in zip(points, points[1:], strict=False))
    assert {"hour": 73, "day": 4, "month": 2}[window] == len(points)


def test_outages_and_domain_errors_map_to_one_error_model():
    from sqlalchemy.exc import OperationalError

    from kana import errors
    from kana.domain import features, rules

    redis_down = errors.classify(RedisConnectionError("gone"))
    assert (redis_down.status, redis_down.code) == (503, "unavailable") and "Redis" in redis_down.text
    db_down = errors.classify(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert (db_down.status, db_down.code) == (503, "unavailable") and "database" in db_down.text
    assert errors.classify(ValueError("a bug")) is None
    missing = errors.classify(rules.RuleNotFound(7))
    assert missing.body() == {"code": "not_found", "message": "No rule 7 in this workspace."}
    duplicate = features.DuplicateFeature("id", "feature 'x' already exists")
    assert (duplicate.status, duplicate.code) == (409, "conflict")
    assert duplicate.errors == {"id": ["feature 'x' already exists"]}



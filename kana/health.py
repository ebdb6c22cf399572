"""Liveness, readiness and Prometheus metrics endpoints."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from kana import metrics, runtime
from kana.db import SessionLocal

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    # Liveness only: touching the database or Redis here would get a healthy
    # process restarted for a dependency's outage.
    return jsonify({"status": "ok"}), 200


def _check_database() -> str | None:
    try:
        with SessionLocal() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"unreachable: {type(exc).__name__}"
    return None


def _check_redis() -> str | None:
    try:
        runtime.current().redis.ping()
    except (RedisError, OSError) as exc:
        return f"unreachable: {type(exc).__name__}"
    return None


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    problems = {"database": _check_database(), "redis": _check_redis()}
    checks = {name: problem or "ok" for name, problem in problems.items()}
    failed = [name for name, problem in problems.items() if problem]
    if failed:
        body = {
            "code": "not_ready",
            "message": f"Not ready: {' and '.join(failed)} unreachable.",
            "status": "unavailable",
            "checks": checks,
        }
        return jsonify(body), 503
    return jsonify({"status": "ready", "checks": checks}), 200


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    rt = runtime.current()
    body = metrics.render(rt.redis, rt.settings.partitions)
    return Response(body, status=200, content_type=metrics.CONTENT_TYPE)

"""Liveness, readiness and Prometheus metrics endpoints."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from kana import metrics, outages, runtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    # Liveness only: touching the database or Redis here would get a healthy
    # process restarted for a dependency's outage.
    return jsonify({"status": "ok"}), 200


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """What is down. Only Redis makes the web process unready: it accepts calls while the database is away."""
    problems = {"database": outages.database_problem(),
                "redis": outages.redis_problem(runtime.current().redis)}
    checks = {name: problem or "ok" for name, problem in problems.items()}
    failed = [name for name, problem in problems.items() if problem]
    if problems["redis"]:
        body = {
            "code": "not_ready",
            "message": f"Not ready: {' and '.join(failed)} unreachable.",
            "status": "unavailable",
            "checks": checks,
        }
        return jsonify(body), 503
    if failed:
        message = "Degraded: the database is unreachable; calls are accepted and queued until it returns."
        return jsonify({"status": "degraded", "message": message, "checks": checks}), 200
    return jsonify({"status": "ready", "checks": checks}), 200


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    rt = runtime.current()
    body = metrics.render(rt.redis, rt.settings.partitions)
    return Response(body, status=200, content_type=metrics.CONTENT_TYPE)

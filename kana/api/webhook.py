"""Admin API for the workspace's webhook (SPEC §10, §11): URL and secret, deliveries, retries."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from kana import auth, runtime
from kana.api.common import json_object
from kana.db import SessionLocal
from kana.domain import webhooks
from kana.domain.ids import MAX_ID
from kana.errors import ApiError

bp = Blueprint("webhook_api", __name__, url_prefix="/api/v1")
bp.before_request(auth.require_admin)
PAGE = 50
STATUSES = ("pending", "delivered", "failed")


@bp.put("/webhook")
def set_webhook() -> ResponseReturnValue:
    data = json_object()
    allow_private = runtime.current().settings.webhook_allow_private
    with SessionLocal.begin() as s:
        try:
            url, secret = webhooks.set_webhook(s, auth.workspace_id(), data.get("url"), allow_private=allow_private)
        except webhooks.WebhookError as exc:
            raise ApiError(400, "invalid_request", f"{exc.field}: {exc.message}",
                           errors={exc.field: [exc.message]}) from None
    return jsonify({"url": url, "secret": secret})


def _int_arg(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 0 < int(raw) <= MAX_ID:
        raise ApiError(400, "invalid_request", f"{name}: must be a positive integer", errors={name: ["invalid"]})
    return int(raw)


@bp.get("/webhook/deliveries")
def list_deliveries() -> ResponseReturnValue:
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_request", f"status: must be one of {', '.join(STATUSES)}",
                       errors={"status": [f"must be one of {', '.join(STATUSES)}"]})
    with SessionLocal.begin() as s:
        rows = webhooks.list_deliveries(s, auth.workspace_id(), before=_int_arg("cursor"), limit=PAGE,
                                        status=status)
        body = {"deliveries": [webhooks.to_dict(r) for r in rows],
                "next_cursor": str(rows[-1].id) if len(rows) == PAGE else None}
    return jsonify(body)


@bp.post("/webhook/deliveries/<int:delivery_id>/retry")
def retry_delivery(delivery_id: int) -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        row = webhooks.retry(s, auth.workspace_id(), delivery_id) if delivery_id <= MAX_ID else None
        if row is None:
            raise ApiError(404, "not_found", f"No webhook delivery {delivery_id} in this workspace.")
        body = webhooks.to_dict(row)
    if body["status"] == "pending":
        # Redis down: the error handler answers 503 (the delivery stays pending for the sweep).
        webhooks.enqueue(runtime.current().queue, [delivery_id])
    return jsonify(body), 202


_ERROR = {"$ref": "#/components/schemas/Error"}
_DELIVERY = {"type": "object", "properties": {
    "id": {"type": "integer"}, "type": {"type": "string", "enum": ["usage.threshold_crossed"]},
    "idempotency_key": {"type": "string", "description": "Sent as Kana-Idempotency-Key; stable per "
                        "(user, feature, threshold, period)."},
    "status": {"type": "string", "enum": list(STATUSES)}, "attempts": {"type": "integer"},
    "last_error": {"type": "string", "nullable": True}, "last_status": {"type": "integer", "nullable": True},
    "next_attempt_at": {"type": "string", "format": "date-time", "nullable": True},
    "created_at": {"type": "string", "format": "date-time"},
    "delivered_at": {"type": "string", "format": "date-time", "nullable": True},
    "payload": {"type": "object", "description": "The body POSTed: {type, id, created_at, data: {kana_id, user_id, "
                "feature_id, threshold, used, limit, period_start, period_end}}"}}}
OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/webhook": {
        "put": {"tags": ["webhook"], "operationId": "setWebhook",
                "summary": "Set the webhook URL; answers a new signing secret (shown once; every PUT rotates it)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}}}},
                "responses": {"200": {"description": "URL and secret", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"url": {"type": "string"}, "secret": {"type": "string"}}}}}},
                    "400": {"description": "Not http(s), or a private address (SSRF)",
                            "content": {"application/json": {"schema": _ERROR}}}}},
    },
    "/api/v1/webhook/deliveries": {
        "get": {"tags": ["webhook"], "operationId": "listWebhookDeliveries", "summary": "Deliveries, newest first",
                "parameters": [{"in": "query", "name": "cursor", "schema": {"type": "string"}},
                               {"in": "query", "name": "status", "schema": {"type": "string",
                                                                          "enum": list(STATUSES)}}],
                "responses": {"200": {"description": "A page", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"deliveries": {"type": "array", "items": _DELIVERY},
                                                     "next_cursor": {"type": "string", "nullable": True}}}}}}}},
    },
    "/api/v1/webhook/deliveries/{delivery_id}/retry": {
        "parameters": [{"name": "delivery_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
        "post": {"tags": ["webhook"], "operationId": "retryWebhookDelivery", "summary": "Send a delivery again now",
                 "responses": {"202": {"description": "The delivery", "content": {"application/json": {
                     "schema": _DELIVERY}}}, "404": {"description": "No such delivery"}}},
    },
}

"""The entitlement check (SPEC §10, §11): Kana's canUseFeature, for admin keys and ``check`` keys.

The hot path: the key from the process's key cache, one Redis round trip, the
answer. The database is read only on a cache miss (or with Redis down).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from kana import auth, runtime
from kana.api.plans import ENTITLEMENT
from kana.db import SessionLocal
from kana.domain import entitlements
from kana.errors import ApiError

bp = Blueprint("entitlements_api", __name__, url_prefix="/api/v1")
MAX_TEXT = 1000


def _require_check_key() -> None:
    auth.authenticate(scope="check")


bp.before_request(_require_check_key)


def _field(name: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", f"{name}: {message}", errors={name: [message]})


def _text(name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise _field(name, "is required")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise _field(name, f"must be at most {MAX_TEXT} characters, without NUL")
    return value


def _delta() -> Decimal:
    raw = request.args.get("delta")
    if raw is None or raw == "":
        return Decimal(1)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _field("delta", "must be a number") from None
    if not value.is_finite() or value < 0:
        raise _field("delta", "must be a finite number >= 0")
    return value


@bp.get("/entitlements/check")
def check() -> ResponseReturnValue:
    user_id, feature_id, delta = _text("user_id"), _text("feature_id"), _delta()
    rt = runtime.current()
    body = entitlements.check(rt.redis, SessionLocal, auth.workspace_id(), user_id, feature_id, delta)
    return jsonify(body)


OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/entitlements/check": {
        "get": {
            "tags": ["entitlements"], "operationId": "checkEntitlement",
            "summary": "May this user use this feature now (canUseFeature)? Admin key or a key of scope check.",
            "parameters": [
                {"in": "query", "name": "user_id", "required": True, "schema": {"type": "string"},
                 "description": "The user's id, an alias, or a merged-away id."},
                {"in": "query", "name": "feature_id", "required": True, "schema": {"type": "string"}},
                {"in": "query", "name": "delta", "schema": {"type": "number", "default": 1, "minimum": 0},
                 "description": "The usage about to happen."},
            ],
            "responses": {
                "200": {"description": "The answer", "content": {"application/json": {"schema": ENTITLEMENT}}},
                "400": {"description": "A missing or invalid parameter, named in `errors`."},
                "401": {"description": "Missing, unknown or revoked key."},
                "403": {"description": "An ingest key."},
            },
        },
    },
}

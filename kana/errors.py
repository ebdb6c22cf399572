"""Error bodies: always ``{"code", "message", "errors"?}`` with a message a person understands."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


def unavailable(exc: Exception) -> ApiError:
    """503 for an unreachable Redis: the caller (or Segment) retries."""
    log.warning("redis unavailable: %s", exc)
    return ApiError(503, "unavailable", "The queue (Redis) is unreachable; retry shortly.")


def json_object() -> dict[str, Any]:
    """The request's JSON object body, without the ``writeKey`` authentication already used."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object "
                       "(and the Content-Type application/json).")
    data = dict(data)
    data.pop("writeKey", None)
    return data


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # noqa: ANN202
        return jsonify(exc.body()), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # noqa: ANN202
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"code": code, "message": exc.description or exc.name}), exc.code

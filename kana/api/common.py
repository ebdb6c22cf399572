"""What every admin API resource shares: the blueprint and its authentication, input parsing,
cursors, the OpenAPI description of each view, and the JSON rendering of errors.

Every endpoint but the OpenAPI document needs an admin key (401 unknown or
revoked, 403 another scope) unless its ``doc`` names another scope (the
entitlement check takes ``check`` keys too, ``kana.auth.ALLOWED``), and only
ever reads or writes the key's workspace:
another workspace's ids answer 404, exactly like ids that do not exist.
Input is validated by marshmallow schemas that reject unknown fields, so that
a typo (``?emial=``) is an error rather than a silently ignored filter.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from redis.exceptions import RedisError
from sqlalchemy import Select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from kana import auth, errors, paging
from kana.domain.ids import MAX_ID
from kana.errors import ApiError, KanaError, field_error, invalid
from kana.routing import error_headers

bp = Blueprint("api", __name__, url_prefix="/api/v1")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
PUBLIC = {"api.openapi"}


@bp.before_request
def _authenticate() -> None:
    if request.endpoint in PUBLIC:
        return
    op = getattr(current_app.view_functions.get(request.endpoint or ""), "openapi", None)
    scope = op.scope if op is not None else "admin"
    if scope == "admin":
        auth.require_admin()
    else:
        auth.authenticate(scope=scope)


# --- errors: the one JSON rendering (the receiver's errors too) ---------------------------------


def register_errors(app: Flask) -> None:
    """JSON error bodies ``{"code", "message", "errors"?}`` for the app's JSON endpoints.

    ``errors.classify`` decides what an exception means (a domain error, Redis
    or the database down); anything else is a bug and stays a 500.
    """

    @app.errorhandler(KanaError)
    @app.errorhandler(RedisError)
    @app.errorhandler(DBAPIError)
    def _error(exc: Exception) -> ResponseReturnValue:
        known = errors.classify(exc)
        if known is None:
            raise exc
        return jsonify(known.body()), known.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"code": code, "message": exc.description or exc.name}), exc.code, error_headers(exc)


# --- input ----------------------------------------------------------------------------------


def no_nul(value: str) -> None:
    # PostgreSQL text cannot hold U+0000.
    if "\x00" in value:
        raise ValidationError("Must not contain NUL (\\u0000) characters.")


def text(*, required: bool = False, max_length: int | None = None, **kwargs: Any) -> fields.String:
    validators: list[Any] = [no_nul]
    if max_length is not None:
        validators.append(validate.Length(max=max_length))
    if not required:
        kwargs.setdefault("load_default", None)
        kwargs.setdefault("allow_none", True)
    return fields.String(required=required, validate=validators, **kwargs)


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class Queued(Schema):
    """The answer of an endpoint that started a background job (``GET /api/v1/jobs/{job_id}``)."""

    job_id = fields.String(required=True)


class PageQuery(StrictSchema):
    cursor = text(metadata={"description": "next_cursor of the previous page"})
    limit = fields.Integer(load_default=DEFAULT_LIMIT, validate=validate.Range(1, MAX_LIMIT))


@cache
def _instance(schema: type[Schema]) -> Schema:
    # One instance per schema class, shared by every request: building one deep-copies
    # each declared field (several times the cost of a small query's load), and a
    # load leaves the instance as it was.
    return schema()


def load(schema: type[Schema], data: Any) -> dict[str, Any]:
    """``data`` loaded by ``schema``; 400 naming the fields in error."""
    try:
        return _instance(schema).load(data)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise invalid(messages) from None


def query(schema: type[Schema]) -> dict[str, Any]:
    return load(schema, request.args.to_dict(flat=True))


def json_object() -> dict[str, Any]:
    """The request's JSON object body, without the ``writeKey`` authentication already used."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object "
                       "(and the Content-Type application/json).")
    data = dict(data)
    data.pop("writeKey", None)
    return data


def body(schema: type[Schema]) -> dict[str, Any]:
    return load(schema, json_object())


def bounded_int(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query argument within [low, high] (default when absent)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name} must be a whole number.",
                       errors={name: "Not a whole number."}) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{name} must be between {low} and {high}.",
                       errors={name: f"Must be between {low} and {high}."})
    return value


# --- cursors ---------------------------------------------------------------------------------


def encode_cursor(value: int) -> str:
    # Opaque to clients, so the keyset behind it can change without breaking them.
    return base64.urlsafe_b64encode(f"k:{value}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        after = int(value)
        if prefix != "k" or not 0 <= after <= MAX_ID:
            raise ValueError(raw)
        return after
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise field_error("cursor", "Not a cursor this API returned (use next_cursor as is).") from None


def page(session: Session, stmt: Select, column: Any, args: dict[str, Any],
         *, descending: bool = False) -> tuple[list[Any], str | None]:
    """One keyset page of ``stmt`` (``args``: cursor, limit) and the cursor of the next."""
    rows, after = paging.keyset(session, stmt, column, after=decode_cursor(args.get("cursor")),
                                limit=args["limit"], descending=descending)
    return rows, (encode_cursor(after) if after is not None else None)


# --- OpenAPI: each view says what it takes and answers ------------------------------------------


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str
    status: int = 200
    response: Any = None  # a marshmallow schema (class), or None: no body
    query: type[Schema] | None = None
    body: type[Schema] | None = None
    errors: tuple[int, ...] = (400, 401, 403, 404, 409, 503)
    media: str = "application/json"  # of the response (text/csv for exports)
    upload: bool = False  # the body is a multipart/form-data file
    scope: str = "admin"  # the key scope the endpoint needs (``kana.auth.ALLOWED``: admin keys pass every one)


def doc(operation_id: str, summary: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """Attach the view's OpenAPI description; ``kana.api.openapi`` builds the document from the routes."""

    def attach(view: Callable) -> Callable:
        view.openapi = Operation(operation_id, summary, **kwargs)  # type: ignore[attr-defined]
        return view

    return attach

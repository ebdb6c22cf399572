"""The admin JSON API under ``/api/v1`` (SPEC §8, §10).

Every endpoint but the OpenAPI document needs an admin key (401 unknown or
revoked, 403 ingest key) and only ever reads or writes the key's workspace:
another workspace's ids answer 404, exactly like ids that do not exist.
Each request is one transaction (``with SessionLocal.begin()``). Input is validated
by the marshmallow schemas below, which reject unknown fields so that a typo
(``?emial=``) is an error rather than a silently ignored filter.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from redis.exceptions import RedisError
from sqlalchemy import Select, false, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kana import auth, jobstate
from kana.api import rules as api_rules
from kana.db import SessionLocal
from kana.domain import features, flags, identity, keys, ledger
from kana.domain.billing import check_billing_id, provider_of
from kana.domain.ids import MAX_ID, user_id_problem
from kana.errors import ApiError, json_object, unavailable
from kana.ingest import processor, spool
from kana.models import Audit, DeadLetter, Event, User, Workspace
from kana.serializers import (
    amount,
    audit_json,
    dead_letter_json,
    event_json,
    feature_json,
    iso,
    key_json,
    user_json,
    workspace_json,
)

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_MERGE = 1000
EVENT_STATUSES = ("unmapped", "mapped", "processed", "failed")


# --- validation ---------------------------------------------------------------


def _no_nul(value: str) -> None:
    # PostgreSQL text cannot hold U+0000.
    if "\x00" in value:
        raise ValidationError("Must not contain NUL (\\u0000) characters.")


def _text(*, required: bool = False, max_length: int | None = None, **kwargs: Any) -> fields.String:
    validators: list[Any] = [_no_nul]
    if max_length is not None:
        validators.append(validate.Length(max=max_length))
    if not required:
        kwargs.setdefault("load_default", None)
        kwargs.setdefault("allow_none", True)
    return fields.String(required=required, validate=validators, **kwargs)


def _user_id_field(value: str) -> None:
    if value and user_id_problem(value) is not None:
        raise ValidationError("Must be a real user id, not blank or a placeholder like 'null' or 'undefined'.")


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class PageQuery(StrictSchema):
    cursor = _text(metadata={"description": "next_cursor of the previous page"})
    limit = fields.Integer(load_default=DEFAULT_LIMIT, validate=validate.Range(1, MAX_LIMIT))


class UserListQuery(PageQuery):
    user_id = _text(metadata={"description": "exact user_id, or an alias of the user"})
    email = _text(metadata={"description": "case-insensitive email"})
    q = _text(max_length=200, metadata={"description": "substring of user_id, email or name"})
    flag = fields.String(
        load_default=None,
        validate=validate.OneOf((*flags.FLAGS, flags.ANY)),
        metadata={"description": "users flagged at the last flag refresh (GET /api/v1/flags)"},
    )


class UserCreate(StrictSchema):
    user_id = _text(max_length=1000)
    email = fields.Email(load_default=None, allow_none=True, validate=[_no_nul, validate.Length(max=320)])
    name = _text(max_length=1000)
    billing_id = _text(max_length=100)


class MergeRequest(StrictSchema):
    kana_ids = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, MAX_ID)), required=True,
        validate=validate.Length(min=2, max=MAX_MERGE),
    )


class UsageQuery(StrictSchema):
    feature = _text(required=True, max_length=100)
    start = fields.AwareDateTime(data_key="from", load_default=None, default_timezone=UTC,
                                 metadata={"description": "ISO-8601, inclusive"})
    end = fields.AwareDateTime(data_key="to", load_default=None, default_timezone=UTC,
                               metadata={"description": "ISO-8601, exclusive"})
    window = fields.String(load_default=None, validate=validate.OneOf(ledger.WINDOWS))


class TopUsageQuery(StrictSchema):
    feature = _text(required=True, max_length=100)
    start = fields.AwareDateTime(data_key="from", load_default=None, default_timezone=UTC)
    end = fields.AwareDateTime(data_key="to", load_default=None, default_timezone=UTC)
    limit = fields.Integer(load_default=10, validate=validate.Range(1, MAX_LIMIT))


class FeatureCreate(StrictSchema):
    id = fields.String(required=True, validate=validate.Regexp(features.SLUG.pattern + r"\Z", error=(
        "Must be a slug: 1-100 lower-case letters, digits, '_' or '-', starting with a letter or digit.")))
    name = _text(max_length=200)
    type = fields.String(load_default="consumable", validate=validate.OneOf(features.TYPES))


class FeatureUpdate(StrictSchema):
    name = _text(max_length=200)
    type = fields.String(load_default=None, validate=validate.OneOf(features.TYPES))


class FeatureDeleteQuery(StrictSchema):
    force = fields.Boolean(load_default=False,
                           metadata={"description": "also delete the feature's usage (its events become unmapped)"})


class EventListQuery(PageQuery):
    status = fields.String(load_default=None, validate=validate.OneOf(EVENT_STATUSES))
    user_id = _text(metadata={"description": "events of the user this user_id (or alias) resolves to"})


class WorkspaceUpdate(StrictSchema):
    name = fields.String(validate=[_no_nul, validate.Length(min=1, max=200)])
    billing_provider = fields.String(allow_none=True, validate=validate.OneOf(keys.BILLING_PROVIDERS))
    stripe_api_key = fields.String(allow_none=True, validate=[_no_nul, validate.Length(max=500)])
    chargebee_site = fields.String(allow_none=True, validate=[_no_nul, validate.Length(max=200)])
    chargebee_api_key = fields.String(allow_none=True, validate=[_no_nul, validate.Length(max=500)])


class KeyCreate(StrictSchema):
    scope = fields.String(required=True, validate=validate.OneOf(keys.SCOPES))
    name = _text(max_length=200)


def _stringify(messages: Any) -> Any:
    # Marshmallow keys list-item errors by index; JSON object keys are strings.
    if isinstance(messages, dict):
        return {str(k): _stringify(v) for k, v in messages.items()}
    if isinstance(messages, list):
        return [_stringify(m) for m in messages]
    return messages


def _first(messages: Any) -> str:
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        return f"item {key}: {_first(value)}" if isinstance(key, int) else _first(value)
    if isinstance(messages, list) and messages:
        return _first(messages[0])
    return str(messages)


def invalid(errors: dict[str, Any]) -> ApiError:
    """A 400 whose message names every offending field."""
    parts = [f"{'body' if field == '_schema' else field}: {_first(msgs)}" for field, msgs in errors.items()]
    return ApiError(400, "invalid_request", "Invalid request. " + "; ".join(parts), errors=_stringify(errors))


def field_error(field: str, message: str) -> ApiError:
    return invalid({field: [message]})


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def _load(schema: Schema, data: Any) -> dict[str, Any]:
    try:
        return schema.load(data)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise invalid(messages) from None


def _query(schema: Schema) -> dict[str, Any]:
    return _load(schema, request.args.to_dict(flat=True))


def _body(schema: Schema) -> dict[str, Any]:
    return _load(schema, json_object())


# --- authentication, helpers ----------------------------------------------------------


@bp.before_request
def _authenticate() -> None:
    if request.endpoint != "api.openapi":
        auth.require_admin()


def _runtime() -> Any:
    return current_app.extensions["kana"]


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


def _page(session: Session, stmt: Select, column: Any, args: dict[str, Any],
          *, descending: bool = False) -> tuple[list[Any], str | None]:
    """One keyset page of ``stmt`` ordered by the unique ``column``, and the cursor of the next."""
    after = decode_cursor(args.get("cursor"))
    if after is not None:
        stmt = stmt.where(column < after if descending else column > after)
    limit = args["limit"]
    stmt = stmt.order_by(column.desc() if descending else column.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(getattr(rows[-1], column.key))


def _id_or_404(value: int, what: str) -> int:
    if not 0 < value <= MAX_ID:
        raise not_found(f"No {what} {value} in this workspace.")
    return value


def _user(session: Session, workspace_id: int, kana_id: int) -> User:
    _id_or_404(kana_id, "user with kana_id")
    user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        raise not_found(f"No user with kana_id {kana_id} in this workspace.")
    return user


def _feature(session: Session, workspace_id: int, feature_id: str, field: str | None = None) -> Any:
    # Anything but a slug cannot be a feature id (and may not even be storable text).
    valid = features.SLUG.fullmatch(feature_id) is not None
    feature = features.get_feature(session, workspace_id, feature_id) if valid else None
    if feature is None:
        raise ApiError(404, "not_found", f"No feature {feature_id!r} in this workspace.",
                       errors={field: ["Unknown feature."]} if field else None)
    return feature


def _check_range(args: dict[str, Any]) -> None:
    if args["start"] is not None and args["end"] is not None and args["end"] <= args["start"]:
        raise field_error("to", "Must be later than 'from'.")


# --- users ----------------------------------------------------------------------


def _user_filters(session: Session, workspace_id: int, args: dict[str, Any]) -> list[Any]:
    conditions: list[Any] = [User.workspace_id == workspace_id]
    if args["user_id"] is not None:
        found = identity.find_user(session, workspace_id, args["user_id"])
        conditions.append(User.kana_id == found.kana_id if found is not None else false())
    if args["email"] is not None:
        conditions.append(User.email_key == identity.email_key(args["email"]))
    if args["q"]:
        needle = args["q"].strip().lower()
        conditions.append(or_(
            func.lower(User.user_id).contains(needle, autoescape=True),
            User.email_key.contains(needle, autoescape=True),
            func.lower(User.name).contains(needle, autoescape=True),
        ))
    if args["flag"] is not None:
        # The refreshed flag set, so the list matches the counts GET /flags reports.
        conditions.append(User.kana_id.in_(flags.flagged_user_ids_query(workspace_id, args["flag"])))
    return conditions


@bp.get("/users")
def list_users() -> ResponseReturnValue:
    args = _query(UserListQuery())
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        stmt = select(User).where(*_user_filters(s, ws, args))
        users, cursor = _page(s, stmt, User.kana_id, args)
        body = {"users": [user_json(u) for u in users], "next_cursor": cursor}
    return jsonify(body)


@bp.post("/users")
def create_user() -> ResponseReturnValue:
    data = _body(UserCreate())
    if data["user_id"] is not None:
        try:
            _user_id_field(data["user_id"])
        except ValidationError as exc:
            raise invalid({"user_id": exc.messages}) from None
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        workspace = s.get(Workspace, ws)
        billing_id = data["billing_id"] or None
        provider = None
        if billing_id is not None:
            why = check_billing_id(billing_id, workspace.billing_provider)
            if why:
                raise field_error("billing_id", why[0].upper() + why[1:] + ".")
            provider = provider_of(billing_id, workspace.billing_provider)
        try:
            user = identity.create_user(
                s, ws, user_id=data["user_id"] or None, email=data["email"], name=data["name"],
                billing_id=billing_id, billing_provider=provider, source="api",
            )
        except identity.Conflict as exc:
            raise ApiError(409, "conflict", str(exc), errors={"user_id": [str(exc)]}) from None
        except IntegrityError:
            # The same user_id created concurrently: the unique constraint caught it.
            raise ApiError(409, "conflict", f"user_id {data['user_id']!r} is already in use in this workspace",
                           errors={"user_id": ["Already in use."]}) from None
        body = user_json(user, aliases=[])
    return jsonify(body), 201, {"Location": url_for("api.get_user", kana_id=body["kana_id"])}


@bp.get("/users/<int:kana_id>")
def get_user(kana_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        user = _user(s, ws, kana_id)
        body = user_json(user, identity.aliases_of(s, ws, kana_id))
    return jsonify(body)


@bp.post("/users/merge")
def merge_users() -> ResponseReturnValue:
    data = _body(MergeRequest())
    ids = list(dict.fromkeys(data["kana_ids"]))
    if len(ids) < 2:
        raise field_error("kana_ids", "Needs at least two distinct kana_ids.")
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        users = list(s.scalars(select(User).where(User.workspace_id == ws, User.kana_id.in_(ids))))
        missing = sorted(set(ids) - {u.kana_id for u in users})
        if missing:
            raise ApiError(404, "not_found", f"No user with kana_id {', '.join(map(str, missing))} in this workspace.",
                           errors={"kana_ids": [f"Unknown kana_id {m}." for m in missing]})
        try:
            survivor = identity.merge(s, ws, users, trigger="api", actor=auth.actor())
        except ValueError as exc:  # identity.Conflict included: a user merged away meanwhile
            raise ApiError(409, "conflict", str(exc)) from None
        body = user_json(survivor, identity.aliases_of(s, ws, survivor.kana_id))
    return jsonify(body)


@bp.delete("/users/<int:kana_id>")
def delete_user(kana_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    _id_or_404(kana_id, "user with kana_id")
    with SessionLocal.begin() as s:
        if not identity.delete_users(s, ws, [kana_id], trigger="api", actor=auth.actor()):
            raise not_found(f"No user with kana_id {kana_id} in this workspace.")
    return "", 204


# --- usage ----------------------------------------------------------------------


def _series_range(session: Session, ws: int, kana_id: int, feature_id: str,
                  args: dict[str, Any]) -> tuple[datetime, datetime]:
    """The series' range: as given, else from the first usage up to now (or the last usage).

    Open ends follow the data so that the series adds up to the total.
    """
    start, end = args["start"], args["end"]
    if start is not None and end is not None:
        return start, end
    first, last = ledger.span(session, ws, kana_id, feature_id, start, end)
    now = datetime.now(UTC)
    if end is None:
        end = now
        if last is not None:
            end = max(now, ledger.step(ledger.floor(last, args["window"]), args["window"]))
    if start is None:
        start = ledger.floor(first, args["window"]) if first is not None else end
    return start, end


@bp.get("/users/<int:kana_id>/usage")
def user_usage(kana_id: int) -> ResponseReturnValue:
    args = _query(UsageQuery())
    _check_range(args)
    ws = auth.workspace_id()
    feature_id = args["feature"]
    with SessionLocal.begin() as s:
        _user(s, ws, kana_id)
        _feature(s, ws, feature_id, "feature")
        body: dict[str, Any] = {
            "feature": feature_id,
            "kana_id": kana_id,
            "from": iso(args["start"]),
            "to": iso(args["end"]),
            "total": amount(ledger.total(s, ws, kana_id, feature_id, args["start"], args["end"])),
        }
        if args["window"] is not None:
            start, end = _series_range(s, ws, kana_id, feature_id, args)
            try:
                points = ledger.series(s, ws, kana_id, feature_id, start, end, args["window"])
            except ValueError as exc:
                raise field_error("window", f"{exc}; use a coarser window or a shorter from/to range.") from None
            body["window"] = args["window"]
            body["series"] = [{"start": p["start"], "total": amount(p["total"])} for p in points]
    return jsonify(body)


@bp.get("/usage")
def top_usage() -> ResponseReturnValue:
    args = _query(TopUsageQuery())
    _check_range(args)
    ws = auth.workspace_id()
    feature_id = args["feature"]
    with SessionLocal.begin() as s:
        _feature(s, ws, feature_id, "feature")
        total = ledger.total(s, ws, None, feature_id, args["start"], args["end"])
        top = ledger.top_users(s, ws, feature_id, args["start"], args["end"], args["limit"])
        body = {
            "feature": feature_id,
            "from": iso(args["start"]),
            "to": iso(args["end"]),
            "total": amount(total),
            "users": [{**row, "total": amount(row["total"])} for row in top],
        }
    return jsonify(body)


# --- features --------------------------------------------------------------------


def _feature_error(exc: features.FeatureError) -> ApiError:
    if isinstance(exc, features.DuplicateFeature):
        return ApiError(409, "conflict", exc.message, errors={exc.field: [exc.message]})
    return field_error(exc.field, exc.message)


@bp.post("/features")
def create_feature() -> ResponseReturnValue:
    data = _body(FeatureCreate())
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        try:
            feature = features.create_feature(s, ws, data["id"], data["name"], data["type"])
        except features.FeatureError as exc:
            raise _feature_error(exc) from None
        body = feature_json(feature)
    # Events stored as "unknown featureId" for this id now map (SPEC §7): reprocess them.
    body.update(api_rules.reprocess_job(ws, f"feature {body['id']} created"))
    return jsonify(body), 201, {"Location": url_for("api.get_feature", feature_id=body["id"])}


@bp.get("/features")
def list_features() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        body = {"features": [feature_json(f) for f in features.list_features(s, auth.workspace_id())]}
    return jsonify(body)


@bp.get("/features/<feature_id>")
def get_feature(feature_id: str) -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        body = feature_json(_feature(s, auth.workspace_id(), feature_id))
    return jsonify(body)


@bp.patch("/features/<feature_id>")
def update_feature(feature_id: str) -> ResponseReturnValue:
    data = _body(FeatureUpdate())
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        _feature(s, ws, feature_id)
        try:
            feature = features.update_feature(s, ws, feature_id, name=data["name"], type=data["type"])
        except features.FeatureError as exc:
            raise _feature_error(exc) from None
        body = feature_json(feature)
    return jsonify(body)


@bp.delete("/features/<feature_id>")
def delete_feature(feature_id: str) -> ResponseReturnValue:
    args = _query(FeatureDeleteQuery())
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        _feature(s, ws, feature_id)
        try:
            features.delete_feature(s, ws, feature_id, force=args["force"])
        except features.FeatureInUse as exc:
            raise ApiError(409, "conflict", f"{exc}: add ?force=true.") from None
    return "", 204


# --- events ------------------------------------------------------------------------


@bp.get("/events")
def list_events() -> ResponseReturnValue:
    args = _query(EventListQuery())
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        user = identity.find_user(s, ws, args["user_id"]) if args["user_id"] is not None else None
        if args["status"] == "failed":
            # Failed calls never became events: they are dead letters, kept by user_id.
            stmt = select(DeadLetter).where(DeadLetter.workspace_id == ws)
            if args["user_id"] is not None:
                names = {args["user_id"]}
                if user is not None:
                    names.update(identity.aliases_of(s, ws, user.kana_id))
                    if user.user_id:
                        names.add(user.user_id)
                stmt = stmt.where(DeadLetter.user_id.in_(sorted(names)))
            rows, cursor = _page(s, stmt, DeadLetter.id, args, descending=True)
            items = [dead_letter_json(r) for r in rows]
        else:
            stmt = select(Event).where(Event.workspace_id == ws)
            if args["status"] is not None:
                stmt = stmt.where(Event.status == args["status"])
            if args["user_id"] is not None:
                stmt = stmt.where(Event.kana_id == user.kana_id if user is not None else false())
            rows, cursor = _page(s, stmt, Event.id, args, descending=True)
            items = [event_json(r) for r in rows]
        body = {"events": items, "next_cursor": cursor}
    return jsonify(body)


@bp.post("/events/failed/<int:dead_letter_id>/retry")
def retry_dead_letter(dead_letter_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    runtime = _runtime()
    _id_or_404(dead_letter_id, "failed event")
    try:
        with SessionLocal.begin() as s:
            done = processor.requeue(s, runtime.redis, runtime.settings.partitions, ws, dead_letter_id)
    except processor.NotRetryable as exc:
        raise ApiError(409, "not_retryable", str(exc)) from None
    except RedisError as exc:
        raise unavailable(exc) from None
    if done is None:
        raise not_found(f"No failed event {dead_letter_id} in this workspace.")
    try:
        runtime.enqueue_drains(done.partitions)
    except RedisError as exc:
        # The call is queued; the recovery job wakes stranded partitions.
        log.warning("requeued %s but could not enqueue its drain: %s", done.message_id, exc)
    message_id = done.message_id
    return jsonify({"requeued": True, "message_id": message_id}), 202


# --- stats, jobs ----------------------------------------------------------------------


@bp.get("/stats")
def stats() -> ResponseReturnValue:
    ws = auth.workspace_id()
    try:
        counters = spool.workspace_counters(_runtime().redis, ws)
    except RedisError as exc:
        raise unavailable(exc) from None
    with SessionLocal.begin() as s:
        processed = s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws)) or 0
        failed = s.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.workspace_id == ws)) or 0
    return jsonify({
        "events_received": counters.get("received", 0),
        "events_processed": processed,
        "events_pending": max(0, counters.get("pending", 0)),
        "events_failed": failed,
    })


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> ResponseReturnValue:
    try:
        job = jobstate.workspace_job(_runtime().redis, job_id, auth.workspace_id())
    except RedisError as exc:
        raise unavailable(exc) from None
    if job is None:
        raise not_found(f"No job {job_id!r} (unknown, another workspace's, or its result has expired).")
    state = jobstate.describe(job)
    fields_ = ("id", "status", "progress", "result", "error", "enqueued_at", "ended_at")
    return jsonify({k: state[k] for k in fields_ if k in state})


# --- workspace, audit, keys -------------------------------------------------------------


@bp.get("/workspace")
def get_workspace() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        body = workspace_json(s.get(Workspace, auth.workspace_id()))
    return jsonify(body)


@bp.patch("/workspace")
def update_workspace() -> ResponseReturnValue:
    data = _body(WorkspaceUpdate())
    with SessionLocal.begin() as s:
        row = s.get(Workspace, auth.workspace_id())
        for field, value in data.items():
            if isinstance(value, str):
                value = value.strip() or None
            if field == "name" and value is None:
                raise field_error("name", "Must not be blank.")
            setattr(row, field, value)
        body = workspace_json(row)
    # Cached principals carry billing_provider: drop them so the receiver
    # validates billing ids against the new setting at once.
    auth.clear_cache()
    return jsonify(body)


@bp.get("/audit")
def list_audit() -> ResponseReturnValue:
    args = _query(PageQuery())
    with SessionLocal.begin() as s:
        stmt = select(Audit).where(Audit.workspace_id == auth.workspace_id())
        rows, cursor = _page(s, stmt, Audit.id, args, descending=True)
        body = {"audit": [audit_json(r) for r in rows], "next_cursor": cursor}
    return jsonify(body)


@bp.get("/keys")
def list_keys() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        body = {"keys": [key_json(k) for k in keys.list_keys(s, auth.workspace_id())]}
    return jsonify(body)


@bp.post("/keys")
def create_key() -> ResponseReturnValue:
    data = _body(KeyCreate())
    with SessionLocal.begin() as s:
        row, plain = keys.create_key(s, auth.workspace_id(), data["scope"], name=data["name"])
        # The only time the key is shown: it is stored hashed.
        body = {**key_json(row), "api_key": plain}
    return jsonify(body), 201


@bp.delete("/keys/<int:key_id>")
def revoke_key(key_id: int) -> ResponseReturnValue:
    _id_or_404(key_id, "API key")
    with SessionLocal.begin() as s:
        if not keys.revoke_key(s, auth.workspace_id(), key_id, redis=current_app.extensions["kana"].redis):
            raise not_found(f"No API key {key_id} in this workspace.")
    auth.clear_cache()  # effective at once in this process, within the cache TTL elsewhere
    return "", 204


# --- OpenAPI ------------------------------------------------------------------------------


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    from kana.api import openapi as document

    return jsonify(document.spec_dict())

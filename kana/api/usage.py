"""Usage (SPEC §5, §10): a user's total and series of a feature, and a feature's top users."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy.orm import Session

from kana import auth
from kana.api.common import MAX_LIMIT, StrictSchema, bp, doc, query, text
from kana.api.users import user_or_404
from kana.db import SessionLocal
from kana.domain import features, ledger
from kana.errors import NotFound, field_error
from kana.serializers import UsageOut, amount, iso
from kana.services import features as feature_actions


class UsageQuery(StrictSchema):
    feature = text(required=True, max_length=100)
    start = fields.AwareDateTime(data_key="from", load_default=None, default_timezone=UTC,
                                 metadata={"description": "ISO-8601, inclusive"})
    end = fields.AwareDateTime(data_key="to", load_default=None, default_timezone=UTC,
                               metadata={"description": "ISO-8601, exclusive"})
    window = fields.String(load_default=None, validate=validate.OneOf(ledger.WINDOWS))


class TopUsageQuery(StrictSchema):
    feature = text(required=True, max_length=100)
    start = fields.AwareDateTime(data_key="from", load_default=None, default_timezone=UTC)
    end = fields.AwareDateTime(data_key="to", load_default=None, default_timezone=UTC)
    limit = fields.Integer(load_default=10, validate=validate.Range(1, MAX_LIMIT))


class TopUser(Schema):
    kana_id = fields.Integer(required=True)
    user_id = fields.String(allow_none=True, required=True)
    total = fields.Float(required=True)


class TopUsageOut(Schema):
    feature = fields.String(required=True)
    total = fields.Float(required=True)
    users = fields.List(fields.Nested(TopUser), required=True)


def _usage_query(schema: type[Schema]) -> dict[str, Any]:
    """The query of a usage endpoint, its from/to range checked."""
    args = query(schema)
    if args["start"] is not None and args["end"] is not None and args["end"] <= args["start"]:
        raise field_error("to", "Must be later than 'from'.")
    return args


def _feature_exists(session: Session, workspace_id: int, feature_id: str) -> None:
    try:
        feature_actions.require(session, workspace_id, feature_id)
    except features.FeatureNotFound as exc:
        raise NotFound(exc.message, {"feature": ["Unknown feature."]}) from None


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


@bp.get("/users/<id:kana_id>/usage")
@doc("getUserUsage", "A user's usage of a feature: total and series", query=UsageQuery, response=UsageOut)
def user_usage(kana_id: int) -> ResponseReturnValue:
    args = _usage_query(UsageQuery)
    ws, feature_id = auth.workspace_id(), args["feature"]
    with SessionLocal.begin() as s:
        user_or_404(s, ws, kana_id)
        _feature_exists(s, ws, feature_id)
        result: dict[str, Any] = {
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
            result["window"] = args["window"]
            result["series"] = [{"start": p["start"], "total": amount(p["total"])} for p in points]
    return jsonify(result)


@bp.get("/usage")
@doc("topUsage", "Top users of a feature", query=TopUsageQuery, response=TopUsageOut)
def top_usage() -> ResponseReturnValue:
    args = _usage_query(TopUsageQuery)
    ws, feature_id = auth.workspace_id(), args["feature"]
    with SessionLocal.begin() as s:
        _feature_exists(s, ws, feature_id)
        total = ledger.total(s, ws, None, feature_id, args["start"], args["end"])
        top = ledger.top_users(s, ws, feature_id, args["start"], args["end"], args["limit"])
        result = {
            "feature": feature_id,
            "from": iso(args["start"]),
            "to": iso(args["end"]),
            "total": amount(total),
            "users": [{**row, "total": amount(row["total"])} for row in top],
        }
    return jsonify(result)

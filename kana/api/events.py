"""Stored events and dead letters (SPEC §3, §10): list by status or user, retry a failed call, counters."""

from __future__ import annotations

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy import false, func, select

from kana import auth
from kana.api.common import PageQuery, bp, doc, page, query, text
from kana.db import SessionLocal
from kana.domain import identity
from kana.ingest import spool
from kana.models import DeadLetter, Event
from kana.runtime import current
from kana.serializers import DeadLetterOut, EventOut, dead_letter_json, event_json
from kana.services import events as event_actions

EVENT_STATUSES = ("unmapped", "mapped", "processed", "failed")


class EventListQuery(PageQuery):
    status = fields.String(load_default=None, validate=validate.OneOf(EVENT_STATUSES))
    user_id = text(metadata={"description": "events of the user this user_id (or alias) resolves to"})


class EventPage(Schema):
    events = fields.List(fields.Raw(metadata={"oneOf": [{"$ref": "#/components/schemas/Event"},
                                                        {"$ref": "#/components/schemas/DeadLetter"}]}),
                         required=True)
    next_cursor = fields.String(allow_none=True, required=True)


class Requeued(Schema):
    requeued = fields.Boolean(required=True)
    message_id = fields.String()


class Stats(Schema):
    events_received = fields.Integer(required=True)
    events_processed = fields.Integer(required=True)
    events_pending = fields.Integer(required=True)
    events_failed = fields.Integer(required=True)


# Named in the document, for EventPage's oneOf.
COMPONENTS = {"Event": EventOut, "DeadLetter": DeadLetterOut}


@bp.get("/events")
@doc("listEvents", "Stored events by status; status=failed lists dead letters", query=EventListQuery,
     response=EventPage)
def list_events() -> ResponseReturnValue:
    args = query(EventListQuery)
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
            rows, cursor = page(s, stmt, DeadLetter.id, args, descending=True)
            items = [dead_letter_json(r) for r in rows]
        else:
            stmt = select(Event).where(Event.workspace_id == ws)
            if args["status"] is not None:
                stmt = stmt.where(Event.status == args["status"])
            if args["user_id"] is not None:
                stmt = stmt.where(Event.kana_id == user.kana_id if user is not None else false())
            rows, cursor = page(s, stmt, Event.id, args, descending=True)
            items = [event_json(r) for r in rows]
        result = {"events": items, "next_cursor": cursor}
    return jsonify(result)


@bp.post("/events/failed/<id:dead_letter_id>/retry")
@doc("retryFailedEvent", "Requeue a failed call", status=202, response=Requeued)
def retry_dead_letter(dead_letter_id: int) -> ResponseReturnValue:
    message_id = event_actions.retry_dead_letter(current(), auth.workspace_id(), dead_letter_id)
    return jsonify({"requeued": True, "message_id": message_id}), 202


@bp.get("/stats")
@doc("getStats", "Event counters of the workspace", response=Stats)
def stats() -> ResponseReturnValue:
    ws = auth.workspace_id()
    counters = spool.workspace_counters(current().redis, ws)
    with SessionLocal.begin() as s:
        processed = s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws)) or 0
        failed = s.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.workspace_id == ws)) or 0
    return jsonify({
        "events_received": counters.get("received", 0),
        "events_processed": processed,
        "events_pending": max(0, counters.get("pending", 0)),
        "events_failed": failed,
    })

"""The workspace's webhook (SPEC §10, §11): URL and secret, deliveries, retries."""

from __future__ import annotations

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import fields, validate

from kana import auth
from kana.api.common import PageQuery, StrictSchema, body, bp, decode_cursor, doc, encode_cursor, query
from kana.domain.webhooks import MAX_URL
from kana.runtime import current
from kana.serializers import DELIVERY_STATUSES, DeliveryPage, DeliveryRetried, WebhookOut
from kana.services import webhooks as webhook_actions

REQUIRED = "is required (an http or https URL)"


class WebhookIn(StrictSchema):
    url = fields.String(required=True, validate=validate.Length(1, MAX_URL),
                        error_messages={"required": REQUIRED, "null": REQUIRED},
                        metadata={"description": "http(s); private addresses refused unless allowed (SSRF)"})


class DeliveriesQuery(PageQuery):
    status = fields.String(load_default=None, validate=validate.OneOf(DELIVERY_STATUSES))


@bp.put("/webhook")
@doc("setWebhook", "Set the webhook URL; answers a new signing secret (shown once; every PUT rotates it)",
     body=WebhookIn, response=WebhookOut, errors=(400, 401, 403))
def set_webhook() -> ResponseReturnValue:
    data = body(WebhookIn)
    return jsonify(webhook_actions.set_url(current(), auth.workspace_id(), data["url"]))


@bp.get("/webhook/deliveries")
@doc("listWebhookDeliveries", "Deliveries, newest first", query=DeliveriesQuery, response=DeliveryPage,
     errors=(400, 401, 403))
def list_deliveries() -> ResponseReturnValue:
    args = query(DeliveriesQuery)
    rows, after = webhook_actions.deliveries(auth.workspace_id(), before=decode_cursor(args["cursor"]),
                                             limit=args["limit"], status=args["status"])
    return jsonify({"deliveries": rows, "next_cursor": encode_cursor(after) if after is not None else None})


@bp.post("/webhook/deliveries/<id:delivery_id>/retry")
@doc("retryWebhookDelivery", "Send a delivery again now", status=202, response=DeliveryRetried,
     errors=(401, 403, 404))
def retry_delivery(delivery_id: int) -> ResponseReturnValue:
    return jsonify(webhook_actions.retry(current(), auth.workspace_id(), delivery_id)), 202

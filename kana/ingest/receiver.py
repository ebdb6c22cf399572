"""The Segment receiver: validate calls, queue them to Redis, answer fast.

No database work happens per call (API keys are cached by ``kana.auth``): a
request is read, parsed, validated and pushed to Redis in one MULTI/EXEC, and
only then answered 200. Anything that keeps the push from succeeding answers
503, which Segment retries; redelivered calls carry the same messageId (or get
the same derived one), so the workers' dedup makes a retry harmless.

Decisions where the spec leaves room:

* A batch item over the per-call size limit is rejected on its own (listed in
  ``rejected`` with code ``payload_too_large``); the other items go through. A
  batch whose every item is rejected answers 400, or 413 when all of them were
  rejected for size. The request body limit and item count limit are 413 for
  the whole request.
* A per-type endpoint (``/v1/track``) takes its type from the URL; a ``type``
  in the body that says otherwise is a 400 rather than silently reinterpreted.
* ``type`` is matched case-insensitively; unknown types answer 501 for a single
  call and are rejected items in a batch or array.
* An empty batch or array answers 400 (there is nothing valid in it).
* A call's size is its body's size on the single-call endpoints, and in a batch
  or array the size of its compact UTF-8 JSON (only measured when the whole
  body is over the per-call limit: otherwise no call in it can be).
* The key in ``Authorization`` wins over any ``writeKey``; without a header, the
  envelope's ``writeKey`` is used, else the first one found in the items.
* A missing or null messageId gets ``kana-`` + sha256 of the call's canonical
  JSON (sorted keys, compact), without ``sentAt``/``writeKey``/``receivedAt``,
  with ``type`` set to the resolved type and the batch's context/integrations
  merged in, so the same call gets the same id whichever endpoint it came by.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request
from marshmallow import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kana import metrics, runtime
from kana.auth import authenticate
from kana.domain.keys import Principal
from kana.errors import ApiError
from kana.ingest import spool
from kana.ingest.schemas import (
    BATCH,
    CALL_TYPES,
    SCHEMAS,
    SUSPICIOUS_ESCAPE,
    billing_errors,
    describe,
    flatten,
    load_call,
    scan,
)

bp = Blueprint("receiver", __name__)

# Fields that differ between deliveries of the same call, or are credentials.
_NOT_HASHED = frozenset({"sentAt", "writeKey", "receivedAt", "messageId", "message_id"})
_TYPES_TEXT = ", ".join(CALL_TYPES)
_READ_CHUNK = 64 * 1024


class _Request:
    """What every call of one request shares."""

    __slots__ = ("principal", "received_at", "max_depth", "max_call_bytes", "check_strings", "measure", "envelope")

    def __init__(self, principal: Principal, raw_text: str, measure: bool, envelope: dict | None = None) -> None:
        settings = runtime.current().settings
        self.principal = principal
        self.received_at = datetime.now(UTC).isoformat()
        self.max_depth = settings.max_depth
        self.max_call_bytes = settings.max_call_bytes
        self.check_strings = SUSPICIOUS_ESCAPE.search(raw_text) is not None
        # When the whole body fits the per-call limit no call in it can exceed it.
        self.measure = measure
        self.envelope = envelope


# -- reading the body ---------------------------------------------------------


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"{what} is larger than the limit of {limit:,} bytes.")


def _read_body(limit: int) -> bytes:
    """The request body, decompressed, never reading or inflating more than ``limit`` + 1 bytes."""
    encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        wbits: int | None = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    elif encoding in ("identity", ""):
        wbits = None
    else:
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip.")
    what = "The request body" if wbits is None else "The compressed request body"
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(what, limit)
    stream = request.stream
    chunks: list[bytes] = []
    remaining = limit + 1
    while remaining > 0:
        chunk = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    data = b"".join(chunks)
    if len(data) > limit:
        raise _too_large(what, limit)
    if wbits is None:
        return data
    return _inflate(data, wbits, limit)


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    # Bounded output per step: a few KB of gzip can inflate to gigabytes.
    out: list[bytes] = []
    size = 0
    try:
        while True:
            inflater = zlib.decompressobj(wbits)
            piece = inflater.decompress(data, limit + 1 - size)
            size += len(piece)
            out.append(piece)
            if size > limit or inflater.unconsumed_tail:
                raise _too_large("The decompressed request body", limit)
            if not inflater.eof:
                raise ApiError(400, "invalid_encoding", "The compressed request body is truncated.")
            # gzip allows several members back to back; each is a fresh stream.
            data = inflater.unused_data
            if not data.strip(b"\0"):
                break
    except zlib.error as exc:
        raise ApiError(400, "invalid_encoding", f"The request body is not valid {'gzip' if wbits > 15 else 'deflate'} "
                       f"data ({exc}).") from None
    return b"".join(out)


def _parse(data: bytes) -> tuple[Any, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", f"The request body is not UTF-8 (byte {exc.start}).") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text or text.isspace():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        return json.loads(text), text
    except RecursionError:
        raise ApiError(400, "invalid_call", "The body is nested too deeply.") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}.") from None


def _principal(body: Any) -> Principal:
    if isinstance(body, list) or (isinstance(body, dict) and not isinstance(body.get("writeKey"), str)):
        # Libraries that put the key in each call rather than in the envelope.
        items = body if isinstance(body, list) else body.get("batch")
        if isinstance(items, list) and "Authorization" not in request.headers:
            key = next((i["writeKey"] for i in items if isinstance(i, dict) and isinstance(i.get("writeKey"), str)),
                       None)
            body = {"writeKey": key}
    try:
        return authenticate(body, scope="ingest")
    except (DBAPIError, PoolTimeout):
        # The key cache missed and the database is down: Segment should retry.
        raise ApiError(503, "unavailable", "Cannot check the API key right now; retry later.") from None


# -- one call -----------------------------------------------------------------


def _message_id_of(call: Any) -> str | None:
    for name in ("messageId", "message_id"):
        value = call.get(name) if isinstance(call, dict) else None
        if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
            return str(value)
    return None


def derive_message_id(call: dict, kind: str, envelope: dict | None = None) -> str:
    """A deterministic messageId: the hash of the call's canonical JSON.

    Envelope context/integrations are merged in first, so a call reads the same
    whether it came alone or in a batch that factored its context out.
    """
    doc = {k: v for k, v in call.items() if k not in _NOT_HASHED}
    doc["type"] = kind
    if envelope:
        for key in ("context", "integrations"):
            shared = envelope.get(key)
            if shared:
                doc[key] = {**shared, **(doc.get(key) or {})}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "kana-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _resolve_type(call: dict, url_type: str | None) -> str:
    raw = call.get("type")
    if url_type is not None:
        if raw is not None and (not isinstance(raw, str) or raw.lower() != url_type):
            raise ApiError(400, "invalid_call", f"Invalid {url_type} call: type {raw!r} in the body conflicts with "
                           f"the /v1/{url_type} endpoint.", {"type": [f"must be {url_type!r} (or absent)"]})
        return url_type
    if raw is None:
        raise ApiError(400, "invalid_call", f"Invalid call: type is required (one of {_TYPES_TEXT}).",
                       {"type": ["is required"]})
    if not isinstance(raw, str):
        raise ApiError(400, "invalid_call", "Invalid call: type must be a string.", {"type": ["must be a string"]})
    kind = raw.lower()
    if kind not in SCHEMAS:
        raise ApiError(501, "unsupported_type", f"Unsupported call type {raw!r}: Kana accepts {_TYPES_TEXT}.",
                       {"type": [f"must be one of {_TYPES_TEXT}"]})
    return kind


def _invalid(kind: str, errors: dict[str, list[str]]) -> ApiError:
    return ApiError(400, "invalid_call", f"Invalid {kind} call: {describe(errors)}", errors)


def _normalize(call: Any, url_type: str | None, req: _Request) -> dict:
    """The queued event for one call, or ApiError saying what is wrong with it."""
    if type(call) is not dict:
        raise ApiError(400, "invalid_call", "Invalid call: each call must be a JSON object.",
                       {"_call": ["must be a JSON object"]})
    kind = _resolve_type(call, url_type)
    problem = scan(call, req.max_depth, req.check_strings)
    if problem is not None:
        raise _invalid(kind, {problem[0] or "_call": [problem[1]]})
    if req.measure:
        encoded = json.dumps(call, separators=(",", ":"), ensure_ascii=False)
        if len(encoded) * 4 > req.max_call_bytes and len(encoded.encode("utf-8")) > req.max_call_bytes:
            raise ApiError(413, "payload_too_large", f"This {kind} call is larger than the limit of "
                           f"{req.max_call_bytes:,} bytes per call.", {"_call": ["is too large"]})
    try:
        data = load_call(kind, call)
    except ValidationError as exc:
        raise _invalid(kind, flatten(exc.messages)) from None
    if kind == "identify" and data.get("traits"):
        errors = billing_errors(data["traits"], req.principal.billing_provider)
        if errors:
            raise _invalid(kind, errors)
    received_at = req.received_at
    event = {
        "ws": req.principal.workspace_id,
        "type": kind,
        "messageId": data.get("messageId") or derive_message_id(call, kind, req.envelope),
        "userId": data["userId"],
        "timestamp": data.get("timestamp") or data.get("originalTimestamp") or received_at,
        "receivedAt": received_at,
    }
    if kind == "track":
        event["event"] = data["event"]
        event["properties"] = data.get("properties") or {}
    elif kind == "identify":
        event["traits"] = data.get("traits") or {}
    elif kind == "page" or kind == "screen":
        properties = data.get("properties") or {}
        name = data.get("name")
        if not name:
            # Some senders only put the page name in properties.
            fallback = properties.get("name")
            name = fallback if isinstance(fallback, str) and fallback else None
        event["name"] = name
        event["properties"] = properties
    elif kind == "group":
        event["groupId"] = data["groupId"]
        event["traits"] = data.get("traits") or {}
    elif kind == "alias":
        event["previousId"] = data["previousId"]
    return event


# -- queueing and answering ---------------------------------------------------


def _enqueue(events: list[dict]) -> None:
    rt = runtime.current()
    try:
        rt.enqueue_drains(spool.push(rt.redis, events, rt.settings.partitions))
    except (RedisError, OSError):
        # OSError: the embedded Redis server could not be reached or started.
        metrics.count_rejected("unavailable", len(events))
        raise ApiError(503, "unavailable", "The event queue is unreachable; nothing was accepted. Retry later.") \
            from None
    metrics.count_received(Counter(e["type"] for e in events))


def _single(call: Any, url_type: str | None, req: _Request) -> Response:
    try:
        event = _normalize(call, url_type, req)
    except ApiError as exc:
        metrics.count_rejected(exc.code)
        raise
    _enqueue([event])
    return jsonify({"success": True, "accepted": 1})


def _many(items: list, req: _Request, kind_of_list: str) -> Response:
    settings = runtime.current().settings
    if len(items) > settings.max_batch_items:
        metrics.count_rejected("payload_too_large")
        raise ApiError(413, "payload_too_large", f"The {kind_of_list} has {len(items):,} calls; the limit is "
                       f"{settings.max_batch_items:,} per request.")
    if not items:
        metrics.count_rejected("invalid_batch")
        raise ApiError(400, "invalid_batch", f"The {kind_of_list} is empty.", {"batch": ["must not be empty"]})
    events: list[dict] = []
    rejected: list[dict] = []
    for index, item in enumerate(items):
        try:
            events.append(_normalize(item, None, req))
        except ApiError as exc:
            rejected.append({"index": index, "messageId": _message_id_of(item), "code": exc.code,
                             "message": exc.message, "errors": exc.errors or {"_call": [exc.message]}})
    if rejected:
        for reason, n in Counter(r["code"] for r in rejected).items():
            metrics.count_rejected(reason, n)
    if not events:
        codes = {r["code"] for r in rejected}
        status, code = (413, "payload_too_large") if codes == {"payload_too_large"} else (400, "invalid_batch")
        errors = {f"batch.{r['index']}.{field}" if field != "_call" else f"batch.{r['index']}": msgs
                  for r in rejected for field, msgs in r["errors"].items()}
        first = rejected[0]
        raise ApiError(status, code, f"No call in the {kind_of_list} was accepted; the first (index "
                       f"{first['index']}): {first['message']}", errors) from None
    _enqueue(events)
    body: dict[str, Any] = {"success": True, "accepted": len(events)}
    if rejected:
        body["rejected"] = rejected
    return jsonify(body)


# -- endpoints ----------------------------------------------------------------


@bp.post("/v1/<any(identify, track, page, screen, group, alias):kind>")
def single_call(kind: str) -> Response:
    """One call of the Segment HTTP Tracking API; its type comes from the URL."""
    settings = runtime.current().settings
    try:
        data = _read_body(settings.max_call_bytes)
        body, text = _parse(data)
        principal = _principal(body)
    except ApiError as exc:
        metrics.count_rejected(exc.code)
        raise
    req = _Request(principal, text, measure=False)
    return _single(body, kind, req)


@bp.post("/v1/batch")
def batch() -> Response:
    """Segment's batch envelope, as the official libraries send it."""
    settings = runtime.current().settings
    try:
        data = _read_body(settings.max_batch_bytes)
        body, text = _parse(data)
        principal = _principal(body)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_batch", 'The body must be a JSON object: {"batch": [...]}.',
                           {"_call": ["must be a JSON object"]})
        try:
            envelope = BATCH.load(body)
        except ValidationError as exc:
            errors = flatten(exc.messages)
            raise ApiError(400, "invalid_batch", f"Invalid batch: {describe(errors)}", errors) from None
        for key in ("context", "integrations"):
            if envelope.get(key):
                problem = scan(envelope[key], settings.max_depth - 1, True)
                if problem is not None:
                    errors = {f"{key}.{problem[0]}" if problem[0] else key: [problem[1]]}
                    raise ApiError(400, "invalid_batch", f"Invalid batch: {describe(errors)}", errors)
    except ApiError as exc:
        metrics.count_rejected(exc.code)
        raise
    shared = {k: envelope[k] for k in ("context", "integrations") if envelope.get(k)}
    req = _Request(principal, text, measure=len(data) > settings.max_call_bytes, envelope=shared or None)
    return _many(envelope["batch"], req, "batch")


@bp.post("/segment")
def segment() -> Response:
    """What Segment's webhook/destination delivery sends: one call with a type, or an array of them."""
    settings = runtime.current().settings
    try:
        data = _read_body(settings.max_batch_bytes)
        body, text = _parse(data)
        principal = _principal(body)
        if isinstance(body, dict) and len(data) > settings.max_call_bytes:
            raise _too_large("The call", settings.max_call_bytes)
        if not isinstance(body, dict | list):
            raise ApiError(400, "invalid_call", "The body must be a JSON object (one call) or an array of calls.",
                           {"_call": ["must be a JSON object or array"]})
    except ApiError as exc:
        metrics.count_rejected(exc.code)
        raise
    if isinstance(body, dict):
        return _single(body, None, _Request(principal, text, measure=False))
    req = _Request(principal, text, measure=len(data) > settings.max_call_bytes)
    return _many(body, req, "array")

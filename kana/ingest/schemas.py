"""Marshmallow schemas for the Segment calls the receiver accepts.

One module-level instance per call type: building a schema costs far more than
validating with it, and instances hold no per-call state.

Every call schema EXCLUDEs unknown fields: Segment libraries and destinations add
fields freely (``anonymousId``, ``channel``, ``version``, ``projectId``...), and
rejecting them would make senders drop valid calls. Excluded fields are simply
not part of the event Kana queues. Fields Kana relies on are validated strictly.

Checks that need the whole document (nesting depth, NUL characters, non-finite
numbers) or the workspace (billing ids) live in :func:`scan` and
:func:`billing_errors`, which the receiver runs around ``schema.load``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields

from kana import errors
from kana.domain.billing import check_billing_id
from kana.domain.ids import MAX_EXTERNAL_ID, user_id_problem

CALL_TYPES = ("identify", "track", "page", "screen", "group", "alias", "delete")

# Numeric(28, 9) is where usage amounts end up; anything this large is a bug upstream.
MAX_DELTA = 1e18

ANONYMOUS = "is required: Kana drops anonymous calls (calls with only an anonymousId)"

# Field spellings senders use besides Segment's own camelCase.
ALIASES = (("user_id", "userId"), ("message_id", "messageId"), ("previous_id", "previousId"),
           ("group_id", "groupId"), ("anonymous_id", "anonymousId"))


class Id(fields.Field):
    """A user/message/group id: a string or a number (stored as a string), never blank or a placeholder."""

    default_error_messages = {
        "invalid": "must be a string or a number",
        "empty": "must not be empty or whitespace",
        "placeholder": "must be a real id, not the placeholder {value!r}",
        "too_long": "must be at most 1024 characters",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> str:
        if type(value) is str:
            text = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        else:
            raise self.make_error("invalid")
        problem = user_id_problem(text)
        if problem is not None:
            raise self.make_error(problem, value=text)
        if len(text) > MAX_EXTERNAL_ID:
            raise self.make_error("too_long")
        return text


class Timestamp(fields.Field):
    """An ISO-8601 date-time (``Z``, an offset, or naive = UTC), returned as a UTC isoformat string."""

    default_error_messages = {"invalid": "must be an ISO-8601 date-time, e.g. 2024-05-01T12:00:00Z"}

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            moment = datetime.fromisoformat(value)
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        except (ValueError, OverflowError):
            raise self.make_error("invalid") from None
        return moment.isoformat()


class Object(fields.Dict):
    """A JSON object (``null`` is accepted and treated as absent)."""

    default_error_messages = {"invalid": "must be an object"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_none=True, **kwargs)


class Properties(Object):
    """``properties`` of track/page/screen: ``delta`` and ``featureId`` feed the usage ledger."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> dict:
        result = super()._deserialize(value, attr, data, **kwargs)
        errors: dict[str, list[str]] = {}
        if "delta" in result:
            delta = result["delta"]
            if isinstance(delta, bool) or not isinstance(delta, int | float) or delta != delta:
                errors["delta"] = ["must be a finite number"]
            elif not -MAX_DELTA < delta < MAX_DELTA:
                errors["delta"] = ["must be a finite number between -1e18 and 1e18"]
        if "featureId" in result:
            feature = result["featureId"]
            if not isinstance(feature, str) or not feature.strip():
                errors["featureId"] = ["must be a non-empty string"]
        if errors:
            raise ValidationError(errors)
        return result


class NonEmptyString(fields.String):
    default_error_messages = {"invalid": "must be a string", "empty": "must be a non-empty string"}

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.strip():
            raise self.make_error("empty")
        return text


class CallSchema(Schema):
    """Fields every call type shares."""

    class Meta:
        unknown = EXCLUDE

    userId = Id(required=True, error_messages={"required": ANONYMOUS, "null": ANONYMOUS})
    # Absent or null: the receiver derives a deterministic one.
    messageId = Id(allow_none=True)
    timestamp = Timestamp(allow_none=True)
    originalTimestamp = Timestamp(allow_none=True)
    # Validated as objects but not queued: nothing downstream reads them.
    context = Object()
    integrations = Object()


class IdentifySchema(CallSchema):
    traits = Object()


class TrackSchema(CallSchema):
    event = NonEmptyString(required=True, error_messages={"required": "is required", "null": "is required"})
    properties = Properties()


class PageSchema(CallSchema):
    name = fields.String(allow_none=True, error_messages={"invalid": "must be a string"})
    properties = Properties()


class ScreenSchema(PageSchema):
    pass


class GroupSchema(CallSchema):
    groupId = Id(required=True, error_messages={"required": "is required", "null": "is required"})
    traits = Object()


class AliasSchema(CallSchema):
    previousId = Id(required=True, error_messages={"required": "is required", "null": "is required"})


class DeleteSchema(CallSchema):
    pass


class ListField(fields.Field):
    """A JSON array, kept as is: its items are validated one by one so each can fail alone."""

    default_error_messages = {"invalid": "must be an array of calls"}

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> list:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        return value


class BatchSchema(Schema):
    """The ``/v1/batch`` envelope."""

    class Meta:
        # Libraries add envelope fields of their own (e.g. ``metadata``); only these matter.
        unknown = EXCLUDE

    batch = ListField(required=True, error_messages={"required": "is required", "null": "is required"})
    context = Object()
    integrations = Object()
    writeKey = fields.String(allow_none=True, error_messages={"invalid": "must be a string"})
    sentAt = fields.Raw(allow_none=True)


SCHEMAS: dict[str, Schema] = {
    "identify": IdentifySchema(),
    "track": TrackSchema(),
    "page": PageSchema(),
    "screen": ScreenSchema(),
    "group": GroupSchema(),
    "alias": AliasSchema(),
    "delete": DeleteSchema(),
}
BATCH = BatchSchema()


def with_aliases(call: dict) -> dict:
    """The call with snake_case id fields (``user_id``...) under Segment's names.

    Done outside marshmallow: a ``pre_load`` hook costs about a fifth of a load,
    and almost no call needs it.
    """
    for alias, name in ALIASES:
        if alias in call and call.get(name) is None:
            call = {**call, name: call[alias]}
    return call


def load_call(kind: str, call: dict) -> dict:
    """Validate one call of type ``kind``; raises ``ValidationError``."""
    return SCHEMAS[kind].load(with_aliases(call))


# Marshmallow's nested error dict as ``{"properties.delta": ["..."]}``; a call-level problem is "_call".
flatten = partial(errors.flatten, root="_call")


def describe(errors: dict[str, list[str]]) -> str:
    """``properties.delta must be a finite number; userId is required``."""
    return "; ".join(f"{field} {msg}" if field != "_call" else msg for field, msgs in errors.items() for msg in msgs)


def billing_errors(traits: dict, provider: str | None) -> dict[str, list[str]] | None:
    """Errors for the billing id traits of an identify call, judged by the workspace's provider."""
    errors = None
    for name in ("billingUserId", "billingId"):
        value = traits.get(name)
        if value is None:
            continue
        problem = check_billing_id(value, provider)
        if problem:
            errors = errors or {}
            errors[f"traits.{name}"] = [problem]
    return errors


# A NUL or a lone surrogate can only come in through a \u escape in the raw JSON
# (strict JSON forbids raw control characters), so a cheap regex over the text
# decides whether the strings need looking at one by one.
SUSPICIOUS_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF])")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def _string_problem(text: str) -> str | None:
    match = _BAD_CHARS.search(text)
    if match is None:
        return None
    if match.group() == "\x00":
        return "must not contain the NUL character (\\u0000)"
    return "must not contain unpaired UTF-16 surrogates"


def scan(value: Any, max_depth: int, check_strings: bool) -> tuple[str, str] | None:
    """The first (path, problem) in a parsed object or array, or None.

    Finds nesting deeper than ``max_depth`` (the document itself is level 1),
    NaN/Infinity (which PostgreSQL's JSON cannot store either) and, when
    ``check_strings``, NUL characters and lone surrogates in keys and values.
    """
    found = _scan(value, max_depth, check_strings)
    if found is None:
        return None
    parts, problem = found
    if problem is _TOO_DEEP:
        problem = f"is nested too deeply (at most {max_depth} levels of objects and arrays)"
    # Keys are echoed back in the error body: keep what made them invalid readable.
    path = ".".join(p.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000") for p in reversed(parts))
    return path, problem


_TOO_DEEP = "too deep"


def _scan(value: dict | list, depth_left: int, check_strings: bool) -> tuple[list[str], str] | None:
    # Recursion is bounded by max_depth: the walk stops as soon as it is exceeded.
    items = value.items() if type(value) is dict else ((str(i), v) for i, v in enumerate(value))
    for key, item in items:
        if check_strings and type(key) is str:
            problem = _string_problem(key)
            if problem:
                return [key], f"(the key) {problem}"
        kind = type(item)
        if kind is dict or kind is list:
            if depth_left <= 1:
                return [key], _TOO_DEEP
            found = _scan(item, depth_left - 1, check_strings)
            if found is not None:
                found[0].append(key)
                return found
        elif kind is float:
            if item - item != 0:
                return [key], "must be a finite number (NaN and Infinity are not valid JSON)"
        elif check_strings and kind is str:
            problem = _string_problem(item)
            if problem:
                return [key], problem
    return None

"""One error model: every error a person can act on is a ``KanaError`` with a status, a code and a message.

Domain errors (``identity.Conflict``, ``features.FeatureError``, ``rules.RuleError``,
``processor.NotRetryable``, ``csvfile.CsvError``, ``customers.ImportFailed`` …)
subclass it, so the API, the dashboard and the CLI render them without knowing
them one by one: the API as ``{"code", "message", "errors"?}`` with the status
(``kana.api.common``), the dashboard as a flash message or an error page
(``kana.dashboard.common``), the CLI as a message and an exit code (``kana.cli``).
``classify`` is the one place where Redis and database outages become an
``Unavailable`` error. This module has no Flask or click dependency: domain code imports it.

Domain errors keep their built-in base too (``ValueError``, ``LookupError``):
the pipeline's processor tells a data problem (dead-letter the call) from an
outage by those.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)

QUEUE_DOWN = "The queue (Redis) is unreachable; retry shortly."
DATABASE_DOWN = "The database is unreachable; retry shortly."


class KanaError(Exception):
    """An error with an HTTP-like ``status``, a machine ``code`` and a sentence a person understands.

    ``errors`` maps field names to lists of problems when the error is about input.
    Subclasses set ``status`` and ``code`` as class attributes.
    """

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str = "", errors: dict[str, Any] | None = None, *,
                 status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    @property
    def text(self) -> str:
        """The whole sentence (a subclass may keep a shorter ``message`` for a form field)."""
        return str(self)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.text}
        if self.errors:
            body["errors"] = self.errors
        return body


class ApiError(KanaError):
    """An error only an HTTP surface raises (authentication, request shape): status and code given."""

    def __init__(self, status: int, code: str, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message, errors, status=status, code=code)


class NotFound(KanaError):
    status = 404
    code = "not_found"


class Conflict(KanaError):
    status = 409
    code = "conflict"


class Unavailable(KanaError):
    """Redis or the database cannot be reached: nothing was done that the message does not say; retry."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str = QUEUE_DOWN) -> None:
        super().__init__(message)


def classify(exc: BaseException) -> KanaError | None:
    """``exc`` as a ``KanaError`` when it is one or is an outage (Redis, database); None for a bug."""
    if isinstance(exc, KanaError):
        return exc
    if isinstance(exc, RedisError):
        log.warning("redis unavailable: %s", exc)
        return Unavailable(QUEUE_DOWN)
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        log.warning("database unavailable: %s", exc)
        return Unavailable(DATABASE_DOWN)
    return None


def invalid(errors: dict[str, Any], title: str = "Invalid request.") -> KanaError:
    """A 400 whose message names every offending field (``_schema`` is the body as a whole)."""
    parts = [f"{'body' if field == '_schema' else field}: {_first(msgs)}" for field, msgs in errors.items()]
    return KanaError(f"{title} " + "; ".join(parts), _stringify(errors))


def field_error(field: str, message: str) -> KanaError:
    return invalid({field: [message]})


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


def flatten(messages: Any, prefix: str = "", *, root: str = "_schema") -> dict[str, list[str]]:
    """Marshmallow's nested error dict as ``{"conditions.0.operator": [...]}``; ``root`` names the whole."""
    if isinstance(messages, dict):
        out: dict[str, list[str]] = {}
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten(value, path, root=root))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return {prefix or root: list(messages)}
    return {prefix or root: [str(messages)]}

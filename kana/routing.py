"""URL converters for the ids every surface takes in its paths, checked once, before any view runs.

``<id:name>`` is a database id: digits that fit a BIGINT primary key
(``kana.domain.ids.in_id_range``); ``<job:name>`` is an RQ job id (letters,
digits, ``_`` and ``-``, RQ's own rule). A path whose id has another shape or is
out of range is a 404 like an id that does not exist,
and never reaches the database (bigint overflow) or RQ (``ValueError``).
"""

from __future__ import annotations

from flask import Flask
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import BaseConverter

from kana.domain.ids import JOB_ID, MAX_ID, in_id_range


class IdConverter(BaseConverter):
    regex = rf"[0-9]{{1,{len(str(MAX_ID))}}}"
    part_isolating = True
    # What the OpenAPI document says a path id is.
    openapi = {"type": "integer", "minimum": 1, "maximum": MAX_ID}

    def to_python(self, value: str) -> int:
        number = int(value)
        if not in_id_range(number):
            # Not werkzeug's ValidationError: the matcher would then answer 405 when
            # the same path has routes for other methods (GET beside DELETE).
            raise NotFound(f"No such id: {value} is out of range.")
        return number

    def to_url(self, value: int) -> str:
        return str(int(value))


class JobIdConverter(BaseConverter):
    regex = JOB_ID
    part_isolating = True
    openapi = {"type": "string", "pattern": rf"^{JOB_ID}$"}


CONVERTERS = {"id": IdConverter, "job": JobIdConverter}


def install(app: Flask) -> None:
    """Make ``<id:…>`` and ``<job:…>`` available to the app's routes (before blueprints register)."""
    app.url_map.converters.update(CONVERTERS)


def error_headers(exc: HTTPException) -> list[tuple[str, str]]:
    """The headers an HTTP error carries besides its own body's type (405's ``Allow``, 401's
    ``WWW-Authenticate``, 429's ``Retry-After``): a custom error body must keep them."""
    return [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]

"""Keep-alive connections stay usable after an answer given without reading the request body.

A 413 for a body over the limit, a 401 for a bad key, a 415, a 404 … are
answered before (or without) reading what the client sent. The WSGI server
must skip that unread body before it can read the next request on the same
connection; gunicorn skips at most 64 KB and otherwise closes the connection,
after its response already said ``keep-alive``, so the client's next request on
it fails. So the app reads what is left itself, once, after every request
(bounded: ``DRAIN_MAX``), and answers ``Connection: close`` when it will not
(a larger body, a client that hung up): the next request goes on a new one.
"""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

# Far above every body the app accepts but the CSV upload (50 MB): reading the
# rest of an over-limit receiver batch is cheaper for everyone than a new connection.
DRAIN_MAX = 8 * 1024 * 1024
_CHUNK = 64 * 1024


def install(app: Flask) -> None:
    app.after_request(drain_unread_body)


def _has_body() -> bool:
    environ = request.environ
    # Most requests (every GET) have neither header: answered without building the header views.
    if not environ.get("CONTENT_LENGTH") and not environ.get("HTTP_TRANSFER_ENCODING"):
        return False
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def drain_unread_body(response: Response) -> Response:
    """Read (and drop) the part of the request body the view left unread, up to ``DRAIN_MAX``."""
    if not _has_body():
        return response
    if request.content_length is not None and request.content_length > DRAIN_MAX:
        response.headers["Connection"] = "close"
        return response
    left = DRAIN_MAX
    try:
        # A view that read the body (get_data, form, files) left the stream at its end.
        stream = request.stream
        while left > 0:
            chunk = stream.read(min(_CHUNK, left))
            if not chunk:
                return response
            left -= len(chunk)
    except (OSError, ValueError, HTTPException):  # the client hung up or sent a broken body
        pass
    response.headers["Connection"] = "close"
    return response

"""What every dashboard page shares: the login guard, CSRF, headers, errors and small helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFProtect
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from kana import errors
from kana.db import SessionLocal, read_only
from kana.domain import accounts
from kana.domain.ids import MAX_ID, in_id_range
from kana.errors import KanaError
from kana.models import DashboardAdmin, DashboardSession, Workspace
from kana.routing import error_headers
from kana.serializers import amount

bp = Blueprint(
    "dashboard",
    __name__.rsplit(".", 1)[0],
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
csrf = CSRFProtect()

PUBLIC_ENDPOINTS = {"dashboard.login", "dashboard.static"}
PAGE_SIZE = 50

# Pages only load their own CSS, scripts and images; nothing inline, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Admin:
    """The logged-in admin, as the request sees them."""

    id: int
    email: str
    workspace_id: int
    workspace_name: str
    operator: bool = False
    session_id: int = 0

    @property
    def actor(self) -> str:
        # What audit entries and imports record as "who".
        return f"dashboard:{self.email}"


def log_in(db: Session, admin: DashboardAdmin) -> None:
    """Start a server-side session for ``admin`` (in the caller's transaction) and name it in the cookie."""
    session_id, nonce = accounts.start_session(db, admin, current_app.permanent_session_lifetime)
    session.clear()  # no fixation: nothing from before the login survives, including the CSRF token
    session.permanent = True
    session["admin_id"] = admin.id
    session["ws"] = admin.workspace_id
    session["sid"] = session_id
    session["nonce"] = nonce


def current_admin() -> Admin | None:
    """The admin whose session the cookie names, while that session exists on the server.

    Logging out, "log out everywhere" and a password change delete session rows,
    so a copy of the cookie stops working at once (the cookie is only signed).
    """
    admin_id, ws, sid, nonce = (session.get(k) for k in ("admin_id", "ws", "sid", "nonce"))
    if not all(isinstance(v, int) for v in (admin_id, ws, sid)) or not isinstance(nonce, str):
        session.clear()
        return None
    with read_only(SessionLocal()) as s:
        row = s.execute(
            select(DashboardAdmin, Workspace.name)
            .join(Workspace, Workspace.id == DashboardAdmin.workspace_id)
            .join(DashboardSession, DashboardSession.admin_id == DashboardAdmin.id)
            .where(DashboardAdmin.id == admin_id, DashboardAdmin.workspace_id == ws,
                   DashboardSession.id == sid, DashboardSession.nonce == nonce)
        ).first()
    if row is None:
        session.clear()
        return None
    admin = row[0]
    return Admin(admin.id, admin.email, admin.workspace_id, row[1], admin.operator, sid)


def wants_json() -> bool:
    return request.path.endswith(".json")


def safe_next(target: str | None) -> str | None:
    """Only same-site paths may be redirected to after login (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    return target


@bp.before_request
def _guard() -> ResponseReturnValue | None:
    csrf.protect()
    _refuse_nul()
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    admin = current_admin()
    if admin is None:
        if wants_json():
            abort(401)
        return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
    g.admin = admin
    return None


def _refuse_nul() -> None:
    """400 for a query or form value holding U+0000, which no PostgreSQL text column can store
    (one check for every page, rather than a 500 from whichever query meets it first)."""
    for source in (request.args, request.form):
        for name, value in source.items(multi=True):
            if "\x00" in name or "\x00" in value:
                abort(400, description=f"{name!r} must not contain NUL (\\u0000) characters.")


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "dashboard.static":
        # Pages show customer data: keep them out of shared caches and the back-forward cache.
        response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> ResponseReturnValue:
    if wants_json():
        return (jsonify({"code": (exc.name or "error").lower().replace(" ", "_"), "message": exc.description}),
                exc.code, error_headers(exc))
    return render_template("dashboard/error.html", error=exc), exc.code or 500, error_headers(exc)


@bp.errorhandler(KanaError)
@bp.errorhandler(RedisError)
@bp.errorhandler(DBAPIError)
def _error(exc: Exception) -> ResponseReturnValue:
    """The dashboard's rendering of ``kana.errors``: a failed action goes back with an error notice.

    A form post whose action failed (a conflict, Redis down …) returns the
    operator to the page the view named with ``back_to``; what does not exist
    is a 404 page; JSON endpoints answer the API's error body.
    """
    known = errors.classify(exc)
    if known is None:
        raise exc
    if wants_json():
        return jsonify(known.body()), known.status
    if request.method == "POST" and known.status != 404 and g.get("back"):
        notice(known.text, "error")
        return redirect(g.back)
    page = HTTPException(known.text)
    page.code = known.status
    return render_template("dashboard/error.html", error=page), known.status


@bp.context_processor
def _context() -> dict[str, Any]:
    return {"admin": g.get("admin")}


# --- helpers for views ------------------------------------------------------------------


def ws() -> int:
    return g.admin.workspace_id


def actor() -> str:
    return g.admin.actor


def back_to(endpoint: str, **values: Any) -> None:
    """Where this action sends the operator back to, with an error notice, if it fails."""
    g.back = url_for(endpoint, **values)


def int_arg(name: str, default: int | None = None) -> int | None:
    """A whole-number query argument (a position in a list: 0..MAX_ID); 400 otherwise."""
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, description=f"{name} must be a whole number.")
    if not 0 <= value <= MAX_ID:
        abort(400, description=f"{name} is out of range.")
    return value


def int_list(values: list[str], name: str = "kana_id") -> list[int]:
    out = []
    for raw in values:
        try:
            value = int(raw)
        except ValueError:
            abort(400, description=f"{name} must be whole numbers.")
        if not in_id_range(value):
            abort(400, description=f"{name} {value} is not an id.")
        out.append(value)
    return list(dict.fromkeys(out))


def notice(message: str, category: str = "ok") -> None:
    flash(message, category)


# --- template filters ------------------------------------------------------------------------


@bp.app_template_filter("when")
def when(moment: Any) -> str:
    """A UTC time as operators read it (and sort it): 2026-11-23 14:05:09 UTC."""
    if moment is None:
        return "—"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("amount")
def amount_filter(value: Any) -> str:
    number = amount(value)
    return f"{number:,}" if isinstance(number, int) else f"{number:,.4f}".rstrip("0").rstrip(".")


@bp.app_template_filter("pretty_json")
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)

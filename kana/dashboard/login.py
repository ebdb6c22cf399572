"""Logging in and out."""

from __future__ import annotations

import time

from flask import g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError

from kana.dashboard.common import bp, current_admin, log_in, safe_next
from kana.db import SessionLocal
from kana.domain import accounts
from kana.runtime import current


def _form(error: str | None = None, status: int = 200, retry_after: int = 0) -> ResponseReturnValue:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return render_template("dashboard/login.html", error=error, form=request.form,
                           next=safe_next(request.values.get("next")) or ""), status, headers


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        if current_admin() is not None:
            return redirect(safe_next(request.args.get("next")) or url_for("dashboard.overview"))
        return _form()
    email = request.form.get("email", "").strip()
    password = request.form.get("password", "")
    raw_ws = request.form.get("workspace", "").strip()
    if not email or not password:
        return _form("Enter your email and password.", 400)
    workspace_id = None
    if raw_ws:
        if not raw_ws.isdigit() or len(raw_ws) > 18:
            return _form("The workspace ID is a number.", 400)
        workspace_id = int(raw_ws)
    rt = current()
    client = request.remote_addr or "unknown"
    try:
        verdict = accounts.count_attempt(rt.redis, client, email,
                                         limit=rt.settings.login_attempts, window=rt.settings.login_window)
    except RedisError:
        # Fail closed: without the counter, guessing would be unlimited.
        return _form("Logging in is unavailable right now (Redis is unreachable); try again shortly.", 503)
    if not verdict.allowed:
        minutes = max(1, round(verdict.retry_after / 60))
        return _form(f"Too many login attempts. Try again in about {minutes} minute{'s' if minutes != 1 else ''}.",
                     429, verdict.retry_after)
    if verdict.delay:
        time.sleep(verdict.delay)  # many addresses guessing one email: slowed, never locked out
    try:
        with SessionLocal.begin() as s:
            admin = accounts.authenticate(s, email, password, workspace_id)
            if admin is not None:
                log_in(s, admin)
    except accounts.AmbiguousLogin:
        return _form("This email administers several workspaces: enter the workspace ID too.", 400)
    if admin is None:
        return _form("Wrong email or password.", 401)
    try:
        accounts.forget_attempts(rt.redis, client, email)
    except RedisError:
        pass  # the count expires with its window anyway
    return redirect(safe_next(request.form.get("next")) or url_for("dashboard.overview"))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    """End this session on the server too: a copy of the cookie no longer logs in."""
    with SessionLocal.begin() as s:
        accounts.end_session(s, g.admin.session_id)
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.post("/logout/everywhere")
def logout_everywhere() -> ResponseReturnValue:
    """End every session of this admin (other browsers, other devices, a lost laptop)."""
    with SessionLocal.begin() as s:
        accounts.end_sessions(s, g.admin.id)
    session.clear()
    return redirect(url_for("dashboard.login"))

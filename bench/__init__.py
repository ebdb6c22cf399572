"""Benchmarks: scripts run by hand (see the README); each writes a JSON report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(kind: str, report: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``report`` as ``{kind}-{UTC time}.json`` under ``out`` (bench/results by default) and say where."""
    folder = Path(out) if out is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {path}")
    return path


def postgres(name: str):  # noqa: ANN201 - config.Settings, imported lazily like the scripts do
    """Settings of a benchmark that needs PostgreSQL, its schema migrated and the engine bound; exits otherwise."""
    import config
    from kana import db, migrate

    settings = config.load()
    if not settings.database_url.startswith("postgresql"):
        raise SystemExit(f"{name} needs PostgreSQL: set DATABASE_URL")
    migrate.upgrade(settings.database_url)
    db.configure(settings.database_url)
    return settings


def with_redis(name: str):  # noqa: ANN201 - config.Settings, imported lazily like the scripts do
    """Settings of a benchmark that runs the app and its jobs in-process, its schema migrated; exits 2 without Redis."""
    import sys

    import config
    from kana import migrate

    settings = config.load()
    if settings.redis_url is None:
        print(f"{name}: set REDIS_URL (and DATABASE_URL) to the Redis and PostgreSQL to measure", file=sys.stderr)
        raise SystemExit(2)
    migrate.upgrade(settings.database_url)
    return settings


def wait_healthy(url: str, timeout: float = 60.0) -> bool:
    """Poll ``{url}/healthz`` until it answers 200 (True) or ``timeout`` seconds pass (False)."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False

"""Riding out Redis and database outages: reachability checks, backoff, one log line per outage.

Worker, scheduler and web processes never exit because a dependency went
away: they retry with a capped exponential backoff, and each logs the outage
once when it starts and once when it ends ("back after N s"), not per retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from kana.db import SessionLocal

# The longest pause between two reconnection attempts: short enough that work
# resumes within seconds of a dependency's return.
MAX_BACKOFF = 3.0


class Outage:
    """One dependency's state as this process sees it; logs each change once."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self.log = log
        self.since: float | None = None
        self._lock = threading.Lock()

    @property
    def down_now(self) -> bool:
        return self.since is not None

    def down(self, reason: object) -> None:
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        self.log.warning("%s unreachable (%s); retrying with backoff", self.name, _describe(reason))

    def up(self) -> None:
        with self._lock:
            if self.since is None:
                return
            seconds, self.since = time.monotonic() - self.since, None
        self.log.warning("%s back after %.1f s", self.name, seconds)


def _describe(reason: object) -> str:
    text = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    return text.strip().splitlines()[0].rstrip(":") if text.strip() else "no detail"


def backoff(first: float = 0.25, cap: float = MAX_BACKOFF) -> Iterator[float]:
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def redis_problem(redis: Redis) -> str | None:
    """None when Redis answers a PING, else why not."""
    try:
        redis.ping()
    except (RedisError, OSError) as exc:  # OSError: the embedded server could not be reached
        return f"unreachable: {type(exc).__name__}"
    return None


def database_problem() -> str | None:
    """None when the database answers ``SELECT 1``, else why not."""
    try:
        with SessionLocal() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"unreachable: {type(exc).__name__}"
    return None


def wait_until_up(check: Callable[[], str | None], outage: Outage, stopping: Callable[[], bool],
                  sleep: Callable[[float], object] = time.sleep) -> bool:
    """Block until ``check`` reports no problem (True) or ``stopping()`` (False)."""
    for delay in backoff():
        problem = check()
        if problem is None:
            outage.up()
            return True
        outage.down(problem)
        if stopping():
            return False
        sleep(delay)
    return False  # pragma: no cover - backoff() never ends

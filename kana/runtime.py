"""What a process needs at run time: its settings, the database, Redis and RQ."""

from __future__ import annotations

from functools import cached_property

from flask import Flask, current_app
from redis import Redis
from rq import Queue

from config import Settings
from kana import broker, db
from kana.domain import counters, webhooks


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        db.configure(settings.database_url)
        self.activate()

    def activate(self) -> None:
        """Make this runtime the one commits report to: entitlement cache writes and webhook
        deliveries queued after each commit (one per process; tests building a second app
        hand it back)."""
        counters.install(db.SessionLocal, lambda: self.redis, lambda ids: webhooks.enqueue(self.queue, ids))

    @cached_property
    def redis(self) -> Redis:
        # Connected lazily: building an app or a worker starts no server.
        return broker.connect(self.settings)

    @cached_property
    def queue(self) -> Queue:
        return broker.job_queue(self.redis, self.settings)

    def wake(self, partitions: set[int] | list[int]) -> int:
        return broker.wake(self.redis, self.settings, partitions)

    def enqueue_drains(self, partitions: list[int]) -> int:
        """Drain jobs for the partitions whose wake flag ``queue.push`` raised."""
        return broker.enqueue_drains(self.redis, self.settings, partitions)


EXTENSION = "kana"


def install(app: Flask, runtime: Runtime) -> Runtime:
    """Make ``runtime`` the app's, for ``current()``."""
    app.extensions[EXTENSION] = runtime
    return runtime


def of(app: Flask) -> Runtime:
    """The Runtime ``install`` gave ``app``."""
    return app.extensions[EXTENSION]


def current() -> Runtime:
    """The Runtime of the app handling this request (or whose app context is pushed)."""
    return of(current_app)

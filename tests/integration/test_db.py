"""The one engine and sessionmaker: SQLite's locking choices."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text

from kana import db
from kana.db import SessionLocal, read_only
from kana.models import Workspace


def test_read_only_session_reads_while_a_writer_holds_the_lock(app, workspace):
    if db.get_engine().dialect.name != "sqlite":
        pytest.skip("PostgreSQL readers never wait for writers")
    seen: list[int] = []

    def read() -> None:
        with read_only(SessionLocal()) as s:
            seen.append(s.scalar(select(func.count()).select_from(Workspace)))

    with SessionLocal.begin() as writer:  # BEGIN IMMEDIATE: the write lock, held until the block ends
        writer.execute(text("SELECT 1"))
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=10)
        # A session that is not read-only would wait here for the writer (busy_timeout).
        assert not reader.is_alive() and seen and seen[0] >= 1

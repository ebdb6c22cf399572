"""The process's one engine and one sessionmaker.

Entry points (a request, a job, a CLI command) own transactions:
``with SessionLocal.begin() as session: ...``. Domain functions take a session.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Column, Engine, Table, bindparam, create_engine, event, func, insert, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import sessionmaker
from sqlalchemy.types import TypeDecorator

SessionLocal = sessionmaker(expire_on_commit=False)
_engine: Engine | None = None
_fork_hook = False


READ_ONLY = "kana_read_only"


def read_only(session: SASession) -> SASession:
    """Mark a fresh session as one that only reads (call before its first query).

    On SQLite every other transaction takes the write lock when it begins, so a
    progress page polled during a long import would otherwise wait for the
    import's chunks back to back and see 0% until the end. No effect on PostgreSQL.
    """
    session.connection(execution_options={READ_ONLY: True})
    return session


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # Let SQLAlchemy, not pysqlite, emit BEGIN, so it can be BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # Take the write lock up front: a deferred transaction that reads and
        # then writes can fail with SQLITE_BUSY instead of waiting its turn.
        # Read-only sessions (``read_only``) begin deferred: in WAL mode they
        # then never wait for a writer.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        _sqlite_setup(engine)
        return engine
    if "poolclass" not in kwargs:
        kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
    return create_engine(url, **kwargs)


def configure(database_url: str) -> Engine:
    """Create this process's engine (once per URL) and bind ``SessionLocal`` to it."""
    global _engine, _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_after_fork)
        _fork_hook = True
    if _engine is not None and str(_engine.url) == str(make_url_str(database_url)):
        return _engine
    if _engine is not None:
        _engine.dispose()
    _engine = make_engine(database_url)
    SessionLocal.configure(bind=_engine)
    return _engine


def make_url_str(url: str) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(url))


def get_engine() -> Engine:
    if _engine is None:
        raise RuntimeError("kana.db.configure() has not been called in this process")
    return _engine


def _after_fork() -> None:
    # A forked child (RQ's work horse, gunicorn workers) must not reuse the
    # parent's pooled connections.
    if _engine is not None:
        _engine.dispose(close=False)



def assign_ids(session: SASession) -> None:
    """Give pending rows their primary keys from the PostgreSQL sequences up front.

    With keys known, the flush inserts each table with one pipelined executemany
    instead of multi-row INSERT … RETURNING statements, whose thousands of
    parameters psycopg re-parses on every call (it only caches small queries).
    A no-op on other databases.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    pending: dict[type, list] = {}
    for obj in session.new:
        mapper = sa_inspect(obj).mapper
        pk = mapper.primary_key
        if len(pk) == 1 and getattr(obj, pk[0].key) is None and pk[0].autoincrement in (True, "auto"):
            pending.setdefault(mapper.class_, []).append(obj)
    with session.no_autoflush:
        for cls, objs in pending.items():
            column = sa_inspect(cls).primary_key[0]
            ids = next_ids(session, column, len(objs)) or []
            for obj, new_id in zip(objs, ids, strict=True):
                setattr(obj, column.key, new_id)


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def _recordset(session: SASession, table: Table, rows: list[dict]) -> tuple[str, str]:
    """``rows`` as a PostgreSQL ``json_to_recordset(...) AS r(...)`` source and its JSON parameter.

    One short statement with one parameter whatever the row count, which
    psycopg prepares once, where a multi-row VALUES list has thousands of
    parameters to re-parse on every call (and arrays of text cost as much to
    escape).
    """
    names = list(rows[0])
    dialect = session.get_bind().dialect
    decorated = {n: table.c[n].type for n in names if isinstance(table.c[n].type, TypeDecorator)}
    if decorated:
        rows = [{**row, **{n: kind.process_bind_param(row[n], dialect) for n, kind in decorated.items()}}
                for row in rows]
    types = []
    for name in names:
        kind = table.c[name].type
        kind = kind.load_dialect_impl(dialect) if isinstance(kind, TypeDecorator) else kind
        types.append(f'"{name}" {kind.compile(dialect=dialect)}')
    return (f"json_to_recordset(CAST(:rows AS json)) AS r({', '.join(types)})",
            json.dumps(rows, default=_json_value))


def insert_rows(session: SASession, table: Table, rows: list[dict], *, skip_conflicts: list[str] | None = None,
                returning: list[str] | None = None,
                add_on_conflict: tuple[list[str], list[str]] | None = None) -> list[tuple]:
    """Insert ``rows`` (dicts with the same keys) set-based; returns the ``returning`` columns of inserted rows.

    ``skip_conflicts`` names the unique key whose existing rows are skipped (ON
    CONFLICT DO NOTHING: the key decides, with no lookup first). On PostgreSQL
    the rows travel as one JSON document (``_recordset``); elsewhere the
    dialect's INSERT with the same clauses. ``add_on_conflict=(key, columns)``
    makes it an accumulating upsert: a row whose ``key`` exists adds its
    ``columns`` to the stored ones (the rows must not repeat a key: one statement
    may not update a row twice).
    """
    if not rows:
        return []
    names = list(rows[0])
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        source, document = _recordset(session, table, rows)
        quoted = ", ".join(f'"{n}"' for n in names)
        sql = f"INSERT INTO {table.name} ({quoted}) SELECT {quoted} FROM {source}"
        if skip_conflicts:
            sql += f" ON CONFLICT ({', '.join(skip_conflicts)}) DO NOTHING"
        if add_on_conflict:
            key, added = add_on_conflict
            sets = ", ".join(f'"{n}" = {table.name}."{n}" + EXCLUDED."{n}"' for n in added)
            sql += f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        if returning:
            sql += f" RETURNING {', '.join(returning)}"
        result = session.execute(text(sql), {"rows": document})
        return [tuple(r) for r in result] if returning else []
    module = sqlite if dialect.name == "sqlite" else None
    stmt = module.insert(table) if module is not None else insert(table)
    if skip_conflicts and module is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=skip_conflicts)
    if add_on_conflict and module is not None:
        key, added = add_on_conflict
        stmt = stmt.on_conflict_do_update(index_elements=key,
                                          set_={n: table.c[n] + stmt.excluded[n] for n in added})
    if returning:
        return [tuple(r) for r in session.execute(stmt.returning(*(table.c[n] for n in returning)), rows)]
    session.execute(stmt, rows)
    return []


def next_ids(session: SASession, column: Column, n: int) -> list[int] | None:
    """``n`` new values of an auto-incremented primary key, in one query; None where there is no sequence.

    Keys known before the INSERT tie each inserted row to its key without
    relying on the order RETURNING hands rows back in.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # SQLite numbers a new row max(rowid) + 1 (no AUTOINCREMENT in this schema), and a
        # writing transaction holds the database's write lock (BEGIN IMMEDIATE): the same keys.
        top = session.execute(select(func.max(column))).scalar() or 0
        return list(range(top + 1, top + n + 1))
    if dialect != "postgresql":
        return None
    return list(session.execute(
        text("SELECT nextval(pg_get_serial_sequence(:table, :column)) FROM generate_series(1, :n)"),
        {"table": column.table.name, "column": column.name, "n": n},
    ).scalars())


def insert_keyed(session: SASession, table: Table, key: str, rows: list[dict]) -> list[int]:
    """Insert ``rows`` set-based and return their new ``key`` values (an auto-incremented primary key), in order."""
    if not rows:
        return []
    ids = next_ids(session, table.c[key], len(rows))
    if ids is not None:
        insert_rows(session, table, [{key: i, **row} for i, row in zip(ids, rows, strict=True)])
        return ids
    # Elsewhere SQLAlchemy's insertmanyvalues sorts RETURNING rows back into row order.
    stmt = insert(table).returning(table.c[key], sort_by_parameter_order=True)
    return list(session.execute(stmt, rows).scalars())


def update_rows(session: SASession, table: Table, key: str, rows: list[dict]) -> int:
    """Update rows by ``key`` set-based: each dict holds its key and the same other columns; returns rows matched.

    On PostgreSQL one ``UPDATE … FROM json_to_recordset(...)`` (``_recordset``);
    elsewhere an executemany of one UPDATE by key.
    """
    if not rows:
        return 0
    names = [n for n in rows[0] if n != key]
    if session.get_bind().dialect.name == "postgresql":
        source, document = _recordset(session, table, rows)
        assignments = ", ".join(f'"{n}" = r."{n}"' for n in names)
        sql = f'UPDATE {table.name} AS t SET {assignments} FROM {source} WHERE t."{key}" = r."{key}"'
        return session.execute(text(sql), {"rows": document}).rowcount
    # bindparam names may not repeat the columns' own (SQLAlchemy reserves those for SET).
    stmt = (update(table).where(table.c[key] == bindparam(f"k_{key}"))
            .values({n: bindparam(f"v_{n}") for n in names}))
    params = [{f"k_{key}": row[key], **{f"v_{n}": row[n] for n in names}} for row in rows]
    return session.execute(stmt, params).rowcount

"""The CSV import's set-based writes (``identity.BatchDirectory``) against the rules applied through ORM objects.

The same file, over the same starting users, is imported into two workspaces:
once as it runs (the chunk's users as ``UserRow``s, written with a few multi-row
statements at the chunk's end) and once with the reference ``identity.Directory``
(ORM objects, flushed). Every row's outcome, the users left, their aliases and
the merges recorded must be the same: creates, updates, duplicate user_ids in
one file, email-only rows, claims, merges, billing conflicts and invalid rows.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event, select

from kana.domain import identity
from kana.imports import csvfile
from kana.models import Alias, Audit, User
from tests.helpers import add_user

# name -> the starting user (created in this order in each workspace).
START = {
    "A": {"user_id": "alice", "email": "alice@example.com", "name": "Alice", "billing_id": "cus_A"},
    "B": {"user_id": "bob", "email": "bob@example.com", "name": "Bob"},
    "S1": {"email": "stripe1@example.com", "billing_id": "cus_S1", "source": "stripe"},
    "T1": {"email": "twin@example.com", "billing_id": "cus_T1", "source": "stripe"},
    "T2": {"email": "twin@example.com", "billing_id": "cus_T2", "source": "stripe"},
    "S4": {"email": "merge@example.com", "source": "stripe"},
    "S5": {"email": "conflict@example.com", "billing_id": "cus_X", "source": "stripe"},
    "C": {"user_id": "carol", "email": "carol@example.com", "billing_id": "cus_C"},
    "D": {"user_id": "dave", "billing_id": "cus_D"},
    "E": {"email": "solo@example.com", "source": "stripe"},
    "Z": {"user_id": "zed", "name": "Zed"},
}

# {X}: the kana_id of starting user X in the workspace the file is imported into.
FILE = """kana_id,user_id,name,email,billing_id
,new1,New One,new1@example.com,cus_N1
,alice,Alice Renamed,,
,dup,Dup First,dup@example.com,
,dup,Dup Second,,
,,Solo Named,solo@example.com,
,,Fresh,fresh@example.com,
,,Twin,twin@example.com,
,claimer,Claimer,stripe1@example.com,
,bob,,merge@example.com,
{C},dave,,,
,conflicted,,conflict@example.com,cus_Y
,undefined,Placeholder,,
,,,not-an-email,
a,b,c,d,e,f
,,Nobody,,
,fresh-claimer,,fresh@example.com,
,,Pending,pending@example.com,
,carol,,pending@example.com,
{E},,Solo Again,,
,new1,,,cus_N1
{B},bob,Bob Final,,
{S4},,Gone,,
{A},zed,,,
,zed,Zed Later,,
9999999,ghost,,,
,dup,Dup Third,dup@example.com,
,,Fresh Again,fresh@example.com,
"""


def _start(session, ws: int) -> dict[str, int]:
    return {name: add_user(session, ws, **fields).kana_id for name, fields in START.items()}


def _import(session, ws: int, start: dict[str, int], chunk: int) -> list[csvfile.RowResult]:
    data = FILE.format(**start).encode()
    records = list(csvfile.parse(data).rows())
    results = []
    for i in range(0, len(records), chunk):
        results += csvfile.apply_rows(session, ws, "stripe", records[i : i + chunk], actor="test").results
    return results


def _state(session, ws: int, start: dict[str, int], results: list[csvfile.RowResult]) -> dict:
    """Everything the import left, with kana_ids replaced by their rank among the workspace's ids."""
    session.flush()
    session.expire_all()
    users = list(session.scalars(select(User).where(User.workspace_id == ws).order_by(User.kana_id)))
    ids = sorted({*start.values(), *(u.kana_id for u in users), *(r.kana_id for r in results if r.kana_id)})
    rank = {kana_id: f"#{i}" for i, kana_id in enumerate(ids)}

    def ids_in(text: str) -> str:  # "kana_id 12", "kana_ids 3, 4", "kana_ids [3, 4]"
        return re.sub(r"(kana_ids? \[?)([\d, ]+)", lambda m: m.group(1) + re.sub(
            r"\d+", lambda n: rank.get(int(n.group()), n.group()), m.group(2)), text)

    def norm(value, key=None):
        if isinstance(value, int) and key != "line":
            return rank.get(value, value)
        if isinstance(value, str):
            return ids_in(value)
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in value.items()}
        return value

    aliases = session.execute(select(Alias.alias, Alias.kana_id).where(Alias.workspace_id == ws)).all()
    merges = session.execute(select(Audit.survivor_kana_id, Audit.kana_ids, Audit.trigger)
                             .where(Audit.workspace_id == ws, Audit.action == "merge").order_by(Audit.id)).all()
    return {
        "rows": [norm(r.entry()) for r in results],
        "users": [norm({c: getattr(u, c) for c in ("kana_id", "user_id", "email", "email_key", "name", "billing_id",
                                                    "billing_provider", "source", "plan_id")}) for u in users],
        "aliases": sorted((a, rank[k]) for a, k in aliases),
        "merges": [norm(list(m)) for m in merges],
    }


@pytest.mark.parametrize("chunk", [1000, 4, 1])
def test_bulk_writes_give_the_same_results_as_orm_objects(session, new_workspace, monkeypatch, chunk):
    bulk_ws, orm_ws = new_workspace().id, new_workspace().id
    start = _start(session, bulk_ws)
    bulk = _state(session, bulk_ws, start, _import(session, bulk_ws, start, chunk))

    orm_start = _start(session, orm_ws)
    with monkeypatch.context() as m:
        m.setattr(identity, "BatchDirectory", identity.Directory)
        orm = _state(session, orm_ws, orm_start, _import(session, orm_ws, orm_start, chunk))

    assert bulk == orm
    # And what that is (the file's lines: header 1, rows from 2).
    rows = {r["line"]: r for r in bulk["rows"]}
    statuses = {line: r["status"] for line, r in rows.items()}
    assert statuses == {
        2: "created", 3: "updated", 4: "created", 5: "updated", 6: "updated", 7: "created", 8: "failed",
        9: "updated", 10: "merged", 11: "failed", 12: "created", 13: "failed", 14: "failed", 15: "failed",
        16: "failed", 17: "updated", 18: "created", 19: "merged", 20: "updated", 21: "unchanged", 22: "updated",
        23: "failed", 24: "merged", 25: "updated", 26: "failed", 27: "updated", 28: "created",
    }
    assert rows[9]["actions"] == ["claimed"]
    assert "billing id" in rows[11]["errors"]["user_id"]
    assert set(rows[8]["errors"]) == {"email"} and set(rows[13]["errors"]) == {"user_id"}
    assert set(rows[14]["errors"]) == {"email"} and set(rows[15]["errors"]) == {"row"}
    # Row 17 claims the user row 7 created in the same file; row 19 merges carol with row 18's new user.
    assert rows[17]["actions"] == ["claimed"] and rows[17]["kana_id"] == rows[7]["kana_id"]
    # Row 25 reaches zed's survivor through the alias row 24's merge left.
    assert rows[25]["kana_id"] == rows[24]["kana_id"]
    by_user_id = {u["user_id"]: u for u in bulk["users"] if u["user_id"]}
    assert by_user_id["dup"]["name"] == "Dup Third" and by_user_id["dup"]["email"] == "dup@example.com"
    assert by_user_id["alice"]["name"] == "Zed Later"
    assert by_user_id["conflicted"]["billing_id"] == "cus_Y"
    assert ("zed", rows[24]["kana_id"]) in bulk["aliases"]
    assert len(bulk["merges"]) == 3


def test_a_chunk_is_written_with_a_few_statements(session, workspace):
    """Creating or updating a chunk's users costs a few statements, not one per row."""
    ws = workspace.id
    statements: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many):  # noqa: ANN001
        statements.append(statement)

    def run(text: str) -> list[csvfile.RowResult]:
        statements.clear()
        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        try:
            return csvfile.apply_rows(session, ws, None, csvfile.parse(text.encode()).rows()).results
        finally:
            event.remove(engine, "before_cursor_execute", record)

    n = 300
    created = run("user_id,name,email\n" + "".join(f"u{i},U {i},u{i}@example.com\n" for i in range(n)))
    assert {r.status for r in created} == {"created"}
    writes = [s for s in statements if s.lstrip().startswith(("INSERT INTO users", "UPDATE users"))]
    assert 1 <= len(writes) <= 2, writes  # one INSERT (SQLite's insertmanyvalues may split it)
    assert len(statements) <= 12

    ids = {r.line: r.kana_id for r in created}
    updated = run("kana_id,name\n" + "".join(f"{ids[i + 2]},V {i}\n" for i in range(n)))
    assert {r.status for r in updated} == {"updated"}
    writes = [s for s in statements if s.lstrip().startswith(("INSERT INTO users", "UPDATE users"))]
    if session.get_bind().dialect.name == "postgresql":
        assert len(writes) == 1  # one UPDATE … FROM json_to_recordset
    assert len(statements) <= 12 or session.get_bind().dialect.name != "postgresql"
    names = dict(session.execute(select(User.kana_id, User.name).where(User.workspace_id == ws)).all())
    assert names == {ids[i + 2]: f"V {i}" for i in range(n)}


def test_orm_copies_of_updated_users_are_refreshed(session, workspace):
    """A User the caller holds shows what the import's set-based UPDATE wrote."""
    user = add_user(session, workspace.id, user_id="held", name="Before")
    [result] = csvfile.apply_rows(session, workspace.id, None,
                                  csvfile.parse(b"user_id,name\nheld,After\n").rows()).results
    assert result.status == "updated"
    assert user.name == "After"


def test_user_rows_note_changes_once_inserted():
    sink: list[identity.UserRow] = []
    new = identity.UserRow({"user_id": "a"})
    new.name = "x"  # not inserted yet: the insert takes every field
    assert sink == [] and new.kana_id is None and new.email is None
    loaded = identity.UserRow(dict.fromkeys(identity.FIELDS) | {"kana_id": 1}, sink)
    loaded.name = "y"
    loaded.email = "y@example.com"
    assert sink == [loaded] and loaded._changed == {"name", "email"}
    assert set(identity.FIELDS) == set(User.__table__.columns.keys())

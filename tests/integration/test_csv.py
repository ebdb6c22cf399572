"""SPEC §8 CSV: streamed, injection-safe export; an import that takes the export back."""

from __future__ import annotations

import csv
import io

import pytest
from click.testing import CliRunner
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError

from kana.cli import main as cli
from kana.db import SessionLocal
from kana.domain import flags, identity
from kana.imports import csvfile
from kana.models import Alias, Audit, CsvImport
from tests.conftest import worker_env
from tests.helpers import add_user, users_of

HEADER = "kana_id,user_id,name,email,billing_id,created_at"


def export(session, ws, **kw) -> str:
    return "".join(csvfile.export_lines(session, ws, **kw))


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def run(session, ws, text: str | bytes, provider=None):
    data = text.encode("utf-8") if isinstance(text, str) else text
    parsed = csvfile.parse(data)
    return {r.line: r for r in csvfile.apply_rows(session, ws, provider, parsed.rows(), actor="test").results}


def test_export_columns_order_utf8_and_chunks(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="u1", email="zoë@example.com", name="Zoë Ünïcode", billing_id="cus_1")
    b = add_user(session, ws, email="x@example.com")
    pieces = list(csvfile.export_lines(session, ws, chunk=1))
    assert pieces[0] == HEADER + "\r\n"
    assert len(pieces) == 3  # header + one piece per chunk: nothing is accumulated
    rows = rows_of("".join(pieces))
    assert [r["kana_id"] for r in rows] == [str(a.kana_id), str(b.kana_id)]
    assert rows[0] == {"kana_id": str(a.kana_id), "user_id": "u1", "name": "Zoë Ünïcode",
                       "email": "zoë@example.com", "billing_id": "cus_1", "created_at": a.created_at.isoformat()}
    assert rows[1]["user_id"] == "" and rows[1]["billing_id"] == ""


def test_export_is_formula_injection_safe(session, workspace):
    add_user(session, workspace.id, user_id="=cmd|' /C calc'!A0", name="@SUM(1+1)", email="-x@example.com")
    row = rows_of(export(session, workspace.id))[0]
    assert row["user_id"] == "'=cmd|' /C calc'!A0"
    assert row["name"] == "'@SUM(1+1)" and row["email"] == "'-x@example.com"


def test_export_only_flagged_users(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="a", billing_id="cus_1", email="same@example.com")
    b = add_user(session, ws, user_id="b", billing_id="cus_2", email="same@example.com")
    c = add_user(session, ws, user_id="c")
    add_user(session, ws, user_id="d", billing_id="cus_4")
    flags.refresh(session, ws)
    ids = {f: {int(r["kana_id"]) for r in rows_of(export(session, ws, flag=f))}
           for f in ("missing_billing_id", "duplicate_email", "any")}
    assert ids == {"missing_billing_id": {c.kana_id}, "duplicate_email": {a.kana_id, b.kana_id},
                   "any": {a.kana_id, b.kana_id, c.kana_id}}
    with pytest.raises(ValueError):
        export(session, ws, flag="bogus")


def test_import_creates_by_user_id_and_by_email(session, workspace):
    ws = workspace.id
    results = run(session, ws, "user_id,email,name,billing_id\n"
                               "u1,ann@example.com,Ann,cus_A\n"
                               ",bob@example.com,Bob,\n")
    assert [results[2].status, results[3].status] == ["created", "created"]
    ann, bob = users_of(session, ws)
    assert (ann.user_id, ann.email_key, ann.billing_id, ann.billing_provider, ann.source) == (
        "u1", "ann@example.com", "cus_A", "stripe", "csv")
    assert (bob.user_id, bob.name) == (None, "Bob")
    assert results[2].kana_id == ann.kana_id


def test_import_matches_kana_id_then_user_id_then_single_unclaimed_email(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, user_id="u1", email="a@example.com")
    b = add_user(session, ws, user_id="u2")
    s = add_user(session, ws, email="s@example.com", billing_id="cus_S", source="stripe")
    session.add(Alias(workspace_id=ws, alias="old-u2", kana_id=b.kana_id))
    results = run(session, ws, f"kana_id,user_id,name,email\n"
                               f"{a.kana_id},,Ann,\n"
                               f",old-u2,Bee,\n"
                               f",,Stripe Sam,S@example.com\n")
    assert [results[n].status for n in (2, 3, 4)] == ["updated", "updated", "updated"]
    assert (a.name, b.name, s.name, s.email) == ("Ann", "Bee", "Stripe Sam", "S@example.com")
    assert [results[n].kana_id for n in (2, 3, 4)] == [a.kana_id, b.kana_id, s.kana_id]
    assert len(users_of(session, ws)) == 3


def test_import_ambiguous_email_fails_the_row_only(session, workspace):
    ws = workspace.id
    add_user(session, ws, email="dup@example.com", billing_id="cus_1")
    add_user(session, ws, email="dup@example.com", billing_id="cus_2")
    results = run(session, ws, "email,name\ndup@example.com,X\nnew@example.com,New\n")
    assert results[2].status == "failed" and "matches 2 users without a user_id" in results[2].errors["email"]
    assert results[3].status == "created"
    # A user_id row with that email creates a user and merges nothing (identify rule 2).
    results = run(session, ws, "user_id,email\nu9,dup@example.com\n")
    assert results[2].status == "created" and len(users_of(session, ws)) == 4


def test_import_kana_id_row_with_another_users_user_id_merges_them(session, workspace):
    ws = workspace.id
    stripe_user = add_user(session, ws, email="ann@example.com", billing_id="cus_A", source="stripe")
    segment_user = add_user(session, ws, user_id="u1", email="ann@example.com")
    other = add_user(session, ws, email="ann@example.com", billing_id="cus_Z", source="stripe")
    results = run(session, ws, f"kana_id,user_id\n{stripe_user.kana_id},u1\n")
    assert results[2].status == "merged"
    remaining = users_of(session, ws)
    assert [u.kana_id for u in remaining] == [stripe_user.kana_id, other.kana_id]
    assert stripe_user.user_id == "u1" and identity.find_user(session, ws, "u1") is stripe_user
    audit = session.scalar(select(Audit).where(Audit.workspace_id == ws, Audit.action == "merge"))
    assert audit.trigger == "csv" and audit.actor == "test" and sorted(audit.kana_ids) == sorted(
        [stripe_user.kana_id, segment_user.kana_id])
    assert audit.detail["line"] == 2


def test_a_later_row_naming_a_user_merged_away_by_an_earlier_one_finds_it_gone(session, workspace):
    ws = workspace.id
    s = add_user(session, ws, email="ann@example.com", billing_id="cus_A", name="Ann", source="stripe")
    a = add_user(session, ws, user_id="u1")
    results = run(session, ws, f"kana_id,user_id,name\n{s.kana_id},u1,\n{a.kana_id},,Gone\n{a.kana_id},u1,Annie\n")
    assert results[2].status == "merged" and [u.kana_id for u in users_of(session, ws)] == [s.kana_id]
    assert results[3].status == "failed" and "no user with kana_id" in results[3].errors["kana_id"]
    # Its user_id leads to the survivor, whose values win (fill-only).
    assert results[4].status == "unchanged" and results[4].kana_id == s.kana_id and s.name == "Ann"


def test_import_never_merges_conflicting_billing_ids(session, workspace):
    ws = workspace.id
    a = add_user(session, ws, email="a@example.com", billing_id="cus_1", source="stripe")
    add_user(session, ws, user_id="u1", billing_id="cus_2")
    results = run(session, ws, f"kana_id,user_id\n{a.kana_id},u1\n")
    assert results[2].status == "failed" and "billing id" in results[2].errors["user_id"]
    assert len(users_of(session, ws)) == 2 and a.user_id is None


def test_import_row_errors_name_field_and_line(session, workspace):
    ws = workspace.id
    u = add_user(session, ws, user_id="u1")
    text = ("user_id,email,billing_id,kana_id,name\n"
            "u2,not-an-email,,,\n"
            "u3,,cus_ok,,\"multi\nline name\"\n"
            "u4,,bad id!,,\n"
            ",,,abc,\n"
            ",,,,Only A Name\n"
            f"u5,,,{u.kana_id},\n"
            ",,,999999999,\n"
            "u6,,,,,extra\n"
            "null,,,,\n")
    results = run(session, ws, text, provider="stripe")
    assert "not an email address" in results[2].errors["email"]
    assert results[3].status == "created"  # its quoted name spans lines 3-4
    assert "Stripe customer id" in results[5].errors["billing_id"]
    assert "not a kana_id" in results[6].errors["kana_id"]
    assert "needs a kana_id, user_id or email" in results[7].errors["row"]
    assert "already has user_id 'u1'" in results[8].errors["user_id"]
    assert "no user with kana_id 999999999" in results[9].errors["kana_id"]
    assert "has 6 cells" in results[10].errors["row"]
    assert "placeholder" in results[11].errors["user_id"]
    assert {u.user_id for u in users_of(session, ws)} == {"u1", "u3"}


def test_database_refusal_fails_only_that_row(session, workspace):
    """A chunk whose write fails is re-applied row by row; only the refused row fails."""

    def refuse(_conn, _cursor, statement, parameters, _context, _many):  # noqa: ANN001
        # The database refuses any statement that would write this row, however the rows are sent.
        if statement.lstrip().startswith(("INSERT INTO users", "UPDATE users")) and "refuse me" in str(parameters):
            raise IntegrityError(statement, {}, Exception("simulated constraint violation"))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", refuse)
    try:
        results = run(session, workspace.id, "user_id,name\nu1,One\nu2,refuse me\nu3,Three\n")
    finally:
        event.remove(engine, "before_cursor_execute", refuse)
    assert [results[n].status for n in (2, 3, 4)] == ["created", "failed", "created"]
    assert "simulated constraint violation" in results[3].errors["row"]
    assert {u.user_id for u in users_of(session, workspace.id)} == {"u1", "u3"}


def test_reimporting_the_export_changes_nothing(session, workspace):
    ws = workspace.id
    add_user(session, ws, user_id="=risky", name="@me", email="a@example.com", billing_id="cus_1")
    add_user(session, ws, email="a@example.com", billing_id="cus_2", source="stripe")
    add_user(session, ws, email="b@example.com", source="stripe")
    add_user(session, ws, user_id="u3", name="Zoë")
    flags.refresh(session, ws)
    before = [(u.kana_id, u.user_id, u.name, u.email, u.billing_id, u.updated_at) for u in users_of(session, ws)]
    text = export(session, ws)
    results = run(session, ws, text)
    assert {r.status for r in results.values()} == {"unchanged"}
    after = [(u.kana_id, u.user_id, u.name, u.email, u.billing_id, u.updated_at) for u in users_of(session, ws)]
    assert after == before
    assert session.scalar(select(Audit).where(Audit.workspace_id == ws, Audit.action == "merge")) is None


def test_reimporting_a_file_that_created_and_merged_is_a_no_op(session, workspace):
    ws = workspace.id
    s = add_user(session, ws, email="ann@example.com", billing_id="cus_A", source="stripe")
    add_user(session, ws, user_id="u1")
    text = (f"kana_id,user_id,email,name,billing_id\n{s.kana_id},u1,,Ann,\n,u2,b@example.com,Bob,cus_B\n"
            ",,c@example.com,Cy,\n")
    first = run(session, ws, text)
    assert [first[n].status for n in (2, 3, 4)] == ["merged", "created", "created"]
    second = run(session, ws, text)
    assert {r.status for r in second.values()} == {"unchanged"}
    assert len(users_of(session, ws)) == 3


def test_api_import_job_progress_and_report(client, workspace, work):
    ws = workspace.id
    with SessionLocal.begin() as s:
        existing = add_user(s, ws, user_id="u0", name="Old")
    lines = [f"u{i},User {i},u{i}@example.com" for i in range(1, 2500)] + ["u0,New,", "bad,,nope"]
    data = ("user_id,name,email\n" + "\n".join(lines) + "\n").encode()
    resp = client.post("/api/v1/imports/csv", headers=workspace.headers,
                       data={"file": (io.BytesIO(data), "users.csv")}, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    job_id, import_id = resp.get_json()["job_id"], resp.get_json()["import_id"]
    queued = client.get(f"/api/v1/imports/csv/{import_id}", headers=workspace.headers).get_json()
    assert queued["status"] == "queued" and queued["job_id"] == job_id
    work()
    body = client.get(f"/api/v1/imports/csv/{import_id}", headers=workspace.headers).get_json()
    assert body["status"] == "finished", body
    assert (body["total"], body["processed"], body["progress"]) == (2501, 2501, 1.0)
    assert (body["created"], body["updated"], body["failed"], body["merged"]) == (2499, 1, 1, 0)
    assert body["filename"] == "users.csv"
    failed = [e for e in body["report"] if e["status"] == "failed"]
    assert failed == [{"line": 2502, "status": "failed", "errors": {"email": "'nope' is not an email address"}}]
    assert {"line": 2501, "status": "updated", "kana_id": existing.kana_id} in body["report"]
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "finished" and job["progress"] == 1.0 and job["result"]["created"] == 2499
    listing = client.get("/api/v1/imports/csv", headers=workspace.headers).get_json()["imports"]
    assert listing[0]["id"] == import_id and "report" not in listing[0]


def test_api_refuses_bad_files_before_queueing(client, workspace):
    def post(data: bytes, name: str = "x.csv"):
        return client.post("/api/v1/imports/csv", headers=workspace.headers,
                           data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")

    bad = post("email,name\nzoë@example.com,Zoë\n".encode("cp1252"))
    assert bad.status_code == 400
    body = bad.get_json()
    assert body["code"] == "invalid_csv" and "not UTF-8" in body["message"] and body["errors"]["line"] == 2
    unknown = post(b"user_id,tier\n").get_json()
    assert "Unknown column 'tier'" in unknown["message"]
    missing = client.post("/api/v1/imports/csv", headers=workspace.headers, data={},
                          content_type="multipart/form-data")
    assert missing.status_code == 400 and "file" in missing.get_json()["errors"]
    huge = post(b"user_id\n" + b"u" * (csvfile.MAX_BYTES + 10))
    assert huge.status_code == 413 and "50 MB" in huge.get_json()["message"]
    with SessionLocal() as s:
        assert s.scalar(select(CsvImport).where(CsvImport.workspace_id == workspace.id)) is None


def test_api_export_streams_csv(client, workspace):
    with SessionLocal.begin() as s:
        add_user(s, workspace.id, user_id="u1", name="=1+1")
        add_user(s, workspace.id, user_id="u2", billing_id="cus_2")
        flags.refresh(s, workspace.id)
    resp = client.get("/api/v1/exports/users.csv", headers=workspace.headers)
    assert resp.status_code == 200 and resp.is_streamed
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in resp.headers["Content-Disposition"]
    rows = rows_of(resp.get_data(as_text=True))
    assert [r["user_id"] for r in rows] == ["u1", "u2"] and rows[0]["name"] == "'=1+1"
    only = rows_of(client.get("/api/v1/exports/users.csv?flag=missing_billing_id",
                              headers=workspace.headers).get_data(as_text=True))
    assert [r["user_id"] for r in only] == ["u1"]
    bad = client.get("/api/v1/exports/users.csv?flag=nope", headers=workspace.headers)
    assert bad.status_code == 400 and "flag" in bad.get_json()["errors"]
    assert client.get("/api/v1/exports/users.csv").status_code == 401


def test_cli_export_and_import_round_trip(settings, workspace, tmp_path):
    with SessionLocal.begin() as s:
        add_user(s, workspace.id, user_id="u1", email="a@example.com")
    env = worker_env(settings)
    out = tmp_path / "users.csv"
    result = CliRunner().invoke(cli, ["export", "csv", "--workspace", str(workspace.id), "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert text.startswith(HEADER) and ",u1," in text
    out.write_text(text + ",u2,Bob,b@example.com,cus_B,\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["import", "csv", "--workspace", str(workspace.id), str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert '"created": 1' in result.output and '"unchanged": 1' in result.output
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"user_id,foo,bar\n1,2,3\n")
    result = CliRunner().invoke(cli, ["import", "csv", "--workspace", str(workspace.id), str(bad)], env=env)
    assert result.exit_code != 0 and "Unknown columns 'foo', 'bar'" in result.output


def test_large_import_refreshes_planner_statistics_as_it_grows(workspace, monkeypatch):
    """On PostgreSQL a growing import ANALYZEs users (at 3 and 6 rows here); elsewhere it's skipped."""
    calls: list[bool] = []
    real = csvfile._refresh_statistics

    def spy(sessions):
        calls.append(real(sessions))
        return calls[-1]

    monkeypatch.setattr(csvfile, "ANALYZE_AFTER", 3)
    monkeypatch.setattr(csvfile, "_refresh_statistics", spy)
    with SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, workspace.id, "grow.csv").id
    data = ("user_id\n" + "\n".join(f"g{i}" for i in range(8)) + "\n").encode()
    summary = csvfile.run_import(SessionLocal, import_id, data, chunk_size=2)
    assert summary["status"] == "finished" and summary["created"] == 8
    postgres = SessionLocal().get_bind().dialect.name == "postgresql"
    assert calls == ([True, True] if postgres else [False])



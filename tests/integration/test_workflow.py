"""The seed workflow end to end, through the HTTP API and real RQ workers.

Stripe import → a Segment identify with a matching email claims the user → two
imports with one email stay unmerged and show in duplicate_email → export CSV,
fill in billing ids, import → a flags refresh shows the counts drop. Plus the
operator's merge and delete from the CLI.
"""

from __future__ import annotations

import csv
import io
import json

from click.testing import CliRunner
from sqlalchemy import select

from kana.cli import main as cli
from kana.db import SessionLocal
from kana.models import Audit
from tests.conftest import worker_env
from tests.fakes import fake_stripe, worker_settings  # noqa: F401 - fixtures


def run_job(client, ws, resp, work) -> dict:
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=ws.headers).get_json()
    assert job["status"] == "finished", job
    return job


def get_users(client, ws, **query) -> list[dict]:
    return client.get("/api/v1/users", headers=ws.headers, query_string=query).get_json()["users"]


def identify(client, ws, user_id: str, message_id: str, **traits) -> None:
    resp = client.post("/v1/identify", headers={"Authorization": f"Bearer {ws.ingest_key}"},
                       json={"userId": user_id, "messageId": message_id, "traits": traits})
    assert resp.status_code == 200, resp.get_json()


def refreshed_flags(client, ws, work) -> dict:
    run_job(client, ws, client.post("/api/v1/flags/refresh", headers=ws.headers), work)
    return client.get("/api/v1/flags", headers=ws.headers).get_json()


def test_seed_workflow_end_to_end(client, workspace, work, fake_stripe):  # noqa: F811
    ws = workspace
    fake_stripe.add("cus_ann", email="ann@example.com", name="Ann (Stripe)")
    fake_stripe.add("cus_dup1", email="dup@example.com", name="Dup One")
    fake_stripe.add("cus_dup2", email="Dup@Example.com", name="Dup Two")
    assert client.patch("/api/v1/workspace", headers=ws.headers,
                        json={"stripe_api_key": fake_stripe.api_key}).status_code == 200

    # 1. Stripe import: three unclaimed users.
    job = run_job(client, ws, client.post("/api/v1/imports/stripe", headers=ws.headers), work)
    assert job["result"]["created"] == 3
    imported = {u["billing_id"]: u for u in get_users(client, ws)}
    assert {u["user_id"] for u in imported.values()} == {None}
    assert {u["source"] for u in imported.values()} == {"stripe"}

    # 2. An identify with a matching email claims the Stripe user.
    identify(client, ws, "u-ann", "m1", email="ANN@example.com", name="Ann")
    # 3. Two imports share an email: an identify with it can't choose, so it creates a user.
    identify(client, ws, "u-dup", "m2", email="dup@example.com", name="Dee")
    identify(client, ws, "u-new", "m3", name="Newcomer")
    work()
    (ann,) = get_users(client, ws, user_id="u-ann")
    assert ann["kana_id"] == imported["cus_ann"]["kana_id"]
    assert (ann["billing_id"], ann["name"], ann["source"]) == ("cus_ann", "Ann", "stripe")
    assert len(get_users(client, ws, email="DUP@example.com")) == 3

    flags = refreshed_flags(client, ws, work)
    assert flags["missing_billing_id"]["count"] == 2  # u-dup, u-new
    assert flags["duplicate_email"]["count"] == 3
    (group,) = flags["duplicate_email"]["groups"]
    (dee,) = get_users(client, ws, user_id="u-dup")
    assert group == {"email": "dup@example.com",
                     "kana_ids": sorted([imported["cus_dup1"]["kana_id"], imported["cus_dup2"]["kana_id"],
                                         dee["kana_id"]])}

    # 4. Export the flagged users, fill in billing ids, import the file.
    resp = client.get("/api/v1/exports/users.csv?flag=any", headers=ws.headers)
    assert resp.status_code == 200
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert len(rows) == 4  # u-dup, u-new and the two Stripe duplicates
    by_user = {r["user_id"] or r["billing_id"]: r for r in rows}
    by_user["u-new"]["billing_id"] = "cus_new"
    by_user["u-dup"]["billing_id"] = "cus_dup1"
    by_user["cus_dup1"]["user_id"] = "u-dup"  # the operator says: this Stripe customer is u-dup
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    data = out.getvalue().encode()
    resp = client.post("/api/v1/imports/csv", headers=ws.headers,
                       data={"file": (io.BytesIO(data), "flagged.csv")}, content_type="multipart/form-data")
    run_job(client, ws, resp, work)
    report = client.get(f"/api/v1/imports/csv/{resp.get_json()['import_id']}", headers=ws.headers).get_json()
    assert report["status"] == "finished" and report["failed"] == 0, report
    assert (report["merged"], report["updated"]) == (1, 1), report
    statuses = {e["line"]: e["status"] for e in report["report"]}
    assert sorted(statuses.values()) == ["merged", "updated"]

    # The Stripe user created first survives, adopts u-dup, and u-dup resolves to it.
    (dup,) = get_users(client, ws, user_id="u-dup")
    assert dup["kana_id"] == imported["cus_dup1"]["kana_id"] and dup["billing_id"] == "cus_dup1"
    (new,) = get_users(client, ws, user_id="u-new")
    assert new["billing_id"] == "cus_new"

    # 5. The refresh shows both counts drop.
    after = refreshed_flags(client, ws, work)
    assert after["missing_billing_id"]["count"] == 0
    assert after["duplicate_email"]["count"] == 2  # cus_dup1 (now u-dup) and cus_dup2: different customers
    assert after["refreshed_at"] > flags["refreshed_at"]

    # Importing the same file again changes nothing.
    resp = client.post("/api/v1/imports/csv", headers=ws.headers,
                       data={"file": (io.BytesIO(data), "flagged.csv")}, content_type="multipart/form-data")
    run_job(client, ws, resp, work)
    again = client.get(f"/api/v1/imports/csv/{resp.get_json()['import_id']}", headers=ws.headers).get_json()
    assert (again["unchanged"], again["created"], again["updated"], again["merged"], again["failed"]) == (
        4, 0, 0, 0, 0), again

    # A later identify of u-dup lands on the survivor; the merge was audited as a CSV merge.
    identify(client, ws, "u-dup", "m4", name="Dee Again")
    work()
    (dup,) = get_users(client, ws, user_id="u-dup")
    assert dup["kana_id"] == imported["cus_dup1"]["kana_id"] and dup["name"] == "Dee Again"
    with SessionLocal() as s:
        audit = s.scalar(select(Audit).where(Audit.workspace_id == ws.id, Audit.action == "merge"))
    assert audit.trigger == "csv" and audit.survivor_kana_id == dup["kana_id"]


def test_operator_merge_and_delete_from_the_cli(client, settings, workspace, work):
    ws = workspace
    identify(client, ws, "a", "m1", email="same@example.com")
    identify(client, ws, "b", "m2", email="same@example.com", billingUserId="cus_b")
    identify(client, ws, "c", "m3")
    work()
    ids = {u["user_id"]: u["kana_id"] for u in get_users(client, ws)}
    env = worker_env(settings)
    runner = CliRunner()
    result = runner.invoke(cli, ["users", "merge", "--workspace", str(ws.id), str(ids["b"]), str(ids["a"])], env=env)
    assert result.exit_code == 0, result.output
    survivor = json.loads(result.output)
    assert survivor["kana_id"] == ids["a"] and survivor["billing_id"] == "cus_b" and survivor["aliases"] == ["b"]
    (b,) = get_users(client, ws, user_id="b")  # the merged-away user_id resolves to the survivor
    assert b["kana_id"] == ids["a"]
    missing = runner.invoke(cli, ["users", "merge", "--workspace", str(ws.id), str(ids["a"]), "999999"], env=env)
    assert missing.exit_code != 0 and "no user with kana_id 999999" in missing.output
    result = runner.invoke(cli, ["users", "delete", "--workspace", str(ws.id), str(ids["c"])], env=env, input="y\n")
    assert result.exit_code == 0, result.output
    assert get_users(client, ws, user_id="c") == []
    with SessionLocal() as s:
        actions = {(a.action, a.trigger) for a in s.scalars(select(Audit).where(Audit.workspace_id == ws.id))}
    assert {("merge", "cli"), ("delete", "cli")} <= actions

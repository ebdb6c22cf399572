"""SPEC §5: Stripe (and Chargebee) customer imports, through the official libraries over real HTTP."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from kana.cli import main as cli
from kana.db import SessionLocal
from kana.imports import customers
from kana.models import User, Workspace
from tests.fakes import fake_chargebee, fake_stripe, worker_settings  # noqa: F401 - fixtures


def set_workspace(ws_id: int, **values) -> None:
    with SessionLocal.begin() as s:
        row = s.get(Workspace, ws_id)
        for key, value in values.items():
            setattr(row, key, value)


def users(ws_id: int) -> list[User]:
    with SessionLocal() as s:
        return list(s.scalars(select(User).where(User.workspace_id == ws_id).order_by(User.kana_id)))


def run_stripe(settings, fake, ws_id: int) -> dict[str, int]:
    from dataclasses import replace

    return customers.run(SessionLocal, ws_id, "stripe", replace(settings, stripe_api_base=fake.url))


def test_stripe_import_pages_through_customers_and_is_idempotent(settings, workspace, fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key=fake_stripe.api_key)
    for i in range(250):
        fake_stripe.add(f"cus_{i:04d}", email=f"c{i}@example.com" if i % 10 else None, name=f"Customer {i}")
    assert run_stripe(settings, fake_stripe, workspace.id) == {"created": 250, "updated": 0, "unchanged": 0,
                                                               "skipped": 0}
    pages = [r["args"] for r in fake_stripe.requests]
    assert len(pages) == 3 and pages[0] == {"limit": "100"} and pages[1]["starting_after"] == "cus_0099"
    rows = users(workspace.id)
    assert len(rows) == 250
    first = rows[1]
    assert (first.user_id, first.email, first.email_key, first.name, first.billing_id, first.billing_provider,
            first.source) == (None, "c1@example.com", "c1@example.com", "Customer 1", "cus_0001", "stripe", "stripe")
    assert rows[0].email is None
    assert run_stripe(settings, fake_stripe, workspace.id) == {"created": 0, "updated": 0, "unchanged": 250,
                                                               "skipped": 0}
    assert len(users(workspace.id)) == 250


def test_stripe_updates_unclaimed_users_and_only_fills_blanks_of_claimed_ones(settings, workspace,
                                                                             fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key=fake_stripe.api_key)
    unclaimed = fake_stripe.add("cus_U", email="old@example.com", name="Old")
    claimed = fake_stripe.add("cus_C", email="stripe@example.com", name="Stripe Name")
    run_stripe(settings, fake_stripe, workspace.id)
    with SessionLocal.begin() as s:
        user = s.scalar(select(User).where(User.billing_id == "cus_C", User.workspace_id == workspace.id))
        user.user_id, user.email, user.email_key, user.name = "u1", "app@example.com", "app@example.com", None
    unclaimed.update(email="New@example.com", name="New")
    claimed.update(email="changed@example.com", name="Filled")
    assert run_stripe(settings, fake_stripe, workspace.id) == {"created": 0, "updated": 2, "unchanged": 0,
                                                               "skipped": 0}
    by_billing = {u.billing_id: u for u in users(workspace.id)}
    assert (by_billing["cus_U"].email, by_billing["cus_U"].email_key, by_billing["cus_U"].name) == (
        "New@example.com", "new@example.com", "New")
    # Segment owns a claimed user's email; the import only filled the blank name.
    assert (by_billing["cus_C"].email, by_billing["cus_C"].name) == ("app@example.com", "Filled")


def test_stripe_bad_key_is_reported_clearly(settings, workspace, fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key="sk_test_wrong")
    with pytest.raises(customers.ImportFailed, match=r"Stripe rejected the API key \(HTTP 401\)"):
        run_stripe(settings, fake_stripe, workspace.id)


def test_stripe_rate_limit_retried_by_the_library_when_stripe_says_so(settings, workspace,
                                                                      fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key=fake_stripe.api_key)
    fake_stripe.add("cus_1", email="a@example.com")
    fake_stripe.rate_limit = 1  # 429 with Stripe-Should-Retry: true, then success
    assert run_stripe(settings, fake_stripe, workspace.id)["created"] == 1
    assert len(fake_stripe.requests) == 2


def test_stripe_rate_limit_without_retry_advice_resumes_after_last_customer(fake_stripe):  # noqa: F811
    for i in range(5):
        fake_stripe.add(f"cus_{i}")
    pauses: list[float] = []
    listing = customers.stripe_customers(fake_stripe.api_key, api_base=fake_stripe.url, page_size=2,
                                              sleep=pauses.append)
    got = [next(listing).billing_id for _ in range(2)]
    fake_stripe.rate_limit, fake_stripe.should_retry = 1, False
    got += [c.billing_id for c in listing]
    assert got == [f"cus_{i}" for i in range(5)] and pauses == [2.0]
    assert fake_stripe.requests[2]["args"]["starting_after"] == "cus_1"
    fake_stripe.rate_limit = 100
    with pytest.raises(customers.ImportFailed, match="kept rate-limiting"):
        list(customers.stripe_customers(fake_stripe.api_key, api_base=fake_stripe.url, sleep=pauses.append,
                                             max_network_retries=0))


def test_stripe_unreachable_is_reported(workspace):
    with pytest.raises(customers.ImportFailed, match="Could not reach Stripe at http://127.0.0.1:9"):
        list(customers.stripe_customers("sk_test_x", api_base="http://127.0.0.1:9", max_network_retries=0))


def test_api_stripe_import_job(client, workspace, work, fake_stripe):  # noqa: F811
    fake_stripe.add("cus_A", email="a@example.com", name="Ann")
    missing = client.post("/api/v1/imports/stripe", headers=workspace.headers)
    assert missing.status_code == 400 and "No Stripe API key" in missing.get_json()["message"]
    resp = client.patch("/api/v1/workspace", headers=workspace.headers, json={"stripe_api_key": fake_stripe.api_key})
    assert resp.status_code == 200 and fake_stripe.api_key not in resp.get_data(as_text=True)
    resp = client.post("/api/v1/imports/stripe", headers=workspace.headers)
    assert resp.status_code == 202
    job_id = resp.get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "finished" and job["result"] == {"created": 1, "updated": 0, "unchanged": 0,
                                                             "skipped": 0}
    assert [u["billing_id"] for u in client.get("/api/v1/users", headers=workspace.headers).get_json()["users"]] \
        == ["cus_A"]


def test_api_stripe_import_with_a_bad_key_fails_with_the_reason(client, workspace, work, fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key="sk_test_revoked")
    job_id = client.post("/api/v1/imports/stripe", headers=workspace.headers).get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "failed" and "Stripe rejected the API key" in job["error"]


def test_stripe_import_refused_for_a_chargebee_workspace(client, workspace):
    set_workspace(workspace.id, billing_provider="chargebee", stripe_api_key="sk_test_x")
    resp = client.post("/api/v1/imports/stripe", headers=workspace.headers)
    assert resp.status_code == 400 and "bills with chargebee" in resp.get_json()["message"]


def test_cli_import_stripe(settings, workspace, fake_stripe):  # noqa: F811
    set_workspace(workspace.id, stripe_api_key=fake_stripe.api_key)
    fake_stripe.add("cus_A", email="a@example.com")
    env = {"DATABASE_URL": settings.database_url, "STRIPE_API_BASE": fake_stripe.url}
    result = CliRunner().invoke(cli, ["import", "stripe", "--workspace", str(workspace.id)], env=env)
    assert result.exit_code == 0, result.output
    assert '"created": 1' in result.output
    set_workspace(workspace.id, stripe_api_key="sk_test_bad")
    result = CliRunner().invoke(cli, ["import", "stripe", "--workspace", str(workspace.id)], env=env)
    assert result.exit_code != 0 and "Stripe rejected the API key" in result.output


# --- Chargebee ------------------------------------------------------------------------------


def test_chargebee_import_pages_retries_429_and_is_idempotent(client, workspace, work, fake_chargebee):  # noqa: F811
    for i in range(150):
        fake_chargebee.add(f"cb_{i}", email=f"c{i}@example.com", first_name="First", last_name=str(i))
    fake_chargebee.add("AzZ-company.1", email=None, company="Acme Ltd")
    missing = client.post("/api/v1/imports/chargebee", headers=workspace.headers)
    assert missing.status_code == 400 and "chargebee_site" in missing.get_json()["message"]
    set_workspace(workspace.id, billing_provider="chargebee", chargebee_site="acme-test",
                  chargebee_api_key=fake_chargebee.api_key)
    fake_chargebee.rate_limit = 1
    job_id = client.post("/api/v1/imports/chargebee", headers=workspace.headers).get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["status"] == "finished", job
    assert job["result"] == {"created": 151, "updated": 0, "unchanged": 0, "skipped": 0}
    assert [r["args"].get("offset") for r in fake_chargebee.requests] == [None, None, "100"]
    rows = {u.billing_id: u for u in users(workspace.id)}
    assert (rows["cb_7"].name, rows["cb_7"].email, rows["cb_7"].source, rows["cb_7"].billing_provider) == (
        "First 7", "c7@example.com", "chargebee", "chargebee")
    assert rows["AzZ-company.1"].name == "Acme Ltd"
    job_id = client.post("/api/v1/imports/chargebee", headers=workspace.headers).get_json()["job_id"]
    work()
    job = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers).get_json()
    assert job["result"]["unchanged"] == 151


def test_chargebee_bad_key_is_reported_clearly(fake_chargebee):  # noqa: F811
    with pytest.raises(customers.ImportFailed, match=r"Chargebee rejected the API key .* \(HTTP 401\)"):
        list(customers.chargebee_customers("wrong", "acme-test", api_base=fake_chargebee.url))

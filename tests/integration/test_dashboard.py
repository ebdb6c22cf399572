"""The operator dashboard (SPEC §8) through Flask's test client: access, CSRF, escaping, isolation, actions."""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import func, select

from kana.cli import main as cli
from kana.db import SessionLocal
from kana.domain import accounts, flags, identity, rules
from kana.ingest import spool
from kana.models import ApiKey, Audit, DashboardAdmin, DeadLetter, Event, Feature, User, Workspace
from tests.conftest import worker_env
from tests.fakes import fake_stripe, worker_settings  # noqa: F401 - fixtures
from tests.helpers import make_user
from tests.unit.test_dashboard import T0

PASSWORD = "correct horse battery staple"


# Every page and JSON endpoint a logged-out visitor might try (GET).
PAGES = [
    "/dashboard/", "/dashboard/users", "/dashboard/users?flag=duplicate_email", "/dashboard/users/1",
    "/dashboard/users/merge?kana_id=1&kana_id=2", "/dashboard/users/delete?kana_id=1", "/dashboard/audit",
    "/dashboard/csv", "/dashboard/csv/export", "/dashboard/csv/imports/1", "/dashboard/features",
    "/dashboard/features/x", "/dashboard/rules", "/dashboard/rules/new", "/dashboard/rules/1", "/dashboard/events",
    "/dashboard/events/failed", "/dashboard/keys", "/dashboard/keys/1/revoke", "/dashboard/settings",
    "/rq/", "/rq/0/view/workers", "/rq/0/data/queues.json", "/rq/0/data/workers.json",
]


JSON_ENDPOINTS = ["/dashboard/jobs/abc.json", "/dashboard/csv/imports/1.json"]


@dataclass
class AdminInfo:
    workspace_id: int
    email: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_admin(workspace_id: int, email: str = "ops@acme.test", password: str = PASSWORD) -> None:
    with SessionLocal.begin() as s:
        accounts.create_admin(s, workspace_id, email, password)


@pytest.fixture
def admin(workspace) -> AdminInfo:
    email = f"ops-{uuid.uuid4().hex[:8]}@acme.test"
    make_admin(workspace.id, email)
    return AdminInfo(workspace.id, email, workspace.key)


def csrf_token(client, path: str = "/dashboard/login") -> str:
    page = client.get(path, follow_redirects=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def log_in(client, email: str, password: str = PASSWORD, workspace: int | None = None, **extra):
    data = {"email": email, "password": password, "csrf_token": csrf_token(client), **extra}
    if workspace is not None:
        data["workspace"] = str(workspace)
    return client.post("/dashboard/login", data=data)


@pytest.fixture
def browser(client, admin):
    """A test client logged in as ``admin``."""
    resp = log_in(client, admin.email)
    assert resp.status_code == 302, resp.get_data(as_text=True)
    return client


def exists(kana_id: int) -> bool:
    with SessionLocal() as s:
        return s.get(User, kana_id) is not None


def post(client, path: str, data: dict | None = None, token_from: str = "/dashboard/", **kw):
    """A dashboard form submission with the CSRF token of the session."""
    return client.post(path, data={**(data or {}), "csrf_token": csrf_token(client, token_from)}, **kw)


def text(resp) -> str:
    return resp.get_data(as_text=True)


def test_root_redirects_to_the_dashboard(client):
    resp = client.get("/")
    assert resp.status_code == 302 and resp.location.endswith("/dashboard/")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_a_login(client, path):
    resp = client.get(path)
    assert resp.status_code == 302, path
    assert "/dashboard/login" in resp.location


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_json_endpoints_answer_401_without_a_login(client, path):
    assert client.get(path).status_code == 401


def test_static_files_and_login_page_are_public(client):
    assert client.get("/dashboard/static/dashboard.css").status_code == 200
    assert client.get("/dashboard/login").status_code == 200


def test_logged_out_post_with_a_valid_token_still_needs_a_login(client, workspace):
    kana_id = make_user(workspace.id, "victim")
    token = csrf_token(client)  # a real token of this (anonymous) session
    resp = client.post("/dashboard/users/delete", data={"kana_id": kana_id, "csrf_token": token})
    assert resp.status_code == 302 and "/dashboard/login" in resp.location
    assert exists(kana_id)


def test_login_logout_and_cookie_flags(client, admin):
    resp = log_in(client, admin.email.upper())  # emails compare case-insensitively
    assert resp.status_code == 302 and resp.location.endswith("/dashboard/")
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = client.get("/dashboard/")
    assert page.status_code == 200 and admin.email in text(page)
    with SessionLocal() as s:
        row = s.scalar(select(DashboardAdmin).where(DashboardAdmin.email == admin.email))
        assert row.last_login_at is not None
        assert row.password_hash.startswith("scrypt:") and PASSWORD not in row.password_hash
    resp = post(client, "/dashboard/logout")
    assert resp.status_code == 302
    assert client.get("/dashboard/").status_code == 302


@pytest.mark.parametrize("email,password", [("ops@acme.test", "wrong password!"), ("nobody@acme.test", PASSWORD)])
def test_wrong_credentials_are_refused(client, admin, email, password):
    resp = log_in(client, admin.email if email == "ops@acme.test" else email, password)
    assert resp.status_code == 401
    assert "Wrong email or password" in text(resp)
    assert client.get("/dashboard/").status_code == 302


def test_login_never_redirects_off_site(client, admin):
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        resp = log_in(client, admin.email, next=target)
        assert resp.status_code == 302 and resp.location.endswith("/dashboard/"), target
    resp = log_in(client, admin.email, next="/dashboard/keys")
    assert resp.location.endswith("/dashboard/keys")


def test_login_attempts_are_rate_limited(client, runtime, admin):
    limit = runtime.settings.login_attempts
    for _ in range(limit):
        assert log_in(client, admin.email, "not the password").status_code == 401
    # Past the limit even the right password is refused until the window passes.
    resp = log_in(client, admin.email)
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert "Too many login attempts" in text(resp)
    assert client.get("/dashboard/").status_code == 302


def test_rate_limit_counts_per_address_across_emails(client, runtime, admin):
    limit = runtime.settings.login_attempts * accounts.ADDRESS_FACTOR
    for i in range(limit):
        log_in(client, f"guess{i}@acme.test", "whatever password")
    assert log_in(client, admin.email).status_code == 429


def test_one_email_in_two_workspaces_needs_the_workspace(client, workspace, new_workspace):
    other = new_workspace("other")
    make_admin(workspace.id, "shared@acme.test")
    make_admin(other.id, "shared@acme.test")
    resp = log_in(client, "shared@acme.test")
    assert resp.status_code == 400 and "workspace ID" in text(resp)
    resp = log_in(client, "shared@acme.test", workspace=other.id)
    assert resp.status_code == 302
    with SessionLocal() as s:
        name = s.get(Workspace, other.id).name
    assert name in text(client.get("/dashboard/"))


def test_changing_the_password_ends_sessions(client, browser, admin):
    with SessionLocal.begin() as s:
        row = s.scalar(select(DashboardAdmin).where(DashboardAdmin.email == admin.email))
        accounts.set_password(s, row, "a brand new password")
    assert browser.get("/dashboard/").status_code == 302


def test_admin_cli(settings, workspace):
    runner = CliRunner()
    env = worker_env(settings)
    ok = runner.invoke(cli, ["admin", "create", "--workspace", str(workspace.id), "--email", "Cli@Acme.test",
                             "--password", PASSWORD], env=env)
    assert ok.exit_code == 0, ok.output
    assert "cli@acme.test" in ok.output
    again = runner.invoke(cli, ["admin", "create", "--workspace", str(workspace.id), "--email", "cli@acme.test",
                                "--password", PASSWORD], env=env)
    assert again.exit_code != 0 and "already an admin" in again.output
    short = runner.invoke(cli, ["admin", "create", "--workspace", str(workspace.id), "--email", "x@acme.test",
                                "--password", "short"], env=env)
    assert short.exit_code != 0 and "at least" in short.output
    prompted = runner.invoke(cli, ["admin", "create", "--workspace", str(workspace.id), "--email", "p@acme.test"],
                             input=f"{PASSWORD}\n{PASSWORD}\n", env=env)
    assert prompted.exit_code == 0, prompted.output
    listed = runner.invoke(cli, ["admin", "list", "--workspace", str(workspace.id)], env=env)
    assert "cli@acme.test" in listed.output and "p@acme.test" in listed.output
    with SessionLocal() as s:
        row = s.scalar(select(DashboardAdmin).where(DashboardAdmin.email == "cli@acme.test"))
        assert accounts.authenticate(s, "cli@acme.test", PASSWORD, workspace.id) is not None
        assert row.workspace_id == workspace.id


def test_forms_without_a_csrf_token_are_refused(browser, workspace):
    kana_id = make_user(workspace.id, "keep-me")
    for data in ({"kana_id": kana_id}, {"kana_id": kana_id, "csrf_token": "forged"}):
        resp = browser.post("/dashboard/users/delete", data=data)
        assert resp.status_code == 400
        assert "CSRF" in text(resp)
    assert exists(kana_id)
    assert browser.post("/dashboard/keys", data={"scope": "admin"}).status_code == 400
    assert browser.post("/dashboard/flags/refresh").status_code == 400


def test_login_form_needs_its_csrf_token(client, admin):
    resp = client.post("/dashboard/login", data={"email": admin.email, "password": PASSWORD})
    assert resp.status_code == 400
    assert client.get("/dashboard/").status_code == 302


def test_receiver_and_json_api_need_no_csrf_token(browser, admin):
    # Even with a dashboard session cookie in the jar, API-key requests are not CSRF-checked.
    resp = browser.post("/v1/track", json={"userId": "u1", "event": "Clicked"}, headers=admin.headers)
    assert resp.status_code == 200, text(resp)
    resp = browser.post("/api/v1/users", json={"user_id": "api-user"}, headers=admin.headers)
    assert resp.status_code == 201, text(resp)


def test_rq_dashboard_is_behind_the_login_and_refuses_cross_site_posts(browser, client, admin):
    assert browser.get("/rq/").status_code == 403  # a workspace admin: not an installation operator
    with SessionLocal.begin() as s:
        s.scalar(select(DashboardAdmin).where(DashboardAdmin.email == admin.email)).operator = True
    page = browser.get("/rq/")
    assert page.status_code == 200 and "RQ" in text(page)
    assert browser.get("/rq/0/data/queues.json").status_code == 200
    cross = browser.post("/rq/requeue/kana", headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert browser.post("/rq/requeue/kana").status_code == 403  # neither Origin nor Referer
    same = browser.post("/rq/requeue/kana", headers={"Origin": "http://localhost"})
    assert same.status_code == 200
    assert browser.get("/rq/requeue/kana").status_code == 405  # state changes only by POST
    # Deleting jobs and emptying the shared queues is switched off.
    emptied = browser.post("/rq/queue/kana/queued/empty", headers={"Origin": "http://localhost"})
    assert emptied.get_json() == {"status": "DISABLED"}


def test_user_supplied_strings_are_escaped(browser, workspace, work):
    evil = "<script>alert(1)</script>"
    kana_id = make_user(workspace.id, "<img src=x onerror=alert(2)>", name=evil, email="x@acme.test")
    resp = browser.post("/v1/track", json={"userId": "<img src=x onerror=alert(2)>", "event": evil,
                                           "properties": {"html": "<b onmouseover=alert(3)>"}},
                        headers=workspace.headers)
    assert resp.status_code == 200
    work()
    pages = [f"/dashboard/users/{kana_id}", "/dashboard/users", "/dashboard/users?q=%3Cscript",
             "/dashboard/events?status=unmapped", f"/dashboard/users/delete?kana_id={kana_id}"]
    for path in pages:
        body = text(browser.get(path))
        assert "<script>alert(1)" not in body, path
        assert "<img src=x" not in body and "<b onmouseover" not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text(browser.get(f"/dashboard/users/{kana_id}"))


def test_pages_send_a_strict_content_security_policy(browser):
    resp = browser.get("/dashboard/")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"


def test_an_admin_sees_and_changes_only_their_workspace(browser, admin, new_workspace):
    other = new_workspace("other customer")
    theirs = make_user(other.id, "their-user", email="same@acme.test", name="Their User")
    theirs2 = make_user(other.id, "their-user-2", email="same@acme.test")
    mine = make_user(admin.workspace_id, "my-user", email="same@acme.test")
    with SessionLocal.begin() as s:
        flags.refresh(s, other.id)
        their_key = s.scalar(select(ApiKey.id).where(ApiKey.workspace_id == other.id))
        s.add(Feature(workspace_id=other.id, id="secret-feature", name="Secret", type="consumable"))
        their_rule = rules.create_rule(s, other.id, {"feature_id": "secret-feature", "event": "X"}).id
        s.add(DeadLetter(workspace_id=other.id, message_id="m-theirs", user_id="their-user",
                         payload={"userId": "their-user", "messageId": "m-theirs"}, error="boom"))

    assert browser.get(f"/dashboard/users/{theirs}").status_code == 404
    listing = text(browser.get("/dashboard/users"))
    assert "their-user" not in listing and "my-user" in listing
    assert "their-user" not in text(browser.get("/dashboard/users?q=their"))
    assert "same@acme.test" not in text(browser.get("/dashboard/users?flag=duplicate_email"))
    assert browser.get(f"/dashboard/users/merge?kana_id={theirs}&kana_id={theirs2}").status_code == 404
    assert post(browser, "/dashboard/users/merge", {"kana_id": [mine, theirs]}).status_code == 404
    assert post(browser, "/dashboard/users/merge", {"kana_id": [theirs, theirs2]}).status_code == 404
    assert post(browser, "/dashboard/users/delete", {"kana_id": [theirs]}).status_code == 404
    assert exists(theirs) and exists(theirs2) and exists(mine)
    assert post(browser, f"/dashboard/keys/{their_key}/revoke").status_code == 404
    assert post(browser, f"/dashboard/rules/{their_rule}/delete").status_code == 404
    assert browser.get("/dashboard/features/secret-feature").status_code == 404
    assert "secret-feature" not in text(browser.get("/dashboard/features"))
    assert "m-theirs" not in text(browser.get("/dashboard/events/failed"))
    with SessionLocal() as s:
        assert s.get(ApiKey, their_key).revoked_at is None
        dead = s.scalar(select(DeadLetter.id).where(DeadLetter.message_id == "m-theirs"))
    assert post(browser, f"/dashboard/events/failed/{dead}/retry").status_code == 404
    csv = text(browser.get("/dashboard/csv/export"))
    assert "their-user" not in csv and "my-user" in csv


def test_jobs_and_imports_of_another_workspace_are_not_found(browser, new_workspace, runtime):
    other = new_workspace("other")
    from kana.imports import csvfile
    from kana.services import flags as flag_actions

    job_id = flag_actions.refresh(runtime, other.id)
    assert browser.get(f"/dashboard/jobs/{job_id}.json").status_code == 404
    assert "Refreshing" not in text(browser.get(f"/dashboard/?job={job_id}"))
    with SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, other.id, "theirs.csv").id
    assert browser.get(f"/dashboard/csv/imports/{import_id}").status_code == 404
    assert browser.get(f"/dashboard/csv/imports/{import_id}.json").status_code == 404


def test_overview_shows_flag_counts_and_refresh(browser, admin, work):
    ws = admin.workspace_id
    make_user(ws, "a", email="dup@acme.test", billing_id="cus_A")
    make_user(ws, "b", email="DUP@acme.test")
    make_user(ws, None, email="c@acme.test")
    page = text(browser.get("/dashboard/"))
    assert "Flags last refreshed: <strong id=\"refreshed-at\">never" in page
    resp = post(browser, "/dashboard/flags/refresh")
    assert resp.status_code == 302 and "job=" in resp.location
    work()
    page = text(browser.get(resp.location))
    assert "Flags refreshed: 2 users without a billing id, 2 sharing an email." in page
    box = page.split('id="flag-missing_billing_id"')[1]
    assert re.search(r'data-count>2<', box)
    box = page.split('id="flag-duplicate_email"')[1]
    assert re.search(r'data-count>2<', box) and "dup@acme.test" in box
    job_id = resp.location.split("job=")[1]
    state = browser.get(f"/dashboard/jobs/{job_id}.json").get_json()
    assert state["status"] == "finished" and state["progress"] == 1.0


def test_overview_counts_events_and_charts_them(browser, admin, work):
    calls = [{"type": "track", "userId": f"u{i}", "event": "Clicked"} for i in range(5)]
    assert browser.post("/v1/batch", json={"batch": calls}, headers=admin.headers).status_code == 200
    before = text(browser.get("/dashboard/"))
    assert 'data-stat="received">5<' in before and 'data-stat="pending">5<' in before
    work()
    page = text(browser.get("/dashboard/"))
    assert 'data-stat="processed">5<' in page and 'data-stat="pending">0<' in page
    assert 'data-stat="failed"><a href="/dashboard/events/failed">0<' in page
    assert page.count('<rect class="bar') == 24
    assert re.search(r"<title>\d\d:00: 5</title>", page)


def test_users_search_filter_and_keyset_pages(browser, admin):
    ws = admin.workspace_id
    ids = [make_user(ws, f"user-{i:03}", email=f"person{i}@example.com", name=f"Person {i}") for i in range(60)]
    make_user(ws, None, email="Needle@Example.com", name="Stripe Person", billing_id="cus_1")
    first = text(browser.get("/dashboard/users"))
    assert f"#{ids[-1]}<" in first and f"#{ids[0]}<" not in first
    after = re.search(r'href="/dashboard/users\?after=(\d+)"', first.replace("&amp;", "&")).group(1)
    second = text(browser.get(f"/dashboard/users?after={after}"))
    assert f"#{ids[0]}<" in second and f"#{ids[-1]}<" not in second
    assert "Newest" in second
    found = text(browser.get("/dashboard/users?q=needle"))
    assert "Stripe Person" in found and "Person 1<" not in found
    assert "user-007" in text(browser.get("/dashboard/users?q=USER-007"))  # substring, any case
    assert "Person 42" in text(browser.get("/dashboard/users?q=person 42"))
    # An exact user_id or email is found by index lookups first, with a way to search everywhere.
    make_user(ws, "legacy-user-001")
    exact = text(browser.get("/dashboard/users?q=user-001"))
    assert 'id="exact-note"' in exact and "user-001" in exact and "legacy-user-001" not in exact
    everywhere = text(browser.get("/dashboard/users?q=user-001&match=contains"))
    assert ">user-001<" in everywhere and "legacy-user-001" in everywhere
    assert 'id="exact-note"' in text(browser.get("/dashboard/users?q=NEEDLE@example.com"))
    with SessionLocal.begin() as s:
        flags.refresh(s, ws)
    missing = text(browser.get("/dashboard/users?flag=missing_billing_id"))
    assert "user-059" in missing and "Stripe Person" not in missing


def test_duplicate_email_users_are_grouped_for_merging(browser, admin):
    ws = admin.workspace_id
    a = make_user(ws, "a1", email="twin@acme.test", created_at=T0)
    b = make_user(ws, None, email="TWIN@acme.test", billing_id="cus_B", created_at=T0 + timedelta(days=1))
    make_user(ws, "solo", email="solo@acme.test")
    with SessionLocal.begin() as s:
        flags.refresh(s, ws)
    page = text(browser.get("/dashboard/users?flag=duplicate_email"))
    assert 'data-email="twin@acme.test"' in page
    assert f'value="{a}"' in page and f'value="{b}"' in page and "solo@acme.test" not in page


def test_merge_preview_shows_the_survivor_and_changes_nothing(browser, admin):
    ws = admin.workspace_id
    old = make_user(ws, None, email="ann@acme.test", billing_id="cus_OLD", name=None, created_at=T0)
    new = make_user(ws, "ann-app", email="ann@acme.test", name="Ann", created_at=T0 + timedelta(hours=1))
    page = browser.get(f"/dashboard/users/merge?kana_id={new}&kana_id={old}")
    assert page.status_code == 200
    body = text(page)
    assert f'id="survivor">#{old}<' in body
    assert f'data-result="name">Ann <span class="muted">(from #{new})' in body
    assert 'data-result="billing_id">cus_OLD<' in body
    assert f'data-result="user_id">ann-app <span class="muted">(from #{new})' in body
    assert 'id="dropped"' not in body  # nothing of #new is lost (its user_id becomes the survivor's)
    # The preview ran the real merge and rolled it back.
    assert exists(old) and exists(new)
    with SessionLocal() as s:
        assert s.scalar(select(func.count()).select_from(Audit).where(Audit.workspace_id == ws)) == 0


def test_merge_keeps_the_oldest_and_is_audited(browser, admin, work):
    ws = admin.workspace_id
    old = make_user(ws, "first", email="bo@acme.test", created_at=T0)
    new = make_user(ws, "second", email="bo@acme.test", name="Bo", created_at=T0 + timedelta(days=2))
    calls = [{"type": "track", "userId": "second", "event": "Clicked"}]
    assert browser.post("/v1/batch", json={"batch": calls}, headers=admin.headers).status_code == 200
    work()
    resp = post(browser, "/dashboard/users/merge", {"kana_id": [new, old]})
    assert resp.status_code == 302 and resp.location.endswith(f"/dashboard/users/{old}")
    page = text(browser.get(resp.location))
    assert f"Merged #{new} into #{old}" in page and "audit entry #" in page
    assert 'data-field="name">Bo<' in page and "<code>second</code>" in page  # filled blank, alias
    assert "Clicked" in page  # the merged user's events moved
    assert not exists(new)
    audit = text(browser.get("/dashboard/audit"))
    assert "dashboard" in audit and f"dashboard:{admin.email}" in audit and f"#{old}, #{new}" in audit


def test_merge_preview_warns_about_values_that_are_not_kept(browser, admin):
    ws = admin.workspace_id
    a = make_user(ws, "e1", email="eve@acme.test", billing_id="cus_EVE1", created_at=T0)
    b = make_user(ws, "e2", email="EVE@acme.test", billing_id="cus_EVE2", created_at=T0 + timedelta(days=1))
    body = text(browser.get(f"/dashboard/users/merge?kana_id={a}&kana_id={b}"))
    dropped = body.split('id="dropped"')[1].split("</div>")[0]
    assert f"billing_id <code>cus_EVE2</code> of #{b}" in dropped
    assert "email" not in dropped  # the same email in another case is not a loss


def test_merge_needs_two_users_and_existing_ones(browser, admin):
    ws = admin.workspace_id
    one = make_user(ws, "one")
    resp = browser.get(f"/dashboard/users/merge?kana_id={one}")
    assert resp.status_code == 302
    assert "at least two users" in text(browser.get(resp.location))
    assert browser.get(f"/dashboard/users/merge?kana_id={one}&kana_id=999999999").status_code == 404
    assert browser.get("/dashboard/users/merge?kana_id=abc&kana_id=1").status_code == 400


def test_delete_asks_then_deletes_with_events(browser, admin, work):
    ws = admin.workspace_id
    calls = [{"type": "track", "userId": "gone", "event": "Clicked"}]
    browser.post("/v1/batch", json={"batch": calls}, headers=admin.headers)
    work()
    with SessionLocal() as s:
        kana_id = identity.find_user(s, ws, "gone").kana_id
    confirm = text(browser.get(f"/dashboard/users/delete?kana_id={kana_id}"))
    assert "Delete permanently" in confirm and "gone" in confirm
    assert exists(kana_id)
    resp = post(browser, "/dashboard/users/delete", {"kana_id": kana_id, "next": f"/dashboard/users/{kana_id}"})
    assert resp.status_code == 302 and resp.location.endswith("/dashboard/users")
    assert not exists(kana_id)
    with SessionLocal() as s:
        assert s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws)) == 0
        audit = s.scalar(select(Audit).where(Audit.workspace_id == ws, Audit.action == "delete"))
        assert audit.trigger == "dashboard" and audit.kana_ids == [kana_id]


def test_user_page_usage_chart_and_sessions(browser, admin, work):
    ws = admin.workspace_id
    with SessionLocal.begin() as s:
        s.add(Feature(workspace_id=ws, id="exports", name="Exports", type="consumable"))
    now = datetime.now(UTC).replace(microsecond=0)
    stamps = [now - timedelta(hours=5), now - timedelta(hours=5) + timedelta(minutes=10),
              now - timedelta(hours=1), now]
    calls = [{"type": "identify", "userId": "tl", "traits": {"name": "Tim"}, "timestamp": stamps[0].isoformat()}]
    calls += [{"type": "track", "userId": "tl", "event": "Exported", "timestamp": t.isoformat(),
               "properties": {"featureId": "exports", "delta": 2}} for t in stamps[1:]]
    assert browser.post("/v1/batch", json={"batch": calls}, headers=admin.headers).status_code == 200
    work()
    with SessionLocal() as s:
        kana_id = identity.find_user(s, ws, "tl").kana_id
    page = text(browser.get(f"/dashboard/users/{kana_id}"))
    assert 'data-usage="exports">6<' in page
    assert page.count('class="session"') == 3  # 5h ago (2 events, 10 min apart), 1h ago, now
    assert "Usage of exports per day" in page
    hourly = text(browser.get(f"/dashboard/users/{kana_id}?feature=exports&window=hour"))
    assert hourly.count('<rect class="bar') == 48


def test_rule_creation_reprocesses_stored_unmapped_events(browser, admin, work):
    calls = [{"type": "track", "userId": f"r{i}", "event": "Report Exported", "properties": {"plan": {"tier": t}}}
             for i, t in enumerate(["pro", "pro", "free"])]
    browser.post("/v1/batch", json={"batch": calls}, headers=admin.headers)
    work()
    unmapped = text(browser.get("/dashboard/events?status=unmapped"))
    assert unmapped.count("no rule matched") == 3
    resp = post(browser, "/dashboard/features", {"id": "reports", "name": "Reports", "type": "consumable"})
    assert resp.status_code == 302
    work()
    form = {"type": "track", "event": "Report Exported", "feature_id": "reports", "rows": "3",
            "cond-0-property": "plan.tier", "cond-0-operator": "equals", "cond-0-value": "pro",
            "priority": "100", "enabled": "1"}
    resp = post(browser, "/dashboard/rules", form)
    assert resp.status_code == 302 and "job=" in resp.location
    running = text(browser.get(resp.location))
    assert "data-poll=" in running and "<progress" in running
    work()
    done = text(browser.get(resp.location))
    assert "Done: mapped 2 of 3 stored unmapped events." in done
    assert 'plan.tier equals &#34;pro&#34;' in done
    assert text(browser.get("/dashboard/events?status=unmapped")).count("no rule matched") == 1


def test_invalid_rule_is_shown_with_its_errors(browser, admin):
    with SessionLocal.begin() as s:
        s.add(Feature(workspace_id=admin.workspace_id, id="f1", name="F1", type="consumable"))
    form = {"event": "X", "feature_id": "f1", "rows": "1", "cond-0-property": "amount",
            "cond-0-operator": "gt", "cond-0-value": "lots", "priority": "high"}
    resp = post(browser, "/dashboard/rules", form)
    assert resp.status_code == 400 and "priority" in text(resp)
    form["priority"] = "5"
    resp = post(browser, "/dashboard/rules", form)
    assert resp.status_code == 400 and "conditions.0.value" in text(resp)
    assert 'value="lots"' in text(resp)  # what was typed is kept


def test_feature_edit_and_delete(browser, admin):
    resp = post(browser, "/dashboard/features", {"id": "Bad Id", "type": "consumable"})
    assert resp.status_code == 400 and "slug" in text(resp)
    post(browser, "/dashboard/features", {"id": "seats", "name": "Seats", "type": "binary"})
    resp = post(browser, "/dashboard/features/seats", {"name": "Seats in use", "type": "consumable"})
    assert resp.status_code == 302
    assert "Seats in use" in text(browser.get("/dashboard/features"))
    assert post(browser, "/dashboard/features/seats/delete").status_code == 302
    assert "Seats in use" not in text(browser.get("/dashboard/features"))


def test_dead_letter_retry_requeues_the_call(browser, admin, redis, runtime):
    ws = admin.workspace_id
    with SessionLocal.begin() as s:
        row = DeadLetter(workspace_id=ws, message_id="m-dead", user_id="u-dead", error="billingId invalid",
                         payload={"type": "track", "userId": "u-dead", "messageId": "m-dead", "event": "E"})
        s.add(row)
        s.flush()
        dead_id = row.id
    page = text(browser.get("/dashboard/events/failed"))
    assert "billingId invalid" in page and "m-dead" in page
    resp = post(browser, f"/dashboard/events/failed/{dead_id}/retry")
    assert resp.status_code == 302
    with SessionLocal() as s:
        assert s.get(DeadLetter, dead_id) is None
    assert spool.depth(redis, runtime.settings.partitions) == 1


def test_dead_letter_retry_with_redis_down_keeps_the_row_and_says_so(browser, admin, monkeypatch):
    with SessionLocal.begin() as s:
        row = DeadLetter(workspace_id=admin.workspace_id, message_id="m-kept", user_id="u-kept", error="boom",
                         payload={"type": "track", "userId": "u-kept", "messageId": "m-kept", "event": "E"})
        s.add(row)
        s.flush()
        dead_id = row.id
    token_page = "/dashboard/events/failed"
    browser.get(token_page)

    def down(*args, **kwargs):
        raise RedisConnectionError("redis is gone")

    monkeypatch.setattr(spool, "push", down)
    resp = post(browser, f"/dashboard/events/failed/{dead_id}/retry", token_from=token_page)
    assert resp.status_code == 302 and resp.location.endswith("/dashboard/events/failed")
    assert "unreachable" in text(browser.get(resp.location))
    with SessionLocal() as s:
        assert s.get(DeadLetter, dead_id) is not None


def test_keys_are_shown_once_listed_by_prefix_and_revocable(browser, admin):
    resp = post(browser, "/dashboard/keys", {"scope": "ingest", "name": "Segment prod"})
    assert resp.status_code == 200
    plain = re.search(r'id="new-key">([^<]+)<', text(resp)).group(1)
    assert plain.startswith("kana_i_") and resp.headers["Cache-Control"] == "no-store"
    listing = text(browser.get("/dashboard/keys"))
    assert plain not in listing and plain[:12] in listing and "Segment prod" in listing
    assert browser.post("/v1/track", json={"userId": "k", "event": "E"},
                        headers={"Authorization": f"Bearer {plain}"}).status_code == 200
    with SessionLocal() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.prefix == plain[:12]))
    assert "Revoke" in text(browser.get(f"/dashboard/keys/{key_id}/revoke"))
    assert post(browser, f"/dashboard/keys/{key_id}/revoke").status_code == 302
    assert browser.post("/v1/track", json={"userId": "k", "event": "E"},
                        headers={"Authorization": f"Bearer {plain}"}).status_code == 401


def test_settings_keep_secrets_write_only(browser, admin):
    resp = post(browser, "/dashboard/settings", {"name": "Acme Inc", "billing_provider": "stripe",
                                                 "stripe_api_key": "sk_test_secret123"})
    assert resp.status_code == 302
    page = text(browser.get("/dashboard/settings"))
    assert "sk_test_secret123" not in page and "(set;" in page and "Acme Inc" in page
    with SessionLocal() as s:
        ws = s.get(Workspace, admin.workspace_id)
        assert (ws.billing_provider, ws.stripe_api_key) == ("stripe", "sk_test_secret123")
    post(browser, "/dashboard/settings", {"name": "Acme Inc", "billing_provider": "stripe"})
    with SessionLocal() as s:
        assert s.get(Workspace, admin.workspace_id).stripe_api_key == "sk_test_secret123"  # blank keeps it


def test_stripe_import_without_a_key_says_what_is_missing(browser, admin):
    resp = post(browser, "/dashboard/settings/import/stripe")
    assert resp.status_code == 302
    assert "No Stripe API key" in text(browser.get("/dashboard/settings"))


def test_stripe_import_button_runs_the_job_and_shows_its_result(browser, admin, work, fake_stripe):  # noqa: F811
    fake_stripe.add("cus_A", email="a@example.com", name="Ann")
    fake_stripe.add("cus_B", email="b@example.com", name="Bob")
    post(browser, "/dashboard/settings", {"name": "Acme", "billing_provider": "stripe",
                                          "stripe_api_key": fake_stripe.api_key})
    resp = post(browser, "/dashboard/settings/import/stripe")
    assert resp.status_code == 302 and "job=" in resp.location
    assert "<progress" in text(browser.get(resp.location))
    work()
    page = text(browser.get(resp.location))
    assert "Import finished: 2 created, 0 updated, 0 unchanged, 0 skipped." in page
    assert "Bob" in text(browser.get("/dashboard/users?flag="))


def test_csv_import_progress_and_report(browser, admin, work):
    data = b"user_id,name,email\nc1,Cee One,c1@acme.test\nc2,Cee Two,not-an-email\n"
    resp = post(browser, "/dashboard/csv/import", {"file": (io.BytesIO(data), "people.csv")},
                token_from="/dashboard/csv", content_type="multipart/form-data")
    assert resp.status_code == 302
    queued = text(browser.get(resp.location))
    assert "Waiting for a worker" in queued and "data-poll" in queued
    work()
    page = text(browser.get(resp.location))
    assert "Import finished" in page and 'data-percent>100%<' in page
    assert 'data-count="created">1<' in page and 'data-count="failed">1<' in page
    assert "not-an-email" in page and "<strong>email</strong>" in page
    import_id = int(resp.location.rsplit("/", 1)[1])
    state = browser.get(f"/dashboard/csv/imports/{import_id}.json").get_json()
    assert state["status"] == "finished" and state["progress"] == 1.0


def test_csv_import_refuses_bad_files_at_once(browser):
    resp = post(browser, "/dashboard/csv/import", {"file": (io.BytesIO(b"user_id,tier\n"), "bad.csv")},
                token_from="/dashboard/csv", content_type="multipart/form-data")
    assert resp.status_code == 302 and resp.location.endswith("/dashboard/csv")
    assert "Unknown column" in text(browser.get("/dashboard/csv"))


def test_csv_export_streams_the_flagged_users(browser, admin):
    make_user(admin.workspace_id, "=cmd|' /C calc'!A0", email="x@acme.test")
    with SessionLocal.begin() as s:
        flags.refresh(s, admin.workspace_id)
    resp = browser.get("/dashboard/csv/export?flag=missing_billing_id")
    assert resp.headers["Content-Type"].startswith("text/csv")
    body = text(resp)
    assert body.startswith("kana_id,user_id,name,email,billing_id,created_at")
    assert "'=cmd" in body  # formula injection defused by csvio



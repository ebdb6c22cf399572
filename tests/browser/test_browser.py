"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the app served
over HTTP with real RQ worker processes. Screenshots of the main pages go to
test-artifacts/screenshots/."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from kana.db import SessionLocal, read_only
from kana.domain import accounts, identity
from kana.models import Audit, Event, User
from tests.conftest import ROOT
from tests.helpers import make_user

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "screenshots"
PASSWORD = "correct horse battery staple"
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
                ".ci/run does it)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
expect = sync_api.expect


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module", autouse=True)
def _screenshot_dir() -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def page(chromium, live_server):
    context = chromium.new_context(base_url=live_server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    dialogs: list[str] = []
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    tab.dialogs = dialogs  # type: ignore[attr-defined]
    yield tab
    context.close()


@dataclass
class Operator:
    id: int
    headers: dict[str, str]
    email: str


@pytest.fixture
def operator(workspace) -> Operator:
    """A dashboard admin of a fresh workspace who is also an installation operator (may open /rq;
    one email per test: the database outlives tests)."""
    email = f"operator-{uuid.uuid4().hex[:8]}@acme.test"
    with SessionLocal.begin() as s:
        accounts.create_admin(s, workspace.id, email, PASSWORD, operator=True)
    return Operator(workspace.id, workspace.headers, email)


@pytest.fixture
def worker(spawn_worker):
    """One real ``python worker.py`` process for the test."""
    return spawn_worker()


def shot(page, name: str, *, full_page: bool = True) -> None:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 1000


def nav(page, name: str):
    """A link of the main navigation (page text may have links with the same words)."""
    return page.locator("header nav").get_by_role("link", name=name, exact=True)


def log_in(page, operator: Operator, name: str | None = None) -> None:
    page.goto("/dashboard/")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.get_by_label("Email", exact=True).fill(operator.email)
    page.get_by_label("Password").fill(PASSWORD)
    if name:
        shot(page, name)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Segment integration")).to_be_visible()


def send(live_server: str, ws, calls: list[dict]) -> None:
    resp = requests.post(f"{live_server}/v1/batch", json={"batch": calls}, headers=ws.headers, timeout=10)
    assert resp.status_code == 200, resp.text


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def count_events(ws_id: int, status: str | None = None) -> int:
    with read_only(SessionLocal()) as s:
        stmt = select(func.count()).select_from(Event).where(Event.workspace_id == ws_id)
        if status:
            stmt = stmt.where(Event.status == status)
        return s.scalar(stmt)


def seed_identity_problems(ws_id: int) -> dict[str, int]:
    """Two users sharing an email (one a Stripe import), one more pair, and users without billing ids."""
    return {
        "stripe": make_user(ws_id, None, T0, email="dana@acme.test", name="Dana (Stripe)", billing_id="cus_DANA",
                            source="stripe"),
        "app": make_user(ws_id, "dana-42", T0 + timedelta(days=3), email="Dana@acme.test", name="Dana"),
        "eve1": make_user(ws_id, "eve-1", T0 + timedelta(days=1), email="eve@acme.test", billing_id="cus_EVE1"),
        "eve2": make_user(ws_id, "eve-2", T0 + timedelta(days=2), email="eve@acme.test", billing_id="cus_EVE2"),
        "solo": make_user(ws_id, "solo", T0 + timedelta(days=4), email="solo@acme.test"),
    }


# --- the flows ------------------------------------------------------------------------------


def test_login_boxes_refresh_and_merge_duplicates(page, operator, worker, live_server):
    ids = seed_identity_problems(operator.id)
    log_in(page, operator, "login")
    # Never refreshed yet: the boxes say so; "Refresh now" runs the flags job on the worker.
    expect(page.locator("#refreshed-at")).to_have_text("never")
    page.get_by_role("button", name="Refresh now").click()
    expect(page.locator("#refreshed-at")).not_to_have_text("never", timeout=30_000)
    missing = page.locator("#flag-missing_billing_id")
    dup = page.locator("#flag-duplicate_email")
    expect(missing.locator("[data-count]")).to_have_text("2")  # dana-42 and solo
    expect(dup.locator("[data-count]")).to_have_text("4")  # dana ×2, eve ×2
    expect(dup).to_contain_text("2 email groups")
    shot(page, "overview")

    dup.get_by_role("link", name="View users").click()
    group = page.locator('section.group[data-email="dana@acme.test"]')
    expect(group.locator("tbody tr")).to_have_count(2)
    expect(page.locator('section.group[data-email="eve@acme.test"]')).to_be_visible()
    shot(page, "users-duplicate-email")

    group.get_by_label(f"Select user {ids['stripe']}").check()
    group.get_by_label(f"Select user {ids['app']}").check()
    group.get_by_role("button", name="Merge selected…").click()
    # Before confirming: the survivor is the oldest (the Stripe import) and what it keeps.
    expect(page.locator("#survivor")).to_have_text(f"#{ids['stripe']}")
    expect(page.locator('[data-result="billing_id"]')).to_have_text("cus_DANA")
    expect(page.locator('[data-result="user_id"]')).to_contain_text(f"dana-42 (from #{ids['app']})")
    shot(page, "merge-preview")
    page.get_by_role("button", name=f"Merge into #{ids['stripe']}").click()

    expect(page).to_have_url(re.compile(rf"/dashboard/users/{ids['stripe']}$"))
    expect(page.locator(".flash")).to_contain_text(f"Merged #{ids['app']} into #{ids['stripe']}")
    expect(page.locator('[data-field="user_id"]')).to_have_text("dana-42")
    expect(page.locator('[data-field="billing_id"]')).to_contain_text("cus_DANA")
    expect(page.locator("#audit")).to_contain_text(f"dashboard:{operator.email}")
    shot(page, "user-after-merge")
    with SessionLocal() as s:
        assert s.get(User, ids["app"]) is None
        assert s.scalar(select(Audit).where(Audit.workspace_id == operator.id)).trigger == "dashboard"

    nav(page, "Audit").click()
    expect(page.locator("#audit-log tbody tr").first).to_contain_text(f"#{ids['stripe']}, #{ids['app']}")
    shot(page, "audit")

    # Delete, with a confirmation page first.
    page.goto(f"/dashboard/users/{ids['solo']}")
    page.get_by_role("link", name="Delete…").click()
    expect(page.get_by_role("heading", name="Delete 1 user?")).to_be_visible()
    page.get_by_role("button", name="Delete permanently").click()
    expect(page.locator(".flash")).to_contain_text("Deleted 1 user")
    with SessionLocal() as s:
        assert s.get(User, ids["solo"]) is None


def test_csv_import_shows_live_progress_and_the_report(page, operator, worker, tmp_path):
    # Big enough (20 chunks of 1,000 rows) that the bar is seen moving, not just 0% then 100%.
    rows = [f"imp-{i},Imported {i},imp{i}@example.com" for i in range(20000)]
    rows.append("bad-row,Bad Email,not-an-email")
    file = tmp_path / "people.csv"
    file.write_text("user_id,name,email\n" + "\n".join(rows) + "\n")
    log_in(page, operator)
    nav(page, "CSV").click()
    page.get_by_label("CSV file").set_input_files(str(file))
    page.get_by_role("button", name="Import CSV").click()
    expect(page).to_have_url(re.compile(r"/dashboard/csv/imports/\d+$"))
    # Record the percentages the page shows while the worker imports.
    seen = page.evaluate("""() => new Promise(resolve => {
        const seen = [];
        const read = () => { const el = document.querySelector('[data-percent]'); if (el) seen.push(el.textContent); };
        read();
        const timer = setInterval(() => {
            read();
            if (seen[seen.length - 1] === '100%') { clearInterval(timer); resolve(seen); }
        }, 50);
        setTimeout(() => { clearInterval(timer); resolve(seen); }, 60000);
    })""")
    percents = [int(p.rstrip("%")) for p in seen]
    assert percents[-1] == 100, seen
    assert any(0 < p < 100 for p in percents), f"no progress seen between 0 and 100%: {seen}"
    assert percents == sorted(percents), seen  # it only ever moves forward
    expect(page.locator("#import-report")).to_be_visible(timeout=30_000)  # the page reloads with the report
    expect(page.locator("#import-progress progress")).to_have_attribute("value", "100")
    expect(page.locator('[data-count="created"]')).to_have_text("20,000")
    expect(page.locator('[data-count="failed"]')).to_have_text("1")
    expect(page.locator("#import-report")).to_contain_text("not-an-email")
    shot(page, "csv-import", full_page=False)


def test_new_rule_maps_previously_unmapped_events(page, operator, worker, live_server):
    calls = [{"type": "track", "userId": f"u{i % 5}", "event": "Report Exported",
              "properties": {"plan": {"tier": "pro" if i % 3 else "free"}, "pages": i}} for i in range(30)]
    calls.append({"type": "page", "userId": "u1", "name": "Pricing"})
    send(live_server, operator, calls)
    wait_for(lambda: count_events(operator.id) == 31)
    log_in(page, operator)
    nav(page, "Events").click()
    expect(page.locator("#events tbody tr")).to_have_count(31)
    expect(page.locator("#events").get_by_text("no rule matched").first).to_be_visible()
    shot(page, "events-unmapped")

    nav(page, "Features").click()
    page.get_by_label("Id").fill("reports")
    page.get_by_label("Name").fill("Exported reports")
    page.get_by_role("button", name="Create feature").click()
    expect(page.locator("#features")).to_contain_text("Exported reports")
    shot(page, "features")

    nav(page, "Rules").click()
    page.get_by_role("link", name="New rule").click()
    page.get_by_label("Call type").select_option("track")
    page.get_by_label("Event name").fill("Report Exported")
    page.get_by_label("Feature").select_option("reports")
    page.get_by_label("Condition 1 property").fill("plan.tier")
    page.get_by_label("Condition 1 operator").select_option("equals")
    page.get_by_label("Condition 1 value").fill("pro")
    page.get_by_label("Amount property").fill("pages")
    shot(page, "rule-form")
    page.get_by_role("button", name="Create rule").click()

    panel = page.locator("section.job")
    expect(panel).to_contain_text("Done: mapped 20 of 31 stored unmapped events.", timeout=30_000)
    expect(page.locator("#rules")).to_contain_text('plan.tier equals "pro"')
    expect(page.locator("#unmapped-count")).to_have_text("11 unmapped now")  # the page reloaded when done
    shot(page, "rules-reprocessed")
    assert count_events(operator.id, "mapped") == 20
    nav(page, "Events").click()
    expect(page.locator("#events tbody tr")).to_have_count(11)


def test_scripts_in_user_data_never_run_and_forged_posts_fail(page, operator, worker, live_server):
    evil = "<script>window.__xss = 1; alert('xss')</script>"
    victim = make_user(operator.id, "<img src=x onerror=\"window.__xss=2\">", T0, name=evil,
                       email="victim@acme.test")
    send(live_server, operator, [{"type": "track", "userId": "<img src=x onerror=\"window.__xss=2\">",
                                  "event": "<svg onload=\"window.__xss=3\">",
                                  "properties": {"note": "<iframe src=javascript:alert(4)>"}}])
    wait_for(lambda: count_events(operator.id) == 1)
    log_in(page, operator)
    for path in ("/dashboard/users", f"/dashboard/users/{victim}", "/dashboard/users?q=script",
                 "/dashboard/events?status=unmapped", "/dashboard/audit"):
        page.goto(path)
        page.wait_for_load_state("load")
        assert page.evaluate("window.__xss") is None, path
    page.goto(f"/dashboard/users/{victim}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(evil)  # shown as text
    shot(page, "user-with-script-name")
    assert page.dialogs == []  # type: ignore[attr-defined]

    # A page on another site posts a form at the dashboard with the operator's cookies in the browser.
    page.context.route("http://evil.test/**", lambda route: route.fulfill(content_type="text/html", body=f"""
        <form id=f method=post action="{live_server}/dashboard/users/delete">
          <input name=kana_id value="{victim}"></form>
        <script>document.getElementById('f').submit()</script>"""))
    page.goto("http://evil.test/attack")
    page.wait_for_url(re.compile(re.escape(live_server)))
    page.wait_for_load_state("load")
    # SameSite=Lax keeps the session cookie off a cross-site POST: the dashboard asks for a login...
    assert "/dashboard/login" in page.url or "CSRF" in page.content()
    # ...and a same-site request without the form's CSRF token is refused too.
    page.goto("/dashboard/")
    status = page.evaluate(f"""() => fetch('/dashboard/users/delete', {{method: 'POST',
        headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'kana_id={victim}'}})
        .then(r => r.status)""")
    assert status == 400
    with SessionLocal() as s:
        assert s.get(User, victim) is not None


def test_tour_of_the_main_pages(page, operator, worker, live_server):
    """Every main page renders for a logged-in operator; one screenshot each."""
    seed_identity_problems(operator.id)
    now = datetime.now(UTC).replace(microsecond=0)
    calls = [{"type": "identify", "userId": "dana-42", "traits": {"email": "dana@acme.test"}}]
    calls += [{"type": "track", "userId": "dana-42", "event": "Seat Added", "properties": {"featureId": "seats"},
               "timestamp": (now - timedelta(minutes=m)).isoformat()} for m in (400, 390, 380, 120, 100, 5, 1)]
    calls.append({"type": "track", "userId": "dana-42", "event": "Invite Sent", "timestamp": now.isoformat()})
    send(live_server, operator, calls)
    requests.post(f"{live_server}/api/v1/features", json={"id": "seats", "name": "Seats", "type": "consumable"},
                  headers=operator.headers, timeout=10).raise_for_status()
    wait_for(lambda: count_events(operator.id, "mapped") == 7)
    with SessionLocal() as s:
        dana = identity.find_user(s, operator.id, "dana-42").kana_id
    log_in(page, operator)
    shot(page, "overview-with-events")
    pages = {
        "users": "/dashboard/users", "user": f"/dashboard/users/{dana}", "csv": "/dashboard/csv",
        "rules": "/dashboard/rules", "dead-letters": "/dashboard/events/failed", "keys": "/dashboard/keys",
        "settings": "/dashboard/settings", "jobs": "/dashboard/jobs", "rq": "/rq/",
    }
    for name, path in pages.items():
        resp = page.goto(path)
        assert resp is not None and resp.status == 200, path
        shot(page, name)
    page.goto(f"/dashboard/users/{dana}")
    expect(page.locator('[data-usage="seats"]')).to_have_text("7")
    expect(page.locator(".session")).to_have_count(3)
    page.goto("/dashboard/keys")
    page.get_by_label("Name").fill("Segment production")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key").inner_text()
    assert key.startswith("kana_i_")
    shot(page, "key-created")
    page.goto("/dashboard/keys")
    assert key not in page.content()


"""No 5xx for any path or query: ids checked once by the URL converters; HTTP errors keep their headers."""

from __future__ import annotations

import pytest

from tests.conftest import worker_env
from tests.integration.test_dashboard import admin, browser, csrf_token, log_in, post  # noqa: F401 - fixtures

# What the black-box probes sent: not a job id (rq raises ValueError), or past BIGINT.
BAD_JOB_IDS = ["%C2%B3", "'%20OR%201=1--", "%25", "*", "a:b", "x" * 200]
OUT_OF_RANGE = ["9223372036854775808", "99999999999999999999999", "0", "-1", "1.5", "%C2%B3"]

DASHBOARD_GETS = ["/dashboard/users/{}", "/dashboard/rules/{}", "/dashboard/csv/imports/{}",
                  "/dashboard/csv/imports/{}.json", "/dashboard/csv/imports/{}/report.csv",
                  "/dashboard/keys/{}/revoke"]
DASHBOARD_POSTS = ["/dashboard/rules/{}", "/dashboard/rules/{}/delete", "/dashboard/events/failed/{}/retry",
                   "/dashboard/keys/{}/revoke"]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_api_job_ids_of_another_shape_are_not_found(client, workspace, job_id):
    resp = client.get(f"/api/v1/jobs/{job_id}", headers=workspace.headers)
    assert resp.status_code == 404, resp.get_data(as_text=True)
    assert resp.get_json()["code"] == "not_found"


@pytest.mark.parametrize("raw", OUT_OF_RANGE)
def test_api_ids_out_of_range_are_not_found(client, workspace, raw):
    for method, path in [("get", "/api/v1/imports/csv/{}"), ("get", "/api/v1/users/{}"),
                         ("delete", "/api/v1/users/{}"), ("patch", "/api/v1/rules/{}"),
                         ("delete", "/api/v1/keys/{}"), ("post", "/api/v1/events/failed/{}/retry"),
                         ("get", "/api/v1/users/{}/usage")]:
        resp = getattr(client, method)(path.format(raw), headers=workspace.headers, json={})
        assert resp.status_code == 404, (method, path, raw, resp.status_code)


@pytest.mark.parametrize("raw", OUT_OF_RANGE)
def test_dashboard_ids_out_of_range_are_not_found(browser, raw):  # noqa: F811 - fixture
    for path in DASHBOARD_GETS:
        assert browser.get(path.format(raw)).status_code == 404, path
    for path in DASHBOARD_POSTS:
        assert post(browser, path.format(raw)).status_code == 404, path


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_dashboard_job_ids_of_another_shape_are_not_found(browser, job_id):  # noqa: F811 - fixture
    assert browser.get(f"/dashboard/jobs/{job_id}.json").status_code == 404


def test_dashboard_list_positions_out_of_range_are_refused(browser):  # noqa: F811 - fixture
    assert browser.get("/dashboard/users?after=9223372036854775808").status_code == 400
    assert browser.get("/dashboard/events?before=-1").status_code == 400
    assert browser.get("/dashboard/users/merge?kana_id=1&kana_id=9223372036854775808").status_code == 400


def test_dashboard_refuses_nul_characters_naming_the_field(browser):  # noqa: F811 - fixture
    resp = browser.get("/dashboard/users", query_string={"q": "a\x00b"})
    assert resp.status_code == 400 and "&#39;q&#39;" in resp.get_data(as_text=True)


def test_method_not_allowed_keeps_its_allow_header(client, workspace, browser):  # noqa: F811 - fixture
    resp = client.put("/api/v1/features", headers=workspace.headers)
    assert resp.status_code == 405 and resp.get_json()["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}
    resp = browser.delete("/dashboard/keys")
    assert resp.status_code == 405 and "GET" in resp.headers["Allow"]


def test_export_with_an_empty_flag_is_refused(client, workspace):
    resp = client.get("/api/v1/exports/users.csv?flag=", headers=workspace.headers)
    assert resp.status_code == 400 and "flag" in resp.get_json()["errors"]
    assert client.get("/api/v1/exports/users.csv", headers=workspace.headers).status_code == 200


def test_csv_import_list_limit_is_checked(client, workspace):
    resp = client.get("/api/v1/imports/csv?limit=101", headers=workspace.headers)
    assert resp.status_code == 400 and "limit" in resp.get_json()["errors"]


def test_a_partial_rule_update_still_needs_whole_conditions(client, workspace):
    h = workspace.headers
    assert client.post("/api/v1/features", json={"id": "f"}, headers=h).status_code == 201
    rule = client.post("/api/v1/rules", json={"event": "e", "feature_id": "f"}, headers=h).get_json()
    resp = client.patch(f"/api/v1/rules/{rule['id']}", json={"conditions": [{"property": "p", "value": None}]},
                        headers=h)
    assert resp.status_code == 400
    assert "conditions.0.operator" in resp.get_json()["errors"]


# --- revocable dashboard sessions -------------------------------------------------------------


def copy_of_cookie(client):
    return client.get_cookie("kana_session").value


def test_a_cookie_copied_before_logout_no_longer_opens_pages(app, browser):  # noqa: F811 - fixture
    copied = copy_of_cookie(browser)
    assert browser.get("/dashboard/users").status_code == 200
    assert post(browser, "/dashboard/logout").status_code == 302
    thief = app.test_client()
    thief.set_cookie("kana_session", copied)
    resp = thief.get("/dashboard/users")
    assert resp.status_code == 302 and "/dashboard/login" in resp.location


def test_log_out_everywhere_ends_every_session_of_the_admin(app, client, admin):  # noqa: F811 - fixture
    other = app.test_client()
    assert log_in(client, admin.email).status_code == 302
    assert log_in(other, admin.email).status_code == 302
    assert other.get("/dashboard/users").status_code == 200
    page = client.get("/dashboard/").get_data(as_text=True)
    assert "Log out everywhere" in page
    assert post(client, "/dashboard/logout/everywhere").status_code == 302
    assert client.get("/dashboard/users").status_code == 302
    assert other.get("/dashboard/users").status_code == 302
    assert log_in(other, admin.email).status_code == 302  # a new login works


def test_the_cli_password_change_ends_sessions(settings, browser, admin):  # noqa: F811 - fixture
    from click.testing import CliRunner

    from kana.cli import main as cli

    result = CliRunner().invoke(cli, ["admin", "password", "--workspace", str(admin.workspace_id),
                                      "--email", admin.email, "--password", "another long password"],
                                env=worker_env(settings))
    assert result.exit_code == 0, result.output
    assert browser.get("/dashboard/users").status_code == 302


def test_the_cli_logs_an_admin_out_everywhere(settings, browser, admin):  # noqa: F811 - fixture
    from click.testing import CliRunner

    from kana.cli import main as cli

    result = CliRunner().invoke(cli, ["admin", "logout", "--workspace", str(admin.workspace_id),
                                      "--email", admin.email], env=worker_env(settings))
    assert result.exit_code == 0 and "1 session(s)" in result.output, result.output
    assert browser.get("/dashboard/users").status_code == 302


# --- /rq for installation operators; workspace jobs in the dashboard ------------------------------


def test_rq_is_for_operators_made_by_the_cli(settings, client, workspace):
    from click.testing import CliRunner

    from kana.cli import main as cli
    from tests.integration.test_dashboard import PASSWORD

    env = worker_env(settings)
    for email, extra in (("ws-admin@acme.test", []), ("op@acme.test", ["--operator"])):
        result = CliRunner().invoke(cli, ["admin", "create", "--workspace", str(workspace.id), "--email", email,
                                          "--password", PASSWORD, *extra], env=env)
        assert result.exit_code == 0, result.output
    assert "installation operator" in result.output
    assert log_in(client, "ws-admin@acme.test").status_code == 302
    assert client.get("/rq/").status_code == 403
    assert client.get("/rq/0/data/queues.json").status_code == 403
    assert 'href="/rq/' not in client.get("/dashboard/").get_data(as_text=True)
    assert log_in(client, "op@acme.test").status_code == 302
    assert client.get("/rq/").status_code == 200
    assert 'href="/rq/' in client.get("/dashboard/").get_data(as_text=True)


def test_jobs_page_lists_only_the_workspace_jobs(browser, admin, new_workspace, work):  # noqa: F811 - fixture
    other = new_workspace("other")
    mine = browser.post("/api/v1/flags/refresh", headers=admin.headers).get_json()["job_id"]
    theirs = browser.post("/api/v1/flags/refresh",
                          headers={"Authorization": f"Bearer {other.key}"}).get_json()["job_id"]
    queued = browser.get("/dashboard/jobs").get_data(as_text=True)
    assert mine in queued and theirs not in queued
    work()
    page = browser.get("/dashboard/jobs")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert mine in text and theirs not in text and "finished" in text


# --- login throttling that cannot lock an admin out -----------------------------------------------


def test_failed_logins_from_one_address_do_not_lock_the_admin_out(app, client, runtime, admin):  # noqa: F811
    attacker = app.test_client()
    attacker.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    for _ in range(runtime.settings.login_attempts):
        assert log_in(attacker, admin.email, "not the password").status_code == 401
    assert log_in(attacker, admin.email).status_code == 429  # that address, that email: limited
    client.environ_base["REMOTE_ADDR"] = "198.51.100.2"
    resp = log_in(client, admin.email)
    assert resp.status_code == 302, resp.get_data(as_text=True)
    assert client.get("/dashboard/users").status_code == 200


def test_failures_on_one_email_from_many_addresses_slow_it_down_capped(runtime):
    from kana.domain import accounts

    limit, window = 3, 60
    verdicts = [accounts.count_attempt(runtime.redis, f"192.0.2.{i}", "target@acme.test", limit=limit,
                                       window=window) for i in range(limit + 6)]
    assert all(v.allowed for v in verdicts)  # never a refusal: each address is under its own limit
    delays = [v.delay for v in verdicts]
    assert delays[:limit] == [0.0] * limit
    assert delays[limit:] == sorted(delays[limit:]) and delays[limit] > 0
    assert delays[-1] == accounts.DELAY_CAP


# --- early rejections keep keep-alive connections usable (gunicorn, as the Procfile runs it) -------


@pytest.fixture
def gunicorn_server(settings, redis, tmp_path):
    """``gunicorn app:app`` with the Procfile's worker class (threads) on a free port."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.conftest import ROOT, worker_env

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**worker_env(settings), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = subprocess.Popen([gunicorn, "app:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                             "--threads", "4"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.stderr.read().decode()[-3000:]) from None
            time.sleep(0.2)
    yield port
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_connection_serves_requests_after_a_413(gunicorn_server, settings, workspace):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", gunicorn_server, timeout=30)
    headers = {"Authorization": f"Bearer {workspace.ingest_key}", "Content-Type": "application/json"}
    # A batch over the body limit (600 KB by default), refused from its Content-Length before reading.
    big = json.dumps({"batch": [{"type": "track", "userId": "u", "event": "x" * 1000}] *
                      (settings.max_batch_bytes // 1000 + 100)}).encode()
    conn.request("POST", "/v1/batch", body=big, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 413
    resp.read()
    assert resp.getheader("Connection", "").lower() != "close"
    sock = conn.sock
    ok = 0
    for i in range(10):
        call = {"type": "track", "userId": f"u{i}", "event": "Seat Added", "messageId": f"keepalive-{i}"}
        conn.request("POST", "/v1/track", body=json.dumps(call).encode(), headers=headers)
        resp = conn.getresponse()
        resp.read()
        ok += resp.status == 200
        assert conn.sock is sock  # the same connection, not a reconnect
    assert ok == 10


def test_an_unread_body_past_the_drain_bound_closes_the_connection(client, workspace):
    from kana import keepalive

    resp = client.post("/api/v1/imports/csv", data=b"x" * 1024,
                       headers={**workspace.headers, "Content-Type": "text/csv",
                                }, environ_overrides={"CONTENT_LENGTH": str(keepalive.DRAIN_MAX + 1)})
    assert resp.headers["Connection"] == "close"


# --- every dashboard route, odd query and form values: never a 5xx -------------------------------

ODD_VALUES = ["x", "-1", "9223372036854775808", "\x00", "a" * 400]
# The query and form fields the dashboard's views read.
ARG_NAMES = ["after", "before", "q", "flag", "kana_id", "match", "next", "feature", "job", "window", "groups_cursor",
             "status", "type", "view", "scope", "name", "force", "billing_provider", "id", "feature_id", "event",
             "priority", "rows", "delta_property", "enabled"]


def test_no_dashboard_route_answers_a_server_error(app, browser):  # noqa: F811 - fixture
    import re

    app.config["PROPAGATE_EXCEPTIONS"] = False  # a bug answers 500 here instead of raising
    token = csrf_token(browser, "/dashboard/keys")  # the session's, valid for all its forms
    try:
        failures = []
        for rule in app.url_map.iter_rules():
            if not rule.rule.startswith(("/dashboard", "/rq")) or rule.endpoint.endswith("static") \
                    or "logout" in rule.endpoint:  # the probe stays logged in
                continue
            url = re.sub(r"<[^>]+>", "x", re.sub(r"<job:[^>]+>", "abc", re.sub(r"<id:[^>]+>", "1", rule.rule)))
            for name in ARG_NAMES:
                for value in ODD_VALUES:
                    if "GET" in rule.methods:
                        status = browser.get(url, query_string={name: value}).status_code
                    else:
                        status = browser.post(url, data={name: value, "csrf_token": token},
                                              query_string={name: value}).status_code
                    if status >= 500:
                        failures.append((url, name, value[:20], status))
        assert not failures, sorted({(u, n, s) for u, n, _, s in failures})
        assert browser.get("/dashboard/").status_code == 200  # still logged in: every probe reached its view
    finally:
        app.config["PROPAGATE_EXCEPTIONS"] = None

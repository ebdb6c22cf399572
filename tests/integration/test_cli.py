"""``kana feature …``: the same domain rules as /api/v1/features, in a terminal (SPEC §7)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import jobs
from kana.cli import main as cli
from kana.db import SessionLocal
from kana.models import Event, Feature, Rule
from tests.helpers import post_batch, track, usage_total


@pytest.fixture
def kana(settings, redis):
    """Run ``kana ARGS…`` in-process against the test database and Redis; returns the click Result."""
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url or "",
           "KANA_DATA_DIR": str(settings.data_dir)}

    def run(*args: object, **extra_env: str):
        result = CliRunner().invoke(cli, [str(a) for a in args], env={**env, **extra_env})
        jobs.init(settings)  # the command set up the jobs runtime from its environment; the app's again
        return result

    return run


def statuses(ws_id: int) -> dict[str, int]:
    with SessionLocal() as s:
        return dict(s.execute(select(Event.status, func.count()).where(Event.workspace_id == ws_id)
                              .group_by(Event.status)).all())


def stored_feature(ws_id: int, feature_id: str) -> Feature | None:
    with SessionLocal() as s:
        return s.get(Feature, (ws_id, feature_id))


def test_feature_list_text_and_json(kana, workspace):
    assert kana("feature", "list", "--workspace", workspace.id).output == ""
    assert kana("feature", "create", "--workspace", workspace.id, "sso", "--name", "SSO",
                "--type", "binary").exit_code == 0
    assert kana("feature", "create", "--workspace", workspace.id, "api-calls", "--name", "API calls").exit_code == 0

    text = kana("feature", "list", "--workspace", workspace.id)
    assert text.exit_code == 0, text.output
    assert text.output.splitlines() == ["api-calls\tconsumable\tAPI calls", "sso\tbinary\tSSO"]

    as_json = kana("feature", "list", "--workspace", workspace.id, "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert [(f["id"], f["name"], f["type"]) for f in rows] == [("api-calls", "API calls", "consumable"),
                                                              ("sso", "SSO", "binary")]
    assert all(f["created_at"] for f in rows)

    missing = kana("feature", "list", "--workspace", 999_999_999)
    assert missing.exit_code == 1 and "no workspace 999999999" in missing.output


def test_feature_create_reports_field_errors_and_duplicates(kana, workspace):
    created = kana("feature", "create", "--workspace", workspace.id, "sso", "--json")
    assert created.exit_code == 0, created.output
    body = json.loads(created.output)
    assert (body["id"], body["name"], body["type"]) == ("sso", "sso", "consumable") and body["job_id"]

    dup = kana("feature", "create", "--workspace", workspace.id, "sso")
    assert dup.exit_code == 1 and "feature 'sso' already exists" in dup.output
    bad_id = kana("feature", "create", "--workspace", workspace.id, "Has Space")
    assert bad_id.exit_code == 1 and "invalid feature id: must be a slug" in bad_id.output
    bad_type = kana("feature", "create", "--workspace", workspace.id, "seats", "--type", "metered")
    assert bad_type.exit_code == 1 and "invalid feature type: must be one of consumable, binary" in bad_type.output
    assert stored_feature(workspace.id, "seats") is None
    long_name = kana("feature", "create", "--workspace", workspace.id, "seats", "--name", "x" * 201)
    assert long_name.exit_code == 1 and "name: must be at most 200 characters" in long_name.output
    assert stored_feature(workspace.id, "seats") is None
    no_ws = kana("feature", "create", "--workspace", 999_999_999, "seats")
    assert no_ws.exit_code == 1 and "no workspace 999999999" in no_ws.output


def test_feature_create_with_redis_down_is_saved_and_says_reprocessing_was_not_queued(kana, workspace):
    result = kana("feature", "create", "--workspace", workspace.id, "sso", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.exit_code == 0, result.output
    assert "feature sso created" in result.output
    assert "reprocessing was not queued" in result.output
    assert f"kana reprocess --workspace {workspace.id}" in result.output
    assert stored_feature(workspace.id, "sso") is not None


def test_rule_create_with_redis_down_is_saved_and_says_reprocessing_was_not_queued(kana, workspace):
    assert kana("feature", "create", "--workspace", workspace.id, "exports").exit_code == 0
    result = kana("rule", "create", "--workspace", workspace.id, "--feature", "exports", "--event", "Report Exported",
                  REDIS_URL="redis://127.0.0.1:1/0")
    assert result.exit_code == 0, result.output
    assert "created" in result.output and "reprocessing was not queued" in result.output
    with SessionLocal() as s:
        assert s.scalar(select(func.count()).select_from(Rule).where(Rule.workspace_id == workspace.id)) == 1


def test_queueing_with_redis_down_exits_75_and_says_why(kana, workspace):
    result = kana("reprocess", "--workspace", workspace.id, "--async", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.exit_code == 75, result.output
    assert "Redis" in result.output and "unreachable" in result.output


def test_feature_update_name_and_type(kana, workspace):
    assert kana("feature", "create", "--workspace", workspace.id, "sso", "--name", "SSO",
                "--type", "binary").exit_code == 0

    renamed = kana("feature", "update", "--workspace", workspace.id, "sso", "--name", "Single sign-on")
    assert renamed.exit_code == 0, renamed.output
    assert "feature sso updated" in renamed.output
    feature = stored_feature(workspace.id, "sso")
    assert (feature.name, feature.type) == ("Single sign-on", "binary")

    retyped = kana("feature", "update", "--workspace", workspace.id, "sso", "--type", "consumable", "--json")
    assert retyped.exit_code == 0, retyped.output
    body = json.loads(retyped.output)
    assert (body["id"], body["name"], body["type"]) == ("sso", "Single sign-on", "consumable")

    bad_type = kana("feature", "update", "--workspace", workspace.id, "sso", "--type", "metered")
    assert bad_type.exit_code == 1
    assert "invalid feature type: must be one of consumable, binary" in bad_type.output
    blank = kana("feature", "update", "--workspace", workspace.id, "sso", "--name", "  ")
    assert blank.exit_code == 1 and "invalid feature name" in blank.output
    feature = stored_feature(workspace.id, "sso")
    assert (feature.name, feature.type) == ("Single sign-on", "consumable")

    unknown = kana("feature", "update", "--workspace", workspace.id, "nope", "--name", "x")
    assert unknown.exit_code == 1
    assert f"no feature 'nope' in workspace {workspace.id}" in unknown.output


def test_feature_delete_needs_force_when_it_has_usage(kana, client, workspace, work):
    ws = workspace.id
    assert kana("feature", "create", "--workspace", ws, "credits").exit_code == 0
    post_batch(client, workspace, [track("u1", props={"featureId": "credits", "delta": 4})])
    work()
    assert usage_total(ws, "credits") == 4

    refused = kana("feature", "delete", "--workspace", ws, "credits")
    assert refused.exit_code == 1
    assert "feature 'credits' has 1 usage records" in refused.output and "--force" in refused.output
    assert stored_feature(ws, "credits") is not None and usage_total(ws, "credits") == 4

    forced = kana("feature", "delete", "--workspace", ws, "credits", "--force")
    assert forced.exit_code == 0, forced.output
    assert "feature credits deleted" in forced.output
    assert stored_feature(ws, "credits") is None
    assert usage_total(ws, "credits") == 0 and statuses(ws) == {"unmapped": 1}

    # Re-creating it reprocesses the stored events that name it (a queued job, as in the API).
    again = kana("feature", "create", "--workspace", ws, "credits")
    assert again.exit_code == 0 and "reprocessing job" in again.output, again.output
    work()
    assert usage_total(ws, "credits") == 4 and statuses(ws) == {"mapped": 1}

    unknown = kana("feature", "delete", "--workspace", ws, "nope")
    assert unknown.exit_code == 1 and f"no feature 'nope' in workspace {ws}" in unknown.output


def test_feature_without_usage_is_deleted_without_force(kana, workspace):
    assert kana("feature", "create", "--workspace", workspace.id, "sso").exit_code == 0
    deleted = kana("feature", "delete", "--workspace", workspace.id, "sso")
    assert deleted.exit_code == 0, deleted.output
    assert stored_feature(workspace.id, "sso") is None
    again = kana("feature", "delete", "--workspace", workspace.id, "sso")
    assert again.exit_code == 1 and "no feature 'sso'" in again.output


def test_another_workspaces_features_are_invisible(kana, workspace, new_workspace):
    other = new_workspace("other")
    assert kana("feature", "create", "--workspace", other.id, "secret", "--name", "Theirs").exit_code == 0

    assert "secret" not in kana("feature", "list", "--workspace", workspace.id).output
    assert json.loads(kana("feature", "list", "--workspace", workspace.id, "--json").output) == []
    updated = kana("feature", "update", "--workspace", workspace.id, "secret", "--name", "Mine")
    assert updated.exit_code == 1 and f"no feature 'secret' in workspace {workspace.id}" in updated.output
    deleted = kana("feature", "delete", "--workspace", workspace.id, "secret", "--force")
    assert deleted.exit_code == 1 and f"no feature 'secret' in workspace {workspace.id}" in deleted.output
    # The same id is free in this workspace, and the other's feature is untouched.
    assert kana("feature", "create", "--workspace", workspace.id, "secret").exit_code == 0
    assert stored_feature(other.id, "secret").name == "Theirs"
    assert stored_feature(workspace.id, "secret").name == "secret"

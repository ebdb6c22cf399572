"""One rule for user ids on every surface: identify, POST /api/v1/users and a CSV row reject the same placeholders."""

from __future__ import annotations

import pytest

from kana.domain.ids import MAX_ID, PLACEHOLDER_IDS, in_id_range, user_id_problem
from kana.imports import csvfile

SPELLINGS = sorted(PLACEHOLDER_IDS) + ["None", "NULL", " undefined ", "[object Object]", "NaN"]


@pytest.mark.parametrize("value", SPELLINGS)
def test_placeholders_are_not_user_ids(value):
    assert user_id_problem(value) == "placeholder"


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_blank_is_not_a_user_id(value):
    assert user_id_problem(value) == "empty"


@pytest.mark.parametrize("value", ["u-1", "none-such", "0", "Nonesuch"])
def test_real_ids_pass(value):
    assert user_id_problem(value) is None


def test_id_range():
    assert in_id_range(1) and in_id_range(MAX_ID)
    assert not in_id_range(0) and not in_id_range(-1) and not in_id_range(MAX_ID + 1)


@pytest.mark.parametrize("value", SPELLINGS)
def test_every_surface_rejects_the_same_placeholders(client, workspace, session, value):
    headers = workspace.headers
    res = client.post("/v1/identify", json={"userId": value, "traits": {}}, headers=headers)
    assert res.status_code == 400 and "userId" in res.get_json()["errors"], res.get_json()

    res = client.post("/api/v1/users", json={"user_id": value}, headers=headers)
    assert res.status_code == 400 and "user_id" in res.get_json()["errors"], res.get_json()

    parsed = csvfile.parse(f"user_id,email\n{value},ann@example.com\n".encode())
    [row] = csvfile.apply_rows(session, workspace.id, None, parsed.rows(), actor="test").results
    assert row.status == "failed" and "placeholder" in row.errors["user_id"]

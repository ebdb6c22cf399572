"""One rule for user ids on every surface: identify, POST /api/v1/users and a CSV row reject the same placeholders."""

from __future__ import annotations

import pytest

from kana.imports import csvfile
from tests.unit.test_ids import SPELLINGS


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



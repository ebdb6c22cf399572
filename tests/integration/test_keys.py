"""API key records in Redis: what the receiver checks keys against while the database is down (SPEC §3)."""

from __future__ import annotations

from kana.domain import keys


def test_a_verified_key_is_recorded_and_revoking_removes_the_record(client, workspace, redis):
    digest = keys.hash_key(workspace.ingest_key)
    call = {"userId": "u1", "event": "E"}
    headers = {"Authorization": f"Bearer {workspace.ingest_key}"}
    assert client.post("/v1/track", json=call, headers=headers).status_code == 200
    recorded = keys.recall(redis, digest)
    assert recorded is not None and recorded.workspace_id == workspace.id and recorded.scope == "ingest"

    key_id = recorded.key_id
    assert client.delete(f"/api/v1/keys/{key_id}", headers=workspace.headers).status_code == 204
    assert keys.recall(redis, digest) is None
    assert client.post("/v1/track", json=call, headers=headers).status_code == 401


def test_unknown_keys_are_not_recorded(client, redis):
    assert client.post("/v1/track", json={"userId": "u1", "event": "E"},
                       headers={"Authorization": "Bearer kana_i_unknown"}).status_code == 401
    assert redis.keys(keys.record_key("*")) == []


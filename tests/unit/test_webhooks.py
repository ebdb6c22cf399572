"""The webhook signature scheme on its own: Kana-Signature t=…,v1=HMAC-SHA256 of "<t>.<body>"."""

from __future__ import annotations

from kana.domain import webhooks
from tests.integration.test_dashboard import admin, browser, post, text  # noqa: F401 - fixtures


def test_signature_scheme():
    body = b'{"a":1}'
    header = webhooks.sign("s3cret", body, 1700000000)
    import hashlib
    import hmac

    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert not webhooks.verify("other", body, webhooks.sign("s3cret", body, int(__import__("time").time())))



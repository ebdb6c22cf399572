"""Local fake Stripe and Chargebee HTTP servers for the billing-import tests.

The official client libraries talk real HTTP to these (STRIPE_API_BASE /
CHARGEBEE_API_BASE point at them); nothing in the libraries is patched.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

import jobs
from kana.runtime import Runtime


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    import json

    return Response(json.dumps(body), status=status, headers=headers or {}, mimetype="application/json")


@dataclass
class FakeStripe:
    """``GET /v1/customers`` with Stripe's list semantics (limit, starting_after, has_more)."""

    api_key: str = "sk_test_fake"
    customers: list[dict[str, Any]] = field(default_factory=list)
    # How many requests to answer 429 first, and whether those say Stripe-Should-Retry: true.
    rate_limit: int = 0
    should_retry: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def add(self, cid: str, email: str | None = None, name: str | None = None) -> dict[str, Any]:
        customer = {"id": cid, "object": "customer", "email": email, "name": name, "created": 1700000000,
                    "livemode": False, "metadata": {}}
        self.customers.append(customer)
        return customer

    def __call__(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        self.requests.append({"path": request.path, "args": dict(request.args),
                              "auth": request.headers.get("Authorization")})
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            body = {"error": {"type": "invalid_request_error",
                              "message": "Invalid API Key provided: sk_****"}}
            return _json(body, 401)(environ, start_response)
        if self.rate_limit > 0:
            self.rate_limit -= 1
            headers = {"Stripe-Should-Retry": "true"} if self.should_retry else {}
            body = {"error": {"type": "invalid_request_error", "code": "rate_limit",
                              "message": "Too many requests hit the API too quickly."}}
            return _json(body, 429, headers)(environ, start_response)
        if request.method != "GET" or request.path != "/v1/customers":
            return _json({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}},
                         404)(environ, start_response)
        limit = int(request.args.get("limit", 10))
        start = 0
        after = request.args.get("starting_after")
        if after:
            start = next(i for i, c in enumerate(self.customers) if c["id"] == after) + 1
        page = self.customers[start : start + limit]
        body = {"object": "list", "url": "/v1/customers", "data": page,
                "has_more": start + limit < len(self.customers)}
        return _json(body)(environ, start_response)


@dataclass
class FakeChargebee:
    """``GET /api/v2/customers`` with Chargebee's list semantics (limit, offset, next_offset)."""

    api_key: str = "cb_test_fake"
    customers: list[dict[str, Any]] = field(default_factory=list)
    rate_limit: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def add(self, cid: str, email: str | None = None, first_name: str | None = None,
            last_name: str | None = None, company: str | None = None) -> None:
        self.customers.append({"id": cid, "email": email, "first_name": first_name, "last_name": last_name,
                               "company": company, "object": "customer", "deleted": False})

    def __call__(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        self.requests.append({"path": request.path, "args": dict(request.args)})
        expected = "Basic " + base64.b64encode(f"{self.api_key}:".encode()).decode()
        if request.headers.get("Authorization") != expected:
            body = {"message": "Sorry, authentication failed. Invalid api key",
                    "api_error_code": "api_authentication_failed", "error_code": "api_authentication_invalid_key",
                    "http_status_code": 401}
            return _json(body, 401)(environ, start_response)
        if self.rate_limit > 0:
            self.rate_limit -= 1
            body = {"message": "Sorry, access has been blocked temporarily due to request count exceeding "
                               "acceptable limits.", "api_error_code": "api_request_limit_exceeded",
                    "http_status_code": 429}
            return _json(body, 429, {"Retry-After": "0"})(environ, start_response)
        limit = int(request.args.get("limit", 10))
        start = int(request.args.get("offset") or 0)
        page = self.customers[start : start + limit]
        body: dict[str, Any] = {"list": [{"customer": c} for c in page]}
        if start + limit < len(self.customers):
            body["next_offset"] = str(start + limit)
        return _json(body)(environ, start_response)


def _serve(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture
def worker_settings(settings, monkeypatch):
    """Set settings for the job side (``jobs.runtime()``), e.g. ``worker_settings(stripe_api_base=url)``."""

    def apply(**overrides: Any) -> None:
        monkeypatch.setattr(jobs, "_runtime", Runtime(replace(settings, **overrides)))

    return apply


@pytest.fixture
def fake_stripe(worker_settings) -> Iterator[FakeStripe]:
    fake = FakeStripe()
    for url in _serve(fake):
        fake.url = url
        worker_settings(stripe_api_base=url)
        yield fake


@pytest.fixture
def fake_chargebee(worker_settings) -> Iterator[FakeChargebee]:
    fake = FakeChargebee()
    for url in _serve(fake):
        fake.url = f"{url}/api/v2"
        worker_settings(chargebee_api_base=fake.url)
        yield fake

"""Billing customer ids: the one place that says what a valid id is per provider."""

from __future__ import annotations

import re

PATTERNS = {
    "stripe": re.compile(r"cus_[A-Za-z0-9]+"),
    "chargebee": re.compile(r"[A-Za-z0-9_.\-]{1,50}"),
}


def check_billing_id(value: object, provider: str | None) -> str | None:
    """Why ``value`` is not a valid customer id for ``provider`` (None when it is).

    With no provider set, an id valid for either provider is accepted.
    """
    if not isinstance(value, str):
        return "must be a string"
    patterns = [PATTERNS[provider]] if provider in PATTERNS else list(PATTERNS.values())
    if any(p.fullmatch(value) for p in patterns):
        return None
    if provider == "stripe":
        return "must be a Stripe customer id (cus_ followed by letters and digits)"
    if provider == "chargebee":
        return "must be a Chargebee customer id (1-50 letters, digits, _ . -)"
    return "must be a Stripe (cus_...) or Chargebee customer id"


def provider_of(value: str, provider: str | None) -> str | None:
    """Which provider an accepted id belongs to (the workspace's, or guessed from its shape)."""
    if provider:
        return provider
    return "stripe" if PATTERNS["stripe"].fullmatch(value) else "chargebee"

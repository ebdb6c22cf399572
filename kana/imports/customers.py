"""Stripe and Chargebee customer imports (SPEC §5).

Each lists the workspace's customers through the provider's official library
and upserts them as users without a user_id ("unclaimed"), keyed by billing
id, with source and billing_provider set to the provider. A later Segment
identify with the same email claims such a user (§4.1). Re-running an import
changes nothing.

Who is the source of truth decides what an import may overwrite: for an
unclaimed user it is the billing provider (its email and name follow the
customer's); once Segment has claimed the user, identify calls own its email
and name, and the import only fills blanks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from kana import db
from kana.domain import identity
from kana.domain.billing import check_billing_id
from kana.errors import KanaError
from kana.models import User, Workspace

log = logging.getLogger(__name__)

PROVIDERS = ("stripe", "chargebee")
PAGE_SIZE = 100
CHUNK = 500
# Retries of a page the provider rate-limited after the library's own retries.
RATE_LIMIT_RETRIES = 5


class ImportFailed(KanaError):
    """The provider refused or could not be reached; the message says what to do."""

    code = "not_configured"


@dataclass(frozen=True)
class Customer:
    billing_id: str
    email: str | None = None
    name: str | None = None


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0  # customer ids that aren't valid billing ids of the provider

    def add(self, other: Counts) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


# --- upsert ---------------------------------------------------------------------


def upsert_customers(session: Session, workspace_id: int, provider: str, customers: Iterable[Customer]) -> Counts:
    """Create or update one unclaimed user per customer, keyed by billing id (caller's transaction)."""
    counts = Counts()
    wanted: dict[str, Customer] = {}
    for customer in customers:
        if check_billing_id(customer.billing_id, provider) is not None or len(customer.billing_id) > 100:
            log.warning("skipping %s customer with unusable id %r", provider, customer.billing_id)
            counts.skipped += 1
            continue
        wanted[customer.billing_id] = customer  # the last listing of an id wins
    if not wanted:
        return counts
    existing: dict[str, list[User]] = {}
    ids = sorted(wanted)
    for i in range(0, len(ids), CHUNK):
        for user in session.scalars(
            select(User)
            .where(User.workspace_id == workspace_id, User.billing_id.in_(ids[i : i + CHUNK]))
            .order_by(User.kana_id)
        ):
            existing.setdefault(user.billing_id, []).append(user)
    for billing_id, customer in wanted.items():
        users = existing.get(billing_id)
        if not users:
            traits = identity.Traits(email=customer.email, name=customer.name, billing_id=billing_id,
                                     billing_provider=provider)
            identity.new_user(session, workspace_id, None, traits, None, source=provider)
            counts.created += 1
            continue
        changed = False
        for user in users:
            # The provider owns an unclaimed user's email and name; a claimed
            # user's belong to identify, and the import only fills blanks.
            traits = identity.Traits(email=customer.email, name=customer.name)
            changed |= identity.apply_traits(user, traits, None, only_blanks=user.user_id is not None)
        if changed:
            counts.updated += 1
        else:
            counts.unchanged += 1
    db.assign_ids(session)
    session.flush()
    return counts


# --- Stripe -----------------------------------------------------------------------


def stripe_customers(
    api_key: str,
    *,
    api_base: str | None = None,
    max_network_retries: int = 3,
    page_size: int = PAGE_SIZE,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Customer]:
    """All customers of the Stripe account, through the official library's auto-paging.

    The library retries what Stripe says to retry (``Stripe-Should-Retry``,
    409, 5xx, connection errors) up to ``max_network_retries`` times. A rate
    limit that outlasts those retries resumes the listing after the last
    customer seen, with a growing pause, a few times before giving up.
    """
    import stripe

    client = stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        max_network_retries=max_network_retries,
    )
    last: str | None = None
    limited = 0
    while True:
        params: dict[str, Any] = {"limit": page_size}
        if last is not None:
            params["starting_after"] = last
        try:
            for obj in client.v1.customers.list(params=params).auto_paging_iter():
                last = obj.id
                if getattr(obj, "deleted", False):
                    continue
                yield Customer(billing_id=obj.id, email=_text(getattr(obj, "email", None)),
                               name=_text(getattr(obj, "name", None)))
            return
        except stripe.RateLimitError as exc:
            limited += 1
            if limited > RATE_LIMIT_RETRIES:
                raise ImportFailed(f"Stripe kept rate-limiting the customer listing (HTTP 429) after "
                                   f"{RATE_LIMIT_RETRIES} retries: {exc.user_message or exc}. "
                                   "Try again later.") from None
            delay = min(30.0, 2.0**limited)
            log.info("Stripe rate limit; resuming after %s in %.0fs", last, delay)
            sleep(delay)
        except stripe.AuthenticationError as exc:
            raise ImportFailed(f"Stripe rejected the API key (HTTP {exc.http_status or 401}): "
                               f"{exc.user_message or exc}. Set a valid secret key with "
                               "PATCH /api/v1/workspace {\"stripe_api_key\": ...}.") from None
        except stripe.PermissionError as exc:
            raise ImportFailed(f"The Stripe API key may not list customers (HTTP 403): {exc.user_message or exc}. "
                               "Use a key with read access to Customers.") from None
        except stripe.APIConnectionError as exc:
            where = api_base or "api.stripe.com"
            raise ImportFailed(f"Could not reach Stripe at {where}: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise ImportFailed(f"Stripe answered HTTP {exc.http_status}: {exc.user_message or exc}") from None


# --- Chargebee --------------------------------------------------------------------


def chargebee_customers(
    api_key: str,
    site: str,
    *,
    api_base: str | None = None,
    page_size: int = PAGE_SIZE,
    retries: int = RATE_LIMIT_RETRIES,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Customer]:
    """All customers of the Chargebee site, through the official library (offset pagination).

    The library's own retry loop is left off: it retries HTTP 429 without
    bound. Here a rate-limited (429) or unavailable (5xx) page is retried a
    few times, after ``Retry-After`` when Chargebee sends one.
    """
    import chargebee
    import httpx
    from chargebee import Chargebee

    cb = Chargebee(api_key=api_key, site=site)
    if api_base:
        # The library builds https://{site}.chargebee.com/api/v2; a configured
        # base (a test server) replaces that whole prefix.
        cb.env.api_endpoint = api_base.rstrip("/")
        if api_base.startswith("http://"):
            cb.update_protocol("http")
            # The library decides between http and https on a class attribute.
            Chargebee.verify_ca_certs = False
    offset: str | None = None
    while True:
        params: dict[str, Any] = {"limit": page_size}
        if offset:
            params["offset"] = offset
        for attempt in range(retries + 1):
            try:
                page = cb.Customer.list(params)
                break
            except chargebee.APIError as exc:
                status = exc.http_status_code
                if status == 401:
                    raise ImportFailed(f"Chargebee rejected the API key for site {site!r} (HTTP 401): {exc}. Set "
                                       "chargebee_site and chargebee_api_key with PATCH /api/v1/workspace.") from None
                if status == 403:
                    raise ImportFailed(f"The Chargebee API key may not list customers (HTTP 403): {exc}") from None
                if (status == 429 or status >= 500) and attempt < retries:
                    delay = _retry_after(exc.http_headers)
                    if delay is None:
                        delay = min(30.0, 2.0 ** (attempt + 1))
                    log.info("Chargebee HTTP %s; retrying in %.1fs", status, delay)
                    sleep(delay)
                    continue
                raise ImportFailed(f"Chargebee answered HTTP {status}: {exc}") from None
            except httpx.HTTPError as exc:
                raise ImportFailed(f"Could not reach Chargebee for site {site!r}: {exc}") from None
        for entry in page.list:
            customer = entry.customer
            name = " ".join(p for p in (customer.first_name, customer.last_name) if p) or customer.company
            yield Customer(billing_id=customer.id, email=_text(customer.email), name=_text(name))
        offset = page.next_offset
        if not offset:
            return


def _retry_after(headers: Any) -> float | None:
    value = (headers or {}).get("retry-after") or (headers or {}).get("Retry-After")
    try:
        return min(60.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --- running an import --------------------------------------------------------------


def credentials(session: Session, workspace_id: int, provider: str, settings: Settings) -> dict[str, Any]:
    """What listing the workspace's customers needs; ImportFailed says what is missing."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
    workspace = session.get(Workspace, workspace_id)
    if workspace is None:
        raise ImportFailed(f"No workspace {workspace_id}.")
    if workspace.billing_provider not in (None, provider):
        raise ImportFailed(f"This workspace bills with {workspace.billing_provider}, not {provider}; "
                           "change billing_provider first.")
    if provider == "stripe":
        key = workspace.stripe_api_key or settings.stripe_api_key
        if not key:
            raise ImportFailed("No Stripe API key: set stripe_api_key with PATCH /api/v1/workspace "
                               "(or STRIPE_API_KEY for the whole installation).")
        return {"api_key": key, "api_base": settings.stripe_api_base}
    if not workspace.chargebee_site or not workspace.chargebee_api_key:
        raise ImportFailed("No Chargebee site and API key: set chargebee_site and chargebee_api_key "
                           "with PATCH /api/v1/workspace.")
    return {"api_key": workspace.chargebee_api_key, "site": workspace.chargebee_site,
            "api_base": settings.chargebee_api_base}


def run(
    sessions: sessionmaker,
    workspace_id: int,
    provider: str,
    settings: Settings,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """List the provider's customers and upsert them, one transaction per chunk; returns the counts."""
    with sessions() as s:
        creds = credentials(s, workspace_id, provider, settings)
    customers = stripe_customers(**creds) if provider == "stripe" else chargebee_customers(**creds)
    total = Counts()
    seen = 0
    while batch := list(islice(customers, CHUNK)):
        with sessions.begin() as s:
            total.add(upsert_customers(s, workspace_id, provider, batch))
        seen += len(batch)
        if progress is not None:
            progress(seen)
    return total.as_dict()

"""``POST /api/billing/checkout`` and ``POST /api/billing/portal``: Stripe-hosted pages, owners and
admins only. We hand back a URL; the card is typed into Stripe's page, never into ours.

1. *as the user*: the caller must see the organization's membership (else 404, as for any other
   tenant's id) and be its owner or admin (else 403) — RLS decides what is visible, as in the browser.
2. *as the service*: read the billing account (clients can read it, never write it).
3. Stripe: the organization's customer is created once (idempotency key per organization) and
   stored with ``coalesce`` so a racing second request keeps the first; the price comes from the
   plan's lookup key; the session carries the organization id as ``client_reference_id`` and in
   the metadata of the session and of the subscription it creates, which is how the webhook finds
   the organization even before the customer link is stored.
4. At most one open checkout per organization (the account row's ``checkout_*`` columns): under the
   row lock a start reuses the open session for the same plan, waits for the session another start
   is creating, or claims the next attempt, after expiring the previous session at Stripe. The
   create carries the attempt's idempotency key, so a retry can only get the attempt's session.
No database connection is held while Stripe answers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from shared.auth import Claims
from shared.billing import accounts, stripe_client
from shared.billing.errors import (
    AlreadySubscribed,
    BillingUnavailable,
    CheckoutCompleted,
    CheckoutInProgress,
    NoBillingAccount,
)
from shared.billing.plans import LOOKUP_KEYS, PLANS, Plan, entitles
from shared.billing.schemas import CheckoutRequest, PortalRequest, RedirectOut
from shared.db.session import Database, as_service, as_user
from shared.errors import Forbidden, NotFound
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.settings import get_settings

MANAGER_ROLES = frozenset({"owner", "admin"})


async def _require_billing_manager(db: Database, claims: Claims, org_id: uuid.UUID) -> None:
    async with as_user(db, claims) as conn:
        role = await accounts.member_role(conn, org_id)
    if role is None:
        raise NotFound("No such organization.")
    if role not in MANAGER_ROLES:
        raise Forbidden("Only owners and admins of the organization can manage its billing.")


def _billing_page(outcome: str | None = None) -> str:
    base = get_settings().dashboard_url.rstrip("/") + "/settings/billing"
    return f"{base}?checkout={outcome}" if outcome else base


async def _account(db: Database, org_id: uuid.UUID) -> tuple[dict[str, Any], dict[str, Any] | None]:
    async with as_service(db) as conn:
        org = await accounts.organization(conn, org_id)
        account = await accounts.account(conn, org_id)
    if org is None:  # deleted since the membership check
        raise NotFound("No such organization.")
    return org, account


# A session lives an hour (Stripe allows 30 minutes to 24 hours) and is handed out again while it
# has at least ten minutes left.
SESSION_LIFETIME: Final = timedelta(hours=1)
REUSE_MARGIN: Final = timedelta(minutes=10)
# A claim whose session is not stored after this long belongs to a start that died; while it is
# younger than TAKEOVER_WINDOW, its attempt (and idempotency key) is taken over, so Stripe answers
# with the session the dead start may have created instead of making a second one.
CLAIM_TIMEOUT: Final = timedelta(seconds=30)
TAKEOVER_WINDOW: Final = timedelta(minutes=10)
JOIN_WAIT_SECONDS: Final = 12.0
JOIN_POLL_SECONDS: Final = 0.1
MAX_ROUNDS: Final = 4


def idempotency_key(org_id: uuid.UUID, attempt: int) -> str:
    return f"hiredhands-checkout-{org_id}-{attempt}"


@dataclass(frozen=True, slots=True)
class Reuse:
    url: str


@dataclass(frozen=True, slots=True)
class Join:
    attempt: int


@dataclass(frozen=True, slots=True)
class Close:
    session_id: str


@dataclass(frozen=True, slots=True)
class Create:
    attempt: int
    expires_at: datetime
    customer_id: str


Step = Reuse | Join | Close | Create


async def _next_step(db: Database, org_id: uuid.UUID, plan: str, customer_id: str) -> Step:
    """Decide, under the billing account's row lock, what this start does about the organization's
    one current checkout. Two starts serialize here; neither holds the lock while Stripe answers."""
    async with as_service(db) as conn:
        await accounts.ensure_account(conn, org_id)
        held = await accounts.account(conn, org_id, for_update=True)
        if held is None:
            raise NotFound("No such organization.")
        if held["stripe_subscription_id"] and entitles(held["subscription_status"]):
            raise AlreadySubscribed("The organization already has a subscription; change it in the billing portal.")
        now: datetime = held["now"]
        attempt: int = held["checkout_attempt"]
        if held["checkout_plan"] is not None:
            same_plan = held["checkout_plan"] == plan
            fresh = held["checkout_expires_at"] > now + REUSE_MARGIN
            if held["checkout_session_id"] is not None:
                if same_plan and fresh:
                    return Reuse(str(held["checkout_url"]))
                return Close(str(held["checkout_session_id"]))
            claimed_for = now - held["checkout_claimed_at"]
            if claimed_for < CLAIM_TIMEOUT:
                if not same_plan:
                    raise CheckoutInProgress(
                        "A checkout for another plan is being started for this organization; try again shortly."
                    )
                return Join(attempt)
            if same_plan and claimed_for < TAKEOVER_WINDOW:
                await accounts.claim_checkout(
                    conn, org_id, attempt=attempt, plan=plan, expires_at=held["checkout_expires_at"]
                )
                return Create(attempt, held["checkout_expires_at"], customer_id)
        expires_at = now + SESSION_LIFETIME
        await accounts.claim_checkout(conn, org_id, attempt=attempt + 1, plan=plan, expires_at=expires_at)
        return Create(attempt + 1, expires_at, customer_id)


async def _join(db: Database, org_id: uuid.UUID, attempt: int) -> str | None:
    """Wait for the start that claimed ``attempt`` to store its session. None: it gave up (decide
    again). Polls without holding a connection in between."""
    async with asyncio.timeout(JOIN_WAIT_SECONDS):
        while True:
            async with as_service(db) as conn:
                state = await accounts.checkout_state(conn, org_id)
            if state is None or state["checkout_attempt"] != attempt or state["checkout_plan"] is None:
                return None
            if state["checkout_url"] is not None:
                return str(state["checkout_url"])
            await asyncio.sleep(JOIN_POLL_SECONDS)


async def _close(db: Database, org_id: uuid.UUID, session_id: str) -> None:
    """Make sure the previous session can no longer be paid, then forget it."""
    session = await stripe_client.retrieve_checkout_session(session_id)
    if session is not None and session.status == "complete":
        raise CheckoutCompleted("The organization's last checkout was just paid; its subscription is being set up.")
    if session is not None and session.status == "open":
        await stripe_client.expire_checkout_session(session_id)
    async with as_service(db) as conn:
        await accounts.forget_checkout(conn, org_id, session_id)


async def _create(db: Database, org_id: uuid.UUID, plan: Plan, lookup_key: str, step: Create) -> str:
    try:
        price_id = await stripe_client.find_price(lookup_key)
        if price_id is None:
            log_event(
                "stripe price missing",
                logging.ERROR,
                **{ORG_ID: str(org_id), DECISION_REASON: "price-missing"},
                lookup_key=lookup_key,
            )
            raise BillingUnavailable("This plan cannot be bought right now.")
        session = await stripe_client.create_checkout_session(
            customer_id=step.customer_id,
            price_id=price_id,
            org_id=org_id,
            plan=plan.name,
            success_url=_billing_page("success"),
            cancel_url=_billing_page("cancelled"),
            expires_at=step.expires_at,
            idempotency_key=idempotency_key(org_id, step.attempt),
        )
    except Exception:
        # Stripe said no (or never got the request): the next start claims a new attempt. A start
        # cancelled mid-call keeps its claim instead, so a takeover asks Stripe with the same key
        # and gets the session it may already have created.
        async with as_service(db) as conn:
            await accounts.release_checkout(conn, org_id, attempt=step.attempt)
        raise
    async with as_service(db) as conn:
        stored = await accounts.store_checkout(
            conn, org_id, attempt=step.attempt, session_id=session.id, url=str(session.url)
        )
    return stored or str(session.url)


async def start_checkout(db: Database, claims: Claims, body: CheckoutRequest, *, request_id: str | None) -> RedirectOut:
    """At most one open checkout per organization: a start reuses the open session for the same
    plan, waits for one being created, or expires the previous session and creates the next."""
    await _require_billing_manager(db, claims, body.org_id)
    org, account = await _account(db, body.org_id)
    if account and account["stripe_subscription_id"] and entitles(account["subscription_status"]):
        raise AlreadySubscribed("The organization already has a subscription; change it in the billing portal.")

    customer_id = account["stripe_customer_id"] if account else None
    if not customer_id:
        created = await stripe_client.create_customer(body.org_id, org_name=str(org["name"]))
        async with as_service(db) as conn:
            customer_id = await accounts.link_customer(conn, body.org_id, created)

    plan = PLANS[body.plan]
    for _ in range(MAX_ROUNDS):
        step = await _next_step(db, body.org_id, plan.name, str(customer_id))
        match step:
            case Reuse(url):
                return _started(url, body.org_id, plan.name, "checkout-reused", request_id)
            case Join(attempt):
                try:
                    joined = await _join(db, body.org_id, attempt)
                except TimeoutError:
                    raise CheckoutInProgress("A checkout is being started for this organization; try again.") from None
                if joined is not None:
                    return _started(joined, body.org_id, plan.name, "checkout-joined", request_id)
            case Close(session_id):
                await _close(db, body.org_id, session_id)
            case Create():
                url = await _create(db, body.org_id, plan, LOOKUP_KEYS[body.plan], step)
                return _started(url, body.org_id, plan.name, "checkout-created", request_id)
    raise CheckoutInProgress("The organization's checkout changed while this one started; try again.")


def _started(url: str, org_id: uuid.UUID, plan: str, reason: str, request_id: str | None) -> RedirectOut:
    log_event(
        "checkout started",
        logging.INFO,
        **{REQUEST_ID: request_id, ORG_ID: str(org_id), DECISION_REASON: reason},
        plan=plan,
    )
    return RedirectOut(url=url)


async def open_portal(db: Database, claims: Claims, body: PortalRequest, *, request_id: str | None) -> RedirectOut:
    await _require_billing_manager(db, claims, body.org_id)
    _, account = await _account(db, body.org_id)
    if not account or not account["stripe_customer_id"]:
        raise NoBillingAccount("The organization has no billing account yet; subscribe to a plan first.")
    url = await stripe_client.create_portal_session(
        customer_id=str(account["stripe_customer_id"]), return_url=_billing_page()
    )
    log_event(
        "portal opened",
        logging.INFO,
        **{REQUEST_ID: request_id, ORG_ID: str(body.org_id), DECISION_REASON: "portal-created"},
    )
    return RedirectOut(url=url)

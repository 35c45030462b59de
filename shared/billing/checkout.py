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
No database connection is held while Stripe answers.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from shared.auth import Claims
from shared.billing import accounts, stripe_client
from shared.billing.errors import AlreadySubscribed, BillingUnavailable, NoBillingAccount
from shared.billing.plans import LOOKUP_KEYS, PLANS, entitles
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


async def start_checkout(db: Database, claims: Claims, body: CheckoutRequest, *, request_id: str | None) -> RedirectOut:
    await _require_billing_manager(db, claims, body.org_id)
    org, account = await _account(db, body.org_id)
    if account and account["stripe_subscription_id"] and entitles(account["subscription_status"]):
        raise AlreadySubscribed("The organization already has a subscription; change it in the billing portal.")

    customer_id = account["stripe_customer_id"] if account else None
    if not customer_id:
        created = await stripe_client.create_customer(body.org_id, org_name=str(org["name"]))
        async with as_service(db) as conn:
            customer_id = await accounts.link_customer(conn, body.org_id, created)

    plan, lookup_key = PLANS[body.plan], LOOKUP_KEYS[body.plan]
    price_id = await stripe_client.find_price(lookup_key)
    if price_id is None:
        log_event(
            "stripe price missing",
            logging.ERROR,
            **{REQUEST_ID: request_id, DECISION_REASON: "price-missing"},
            lookup_key=lookup_key,
        )
        raise BillingUnavailable("This plan cannot be bought right now.")

    url = await stripe_client.create_checkout_session(
        customer_id=customer_id,
        price_id=price_id,
        org_id=body.org_id,
        plan=plan.name,
        success_url=_billing_page("success"),
        cancel_url=_billing_page("cancelled"),
    )
    log_event(
        "checkout started",
        logging.INFO,
        **{REQUEST_ID: request_id, ORG_ID: str(body.org_id), DECISION_REASON: "checkout-created"},
        plan=plan.name,
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

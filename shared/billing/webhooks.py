"""``POST /api/stripe/webhook``: verified, recorded once, applied once, in order.

1. **Verify** the raw body with stripe-python (``signature.py``); a refusal is a 400 and nothing is
   written.
2. **Duplicate fast path**: an event id already in the ledger is acknowledged without calling Stripe.
3. **Re-read** the subscription the event is about from Stripe's API (dj-stripe's way). The event's
   own snapshot is only used for ids: events arrive out of order and several share one ``created``
   second, so the state written is always Stripe's current state, stamped with the moment we asked
   (``observed_at``, taken before the call). The read happens before the transaction, so no database
   connection waits on Stripe.
4. **One transaction** (``as_service``): ``insert ... on conflict (id) do nothing returning id`` into
   the ledger; only when a row comes back, lock the organization's billing account and apply the
   state unless the account already holds a later observation (the ``state_updated_at`` watermark),
   then the plan's limits and an audit row when the plan changes, then the ledger row's outcome. Two
   racing deliveries of one id serialize on the ledger's primary key: the loser gets no row and
   changes nothing. Any failure rolls everything back and becomes a 5xx, so Stripe retries.

Event types we do not handle are recorded and acknowledged (outcome ``ignored-event-type``). The
ledger keeps an event's id, type, created, outcome and the ids of its object, never its payload
(``charge.succeeded`` carries card details).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from shared.billing import accounts
from shared.billing.plans import FREE, Plan, entitles
from shared.billing.schemas import (
    LedgerIds,
    Outcome,
    StripeEvent,
    SubscriptionState,
    WebhookReceipt,
    invoice_subscription_id,
    object_id,
    org_id_hint,
)
from shared.billing.signature import verify_event, webhook_secrets
from shared.billing.stripe_client import retrieve_subscription
from shared.db.session import Connection, Database, as_service
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.settings import get_settings

SUBSCRIPTION_EVENTS: Final = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
)
INVOICE_EVENTS: Final = frozenset({"invoice.paid", "invoice.payment_failed"})
CHECKOUT_COMPLETED: Final = "checkout.session.completed"
HANDLED_EVENTS: Final = SUBSCRIPTION_EVENTS | INVOICE_EVENTS | {CHECKOUT_COMPLETED}


@dataclass(frozen=True, slots=True)
class Target:
    """What an event is about, read from its payload: ids only, never state."""

    subscription_id: str | None
    customer_id: str | None
    org_hint: uuid.UUID | None


def target_of(event: StripeEvent) -> Target | None:
    """None for event types we do not act on."""
    obj = event.data.object
    if event.type in SUBSCRIPTION_EVENTS:
        metadata = obj.get("metadata") or {}
        return Target(object_id(obj.get("id")), object_id(obj.get("customer")), org_id_hint(metadata.get("org_id")))
    if event.type in INVOICE_EVENTS:
        return Target(invoice_subscription_id(obj), object_id(obj.get("customer")), None)
    if event.type == CHECKOUT_COMPLETED:
        metadata = obj.get("metadata") or {}
        hint = org_id_hint(obj.get("client_reference_id")) or org_id_hint(metadata.get("org_id"))
        subscription = object_id(obj.get("subscription")) if obj.get("mode") == "subscription" else None
        return Target(subscription, object_id(obj.get("customer")), hint)
    return None


@dataclass(frozen=True, slots=True)
class Observation:
    """Stripe's state of one subscription, and when we asked for it."""

    state: SubscriptionState | None
    observed_at: datetime


async def observe(event: StripeEvent, target: Target) -> Observation | None:
    if target.subscription_id is None:
        return None
    observed_at = datetime.now(UTC)
    current = await retrieve_subscription(target.subscription_id)
    if current is None and event.type == "customer.subscription.deleted":
        # Stripe no longer has it (deleted test data); a deleted subscription's snapshot is terminal.
        current = event.data.object
    return Observation(SubscriptionState.from_stripe(current) if current else None, observed_at)


async def resolve_org(conn: Connection, target: Target, state: SubscriptionState | None) -> uuid.UUID | None:
    """The customer we stored decides; an organization id we put in Stripe's metadata comes next."""
    customer_id = (state.customer_id if state else None) or target.customer_id
    if customer_id:
        owner = await accounts.org_by_customer(conn, customer_id)
        if owner is not None:
            return owner
    for hint in (target.org_hint, state.org_id_hint if state else None):
        if hint is not None and await accounts.organization(conn, hint) is not None:
            return hint
    return None


def plan_after(state: SubscriptionState) -> Plan | None:
    """The plan the subscription gives, or None for a price that is not one of ours (plan kept)."""
    if not state.entitling:
        return FREE
    return state.plan


async def apply_subscription(
    conn: Connection,
    org_id: uuid.UUID,
    state: SubscriptionState,
    observed_at: datetime,
    *,
    event: StripeEvent,
    request_id: str | None,
) -> Outcome:
    """Apply Stripe's observed state to the organization, unless newer state is already held."""
    await accounts.ensure_account(conn, org_id)
    held = await accounts.account(conn, org_id, for_update=True)
    if held is None:  # the organization was deleted while we worked
        return "org-unresolved"
    if held["stripe_customer_id"] not in (None, state.customer_id):
        return "customer-mismatch"
    if held["state_updated_at"] is not None and held["state_updated_at"] >= observed_at:
        return "stale"
    replacing = held["stripe_subscription_id"] not in (None, state.id)
    if replacing and entitles(held["subscription_status"]) and not state.entitling:
        # An old subscription's news must not end the one the organization pays for now.
        return "other-subscription-active"

    limits_plan = await accounts.limits_plan_for_update(conn, org_id) or FREE.name
    plan = plan_after(state)
    plan_name = plan.name if plan else held["plan"]
    applied = await accounts.set_subscription_state(
        conn,
        org_id,
        customer_id=state.customer_id,
        subscription_id=state.id,
        status=state.status,
        plan=plan_name,
        current_period_end=state.current_period_end,
        observed_at=observed_at,
    )
    if not applied:
        return "stale"
    if plan is not None and plan.name != limits_plan:
        await accounts.set_limits(conn, org_id, plan)
        await accounts.write_audit(
            conn,
            org_id,
            action="billing.plan_changed",
            target_type="subscription",
            target_id=state.id,
            details={
                "from": limits_plan,
                "to": plan.name,
                "subscription_status": state.status,
                "monthly_budget_microusd": plan.monthly_budget_microusd,
                "stripe_event_id": event.id,
                "stripe_event_type": event.type,
            },
            request_id=request_id,
        )
    return "applied"


async def _handle(
    conn: Connection,
    event: StripeEvent,
    target: Target | None,
    observation: Observation | None,
    *,
    request_id: str | None,
) -> tuple[Outcome, uuid.UUID | None]:
    state = observation.state if observation else None
    org_id = await resolve_org(conn, target, state) if target else None
    ids = LedgerIds.of(event)
    recorded = await accounts.record_event(
        conn,
        event_id=event.id,
        event_type=event.type,
        org_id=org_id,
        event_created=event.created_at,
        ids=ids,
    )
    if not recorded:
        return "duplicate", org_id
    if event.type == CHECKOUT_COMPLETED and org_id is not None and ids.object_id:
        # A paid session is no longer the organization's open checkout.
        await accounts.forget_checkout(conn, org_id, ids.object_id)

    outcome: Outcome
    if target is None:
        outcome = "ignored-event-type"
    elif org_id is None:
        outcome = "org-unresolved"
    elif observation is None:
        outcome = "no-subscription"
    elif observation.state is None:
        outcome = "subscription-gone"
    else:
        outcome = await apply_subscription(
            conn, org_id, observation.state, observation.observed_at, event=event, request_id=request_id
        )
    await accounts.finish_event(conn, event.id, outcome)
    return outcome, org_id


async def receive_event(
    db: Database, payload: bytes, signature: str | None, *, request_id: str | None
) -> WebhookReceipt:
    event, _ = verify_event(payload, signature, webhook_secrets(get_settings()))

    async with as_service(db) as conn:
        if await accounts.event_recorded(conn, event.id):
            return _done(event, "duplicate", None, request_id)

    target = target_of(event)
    observation = await observe(event, target) if target else None

    async with as_service(db) as conn:
        outcome, org_id = await _handle(conn, event, target, observation, request_id=request_id)
    return _done(event, outcome, org_id, request_id)


def _done(event: StripeEvent, outcome: Outcome, org_id: uuid.UUID | None, request_id: str | None) -> WebhookReceipt:
    log_event(
        "stripe event",
        logging.INFO,
        **{REQUEST_ID: request_id, ORG_ID: str(org_id) if org_id else None, DECISION_REASON: outcome},
        stripe_event_id=event.id,
        stripe_event_type=event.type,
    )
    return WebhookReceipt(event_id=event.id, outcome=outcome)

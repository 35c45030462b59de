"""Billing's shapes: the two request bodies, their answer, the webhook envelope, and the subscription
state the webhook applies.

Request models forbid unknown fields and bound every field. Stripe shapes ignore unknown fields (the
API grows) and read both the old and the current layout where Stripe moved a field between API
versions: ``current_period_end`` went from the subscription to its items, and an invoice's
subscription from ``invoice.subscription`` to ``invoice.parent.subscription_details.subscription``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shared.billing.plans import PaidPlanName, Plan, entitles, plan_for_lookup_key

# ---------------------------------------------------------------------------------------------
# Our API.
# ---------------------------------------------------------------------------------------------


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: uuid.UUID
    plan: PaidPlanName


class PortalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: uuid.UUID


class RedirectOut(BaseModel):
    """Where to send the browser: a Stripe-hosted page."""

    url: str


Outcome = Literal[
    "applied",
    "duplicate",
    "stale",
    "ignored-event-type",
    "org-unresolved",
    "customer-mismatch",
    "subscription-gone",
    "other-subscription-active",
    "no-subscription",
]


class WebhookReceipt(BaseModel):
    received: Literal[True] = True
    event_id: str
    outcome: Outcome


# ---------------------------------------------------------------------------------------------
# Stripe.
# ---------------------------------------------------------------------------------------------

StripeId = Annotated[str, StringConstraints(min_length=3, max_length=255, pattern=r"^[A-Za-z0-9_]+$")]


class EventData(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    object: dict[str, Any]


class StripeEvent(BaseModel):
    """A snapshot event's envelope (``object: "event"``); thin v2 notifications are not accepted."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Annotated[StripeId, StringConstraints(pattern=r"^evt_[A-Za-z0-9_]+$")]
    object: Literal["event"]
    type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    created: Annotated[int, Field(ge=0)]
    livemode: bool = False
    data: EventData

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)


def object_id(value: Any) -> str | None:
    """An expandable field: the id string, or the expanded object's id."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


_STRIPE_ID = re.compile(r"^[A-Za-z0-9_]{3,255}$")
_OBJECT_TYPE = re.compile(r"^[a-z][a-z0-9_.]{0,99}$")


def _id_with_prefix(value: str | None, prefix: str) -> str | None:
    return value if value and value.startswith(prefix) and _STRIPE_ID.match(value) else None


@dataclass(frozen=True, slots=True)
class LedgerIds:
    """What the ledger keeps of an event's object: its type and ids, never its contents.

    ``charge.succeeded`` and its kin carry the card's brand, last four digits, expiry, fingerprint
    and the billing details; none of that is read here, and only values shaped like Stripe ids
    are kept."""

    object_type: str | None
    object_id: str | None
    customer_id: str | None
    subscription_id: str | None

    @classmethod
    def of(cls, event: StripeEvent) -> LedgerIds:
        obj = event.data.object
        kind = obj.get("object")
        own_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        subscription = (own_id if kind == "subscription" else None) or invoice_subscription_id(obj)
        return cls(
            object_type=kind if isinstance(kind, str) and _OBJECT_TYPE.match(kind) else None,
            object_id=own_id if own_id and _STRIPE_ID.match(own_id) else None,
            customer_id=_id_with_prefix(object_id(obj.get("customer")), "cus_"),
            subscription_id=_id_with_prefix(subscription, "sub_"),
        )


def org_id_hint(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    found = object_id(invoice.get("subscription"))
    if found:
        return found
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    return object_id(details.get("subscription")) if isinstance(details, Mapping) else None


class SubscriptionState(BaseModel):
    """What the webhook takes from a subscription: Stripe's current state, not the event's snapshot."""

    model_config = ConfigDict(frozen=True)

    id: str
    customer_id: str
    status: str
    lookup_key: str | None
    price_id: str | None
    current_period_end: datetime | None
    org_id_hint: uuid.UUID | None

    @property
    def entitling(self) -> bool:
        return entitles(self.status)

    @property
    def plan(self) -> Plan | None:
        """The paid plan this subscription's price stands for (None: not one of our prices)."""
        return plan_for_lookup_key(self.lookup_key)

    @classmethod
    def from_stripe(cls, subscription: Mapping[str, Any]) -> SubscriptionState:
        items = (subscription.get("items") or {}).get("data") or []
        first: Mapping[str, Any] = items[0] if items else {}
        price: Mapping[str, Any] = first.get("price") or {}
        period_end = subscription.get("current_period_end") or first.get("current_period_end")
        metadata: Mapping[str, Any] = subscription.get("metadata") or {}
        return cls(
            id=str(subscription["id"]),
            customer_id=object_id(subscription.get("customer")) or "",
            status=str(subscription.get("status") or ""),
            lookup_key=price.get("lookup_key"),
            price_id=price.get("id"),
            current_period_end=datetime.fromtimestamp(int(period_end), UTC) if period_end else None,
            org_id_hint=org_id_hint(metadata.get("org_id")),
        )

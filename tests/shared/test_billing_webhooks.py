"""The webhook's pieces below HTTP: what an event is about (ids only, across Stripe API versions),
the subscription state read back from Stripe, and the ordering watermark in the database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.billing.schemas import StripeEvent, SubscriptionState
from shared.billing.webhooks import Target, apply_subscription, plan_after, target_of
from shared.db.session import as_service
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_org
from tests.fakes.stripe_api import event, subscription

ORG = uuid.uuid4()


def parsed(event_type: str, obj: dict[str, Any]) -> StripeEvent:
    return StripeEvent.model_validate_json(event(event_type, obj))


# A subscription as API version 2020-03-02 delivered it: the period on the subscription, a legacy
# ``plan`` beside the price, a price without a lookup key.
SUBSCRIPTION_2020 = {
    "id": "sub_JdIzvfy6o5GZRd",
    "object": "subscription",
    "current_period_end": 1625740918,
    "customer": "cus_IhGfebO16cMIGN",
    "items": {
        "object": "list",
        "data": [
            {
                "id": "si_JdIzi4Tn5jV9PD",
                "object": "subscription_item",
                "plan": {"id": "price_1IDQm5JDPojXS6LNM31hxKzp", "object": "plan"},
                "price": {"id": "price_1IDQm5JDPojXS6LNM31hxKzp", "object": "price", "lookup_key": None},
                "quantity": 1,
            }
        ],
    },
    "metadata": {"organization_id": "35"},
    "status": "active",
}


class TestTargets:
    def test_subscription_events_name_the_subscription_its_customer_and_our_metadata(self) -> None:
        sub = subscription(customer="cus_1", org_id=ORG)
        for kind in ("created", "updated", "deleted", "paused", "resumed"):
            assert target_of(parsed(f"customer.subscription.{kind}", sub)) == Target(sub["id"], "cus_1", ORG)

    def test_an_expanded_customer_is_read_by_its_id(self) -> None:
        sub = {**subscription(customer="cus_1"), "customer": {"id": "cus_1", "object": "customer"}}
        target = target_of(parsed("customer.subscription.updated", sub))
        assert target is not None
        assert target.customer_id == "cus_1"

    @pytest.mark.parametrize(
        "invoice",
        [
            {"id": "in_1", "object": "invoice", "customer": "cus_1", "subscription": "sub_1"},
            {
                "id": "in_1",
                "object": "invoice",
                "customer": "cus_1",
                "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}},
            },
        ],
        ids=["before 2025-03-31", "current"],
    )
    def test_invoices_in_either_layout(self, invoice: dict[str, Any]) -> None:
        for kind in ("invoice.paid", "invoice.payment_failed"):
            assert target_of(parsed(kind, invoice)) == Target("sub_1", "cus_1", None)

    def test_an_invoice_without_a_subscription(self) -> None:
        target = target_of(parsed("invoice.paid", {"id": "in_1", "object": "invoice", "customer": "cus_1"}))
        assert target == Target(None, "cus_1", None)

    def test_checkout_in_subscription_mode_names_our_organization(self) -> None:
        session = {
            "id": "cs_1",
            "object": "checkout.session",
            "mode": "subscription",
            "customer": "cus_1",
            "subscription": "sub_1",
            "client_reference_id": str(ORG),
        }
        assert target_of(parsed("checkout.session.completed", session)) == Target("sub_1", "cus_1", ORG)

    def test_checkout_in_payment_mode_has_no_subscription(self) -> None:
        session: dict[str, Any] = {
            "id": "cs_1",
            "object": "checkout.session",
            "mode": "payment",
            "customer": "cus_1",
            "client_reference_id": None,
            "subscription": None,
            "metadata": {},
        }
        assert target_of(parsed("checkout.session.completed", session)) == Target(None, "cus_1", None)

    def test_a_reference_that_is_not_an_organization_id_is_no_hint(self) -> None:
        session = {
            "id": "cs_1",
            "object": "checkout.session",
            "mode": "subscription",
            "subscription": "sub_1",
            "client_reference_id": "cart-42",
            "metadata": {"org_id": "'; drop table x"},
        }
        target = target_of(parsed("checkout.session.completed", session))
        assert target is not None
        assert target.org_hint is None

    @pytest.mark.parametrize("event_type", ["customer.created", "charge.succeeded", "invoice.finalized"])
    def test_other_types_are_not_acted_on(self, event_type: str) -> None:
        assert target_of(parsed(event_type, {"id": "x_1"})) is None


class TestSubscriptionState:
    def test_current_api_layout(self) -> None:
        state = SubscriptionState.from_stripe(
            subscription(
                customer="cus_1", lookup_key="hiredhands_starter_monthly", org_id=ORG, period_end=1_900_000_000
            )
        )
        assert (state.customer_id, state.status, state.lookup_key, state.org_id_hint) == (
            "cus_1",
            "active",
            "hiredhands_starter_monthly",
            ORG,
        )
        assert state.current_period_end == datetime.fromtimestamp(1_900_000_000, UTC)
        assert state.plan is not None
        assert state.plan.name == "starter"

    def test_2020_api_layout(self) -> None:
        state = SubscriptionState.from_stripe(SUBSCRIPTION_2020)
        assert state.id == "sub_JdIzvfy6o5GZRd"
        assert state.customer_id == "cus_IhGfebO16cMIGN"
        assert state.current_period_end == datetime.fromtimestamp(1625740918, UTC)
        assert state.plan is None  # not one of our prices
        assert state.org_id_hint is None  # someone else's metadata key
        assert plan_after(state) is None  # so the plan is kept

    @pytest.mark.parametrize(("status", "plan"), [("canceled", "free"), ("unpaid", "free"), ("trialing", "pro")])
    def test_plan_after(self, status: str, plan: str) -> None:
        chosen = plan_after(SubscriptionState.from_stripe(subscription(customer="cus_1", status=status)))
        assert chosen is not None
        assert chosen.name == plan


class TestWatermark:
    async def apply(self, db: Connection, org_id: uuid.UUID, sub: dict[str, Any], observed_at: datetime) -> str:
        async with as_service(TransactionDatabase(db)) as conn:
            return await apply_subscription(
                conn,
                org_id,
                SubscriptionState.from_stripe(sub),
                observed_at,
                event=parsed("customer.subscription.updated", sub),
                request_id=None,
            )

    async def plan(self, db: Connection, org_id: uuid.UUID) -> str:
        await db.execute("reset role")
        row = await (
            await db.execute("select plan from public.organization_limits where org_id = %s", (org_id,))
        ).fetchone()
        assert row is not None
        return str(row["plan"])

    async def test_an_older_observation_never_overwrites_a_newer_one(self, db: Connection) -> None:
        org = await create_org(db)
        t = datetime.now(UTC)
        starter = subscription(customer="cus_w1", lookup_key="hiredhands_starter_monthly")
        pro = {**starter, "items": subscription(customer="cus_w1")["items"]}

        assert await self.apply(db, org["id"], pro, t) == "applied"
        assert await self.apply(db, org["id"], starter, t - timedelta(milliseconds=1)) == "stale"
        assert await self.apply(db, org["id"], starter, t) == "stale"  # the same instant is not newer
        assert await self.plan(db, org["id"]) == "pro"

        assert await self.apply(db, org["id"], starter, t + timedelta(seconds=1)) == "applied"
        assert await self.plan(db, org["id"]) == "starter"

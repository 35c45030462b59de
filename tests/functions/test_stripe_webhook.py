"""POST /api/stripe/webhook through the deployed function, against the real database.

Stripe's API is the respx fake of tests/fakes/stripe_api.py at the network edge (stripe-python's own
HTTPX client calls it); deliveries are signed offline with stripe-python's signing code. Tests that
race deliveries use the real pool and committed rows of fresh tenants; the rest run in one
rolled-back transaction.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from functions.webhook.stripe_webhook import app
from shared.billing.plans import FREE, PRO, STARTER
from shared.billing.signature import TOLERANCE_SECONDS
from shared.billing.stripe_client import close_stripe_clients
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_org
from tests.fakes.stripe_api import (
    API_BASE,
    OLD_WEBHOOK_SECRET,
    SECRET_KEY,
    WEBHOOK_SECRET,
    FakeStripe,
    event,
    fake_stripe,
    sign,
    stripe_id,
    subscription,
    wait_until,
)

PATH = "/api/stripe/webhook"

# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def stripe_env(monkeypatch: pytest.MonkeyPatch, worker_db: str) -> AsyncIterator[pytest.MonkeyPatch]:
    monkeypatch.setenv("STRIPE_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}")
    monkeypatch.setenv("STRIPE_API_BASE", API_BASE)
    get_settings.cache_clear()
    yield monkeypatch
    await close_stripe_clients()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def stripe_api(stripe_env: pytest.MonkeyPatch) -> Iterator[FakeStripe]:
    with fake_stripe() as fake:
        yield fake


@pytest.fixture
async def client(db: Connection, stripe_api: FakeStripe, log_lines: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
    app.dependency_overrides.clear()
    for line in log_lines:
        for secret in (WEBHOOK_SECRET, OLD_WEBHOOK_SECRET, SECRET_KEY):
            assert secret not in line, "a log line carries a Stripe secret"


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    """An organization whose Stripe customer was created at checkout (as start_checkout stores it)."""
    org = await create_org(db)
    org["customer"] = stripe_id("cus")
    await db.execute(
        "insert into public.billing_accounts (org_id, stripe_customer_id) values (%s, %s)", (org["id"], org["customer"])
    )
    return org


async def deliver(client: httpx.AsyncClient, body: str, **sign_args: Any) -> httpx.Response:
    return await client.post(PATH, content=body.encode(), headers=sign(body, **sign_args))


async def one(db: Connection, query: str, *params: Any) -> Any:
    await db.execute("reset role")
    row = await (await db.execute(query, params)).fetchone()
    return None if row is None else (next(iter(row.values())) if len(row) == 1 else dict(row))


async def state(db: Connection, org_id: uuid.UUID) -> dict[str, Any]:
    row = await one(
        db,
        "select a.stripe_customer_id, a.stripe_subscription_id, a.subscription_status, a.plan,"
        " l.plan as limits_plan, l.monthly_budget_microusd, l.burst_per_minute, l.widget_rpm_per_agent,"
        " l.widget_rpm_per_visitor, l.max_scan_pages,"
        " (select count(*) from public.audit_log as g where g.org_id = a.org_id"
        "   and g.action = 'billing.plan_changed') as plan_changes"
        " from public.billing_accounts as a join public.organization_limits as l using (org_id)"
        " where a.org_id = %s",
        org_id,
    )
    assert row is not None, "the organization has no billing account"
    return dict(row)


def limits_of(plan: Any) -> dict[str, Any]:
    return {
        "limits_plan": plan.name,
        "monthly_budget_microusd": plan.monthly_budget_microusd,
        "burst_per_minute": plan.burst_per_minute,
        "widget_rpm_per_agent": plan.widget_rpm_per_agent,
        "widget_rpm_per_visitor": plan.widget_rpm_per_visitor,
        "max_scan_pages": plan.max_scan_pages,
    }


async def ledger(db: Connection, event_id: str) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cur = await db.execute(
        "select id, type, org_id, outcome, processed_at is not null as processed from public.stripe_events"
        " where id = %s",
        (event_id,),
    )
    return [dict(r) for r in await cur.fetchall()]


def event_id_of(body: str) -> str:
    return str(httpx.Response(200, content=body).json()["id"])


# -- signatures -----------------------------------------------------------------------------------


class TestSignature:
    async def test_a_verified_event_is_acknowledged(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        response = await deliver(client, event("customer.subscription.created", sub))
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "applied"

    @pytest.mark.parametrize(
        ("case", "slug"),
        [
            ("tampered body", "stripe-signature-invalid"),
            ("wrong secret", "stripe-signature-invalid"),
            ("stale timestamp", "stripe-timestamp-outside-tolerance"),
            ("future timestamp", "stripe-timestamp-outside-tolerance"),
            ("missing header", "stripe-signature-missing"),
            ("not an event", "stripe-event-malformed"),
        ],
    )
    async def test_refused_with_a_400_problem_and_nothing_written(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        stripe_api: FakeStripe,
        case: str,
        slug: str,
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        body = event("customer.subscription.created", sub)
        headers = sign(body)
        content = body
        if case == "tampered body":
            content = body.replace('"active"', '"trialing"')
        elif case == "wrong secret":
            headers = sign(body, secret="whsec_not_ours_0123456789")
        elif case == "stale timestamp":
            headers = sign(body, timestamp=int(time.time()) - TOLERANCE_SECONDS - 10)
        elif case == "future timestamp":
            headers = sign(body, timestamp=int(time.time()) + TOLERANCE_SECONDS + 60)
        elif case == "missing header":
            headers = {"Content-Type": "application/json"}
        elif case == "not an event":
            content = '{"hello": "world"}'
            headers = sign(content)

        response = await client.post(PATH, content=content.encode(), headers=headers)

        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/" + slug)
        assert await ledger(db, event_id_of(body)) == [], "a refused delivery reached the ledger"
        assert await one(db, "select count(*) from public.stripe_events where org_id = %s", org["id"]) == 0
        assert stripe_api.requests == [], "a refused delivery made a Stripe call"
        assert (await state(db, org["id"]))["subscription_status"] is None

    async def test_several_v1_signatures_one_of_them_ours(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        body = event("customer.subscription.created", sub)
        now = int(time.time())
        foreign = sign(body, secret="whsec_some_other_endpoint", timestamp=now)["Stripe-Signature"].split(",")[1]
        ours = sign(body, timestamp=now)["Stripe-Signature"].split(",")[1]
        headers = {"Stripe-Signature": f"t={now},{foreign},{ours}", "Content-Type": "application/json"}
        response = await client.post(PATH, content=body.encode(), headers=headers)
        assert response.status_code == 200, response.text

    async def test_rotated_secret_old_and_new_both_verify_during_the_roll(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        old = await deliver(client, event("customer.subscription.created", sub), secret=OLD_WEBHOOK_SECRET)
        new = await deliver(client, event("customer.subscription.updated", sub), secret=WEBHOOK_SECRET)
        assert (old.status_code, new.status_code) == (200, 200)

    async def test_no_secret_configured_refuses_everything(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        stripe_api: FakeStripe,
        stripe_env: pytest.MonkeyPatch,
    ) -> None:
        stripe_env.setenv("STRIPE_WEBHOOK_SECRETS", "")
        get_settings.cache_clear()
        body = event("customer.subscription.created", subscription(customer=org["customer"]))
        response = await deliver(client, body)
        assert response.status_code == 400
        assert response.json()["type"].endswith("/stripe-webhook-secret-unset")
        assert await ledger(db, event_id_of(body)) == []

    async def test_the_raw_body_is_verified_not_a_reserialization(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        # Odd spacing and key order, as a JSON re-encoder would never write it.
        body = event("customer.subscription.created", sub).replace('", "', '",   "').replace("{", "{ ")
        response = await deliver(client, body)
        assert response.status_code == 200, response.text


# -- effects --------------------------------------------------------------------------------------


class TestEffects:
    async def test_a_new_subscription_sets_plan_budget_and_limits_and_audits_once(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"], lookup_key="hiredhands_pro_monthly"))
        body = event("customer.subscription.created", sub)
        response = await deliver(client, body)

        assert response.json() == {"received": True, "event_id": event_id_of(body), "outcome": "applied"}
        now = await state(db, org["id"])
        assert now["stripe_subscription_id"] == sub["id"]
        assert now["subscription_status"] == "active"
        assert now["plan"] == "pro"
        assert {k: now[k] for k in limits_of(PRO)} == limits_of(PRO)
        assert now["plan_changes"] == 1
        audit = await one(
            db,
            # Membership changes (the owner joining at creation) are audited too; this is about billing.
            "select actor, target_id, details, request_id from public.audit_log where org_id = %s"
            " and action like 'billing.%%'",
            org["id"],
        )
        assert audit["actor"] == "stripe-webhook"
        assert audit["target_id"] == sub["id"]
        assert audit["details"]["from"] == "free"
        assert audit["details"]["to"] == "pro"
        assert audit["details"]["stripe_event_id"] == event_id_of(body)
        assert audit["request_id"] == response.headers["x-request-id"]
        assert await ledger(db, event_id_of(body)) == [
            {
                "id": event_id_of(body),
                "type": "customer.subscription.created",
                "org_id": org["id"],
                "outcome": "applied",
                "processed": True,
            }
        ]

    async def test_the_period_end_comes_from_the_subscription_item(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"], period_end=1_900_000_000))
        await deliver(client, event("customer.subscription.created", sub))
        end = await one(
            db,
            "select extract(epoch from current_period_end)::bigint from public.billing_accounts where org_id = %s",
            org["id"],
        )
        assert end == 1_900_000_000

    async def test_cancellation_returns_the_organization_to_free(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        await deliver(client, event("customer.subscription.created", sub))
        stripe_api.put({**sub, "status": "canceled"})
        await deliver(client, event("customer.subscription.deleted", {**sub, "status": "canceled"}))

        now = await state(db, org["id"])
        assert (now["subscription_status"], now["plan"]) == ("canceled", "free")
        assert {k: now[k] for k in limits_of(FREE)} == limits_of(FREE)
        assert now["plan_changes"] == 2

    async def test_a_failed_payment_keeps_the_plan_while_stripe_retries_then_paid_again(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"], lookup_key="hiredhands_starter_monthly"))
        await deliver(client, event("customer.subscription.created", sub))
        stripe_api.put({**sub, "status": "past_due"})
        # Current API versions name the subscription under invoice.parent.
        invoice = {
            "id": stripe_id("in"),
            "object": "invoice",
            "customer": org["customer"],
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub["id"]}},
        }
        await deliver(client, event("invoice.payment_failed", invoice))
        assert (await state(db, org["id"]))["subscription_status"] == "past_due"
        assert (await state(db, org["id"]))["limits_plan"] == "starter"

        stripe_api.put(sub)
        # Older API versions name it at invoice.subscription.
        await deliver(client, event("invoice.paid", {**invoice, "id": stripe_id("in"), "subscription": sub["id"]}))
        now = await state(db, org["id"])
        assert (now["subscription_status"], now["limits_plan"], now["plan_changes"]) == ("active", "starter", 1)

    async def test_unpaid_in_the_end_means_free(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        await deliver(client, event("customer.subscription.created", sub))
        stripe_api.put({**sub, "status": "unpaid"})
        await deliver(client, event("customer.subscription.updated", sub))
        assert (await state(db, org["id"]))["limits_plan"] == "free"

    async def test_checkout_completed_links_a_customer_we_had_not_stored(
        self, client: httpx.AsyncClient, db: Connection, stripe_api: FakeStripe
    ) -> None:
        fresh = await create_org(db)
        customer = stripe_id("cus")
        sub = stripe_api.put(subscription(customer=customer, lookup_key="hiredhands_starter_monthly"))
        session = {
            "id": stripe_id("cs_test"),
            "object": "checkout.session",
            "mode": "subscription",
            "customer": customer,
            "subscription": sub["id"],
            "client_reference_id": str(fresh["id"]),
            "metadata": {"org_id": str(fresh["id"])},
        }
        response = await deliver(client, event("checkout.session.completed", session))
        assert response.json()["outcome"] == "applied"
        now = await state(db, fresh["id"])
        assert (now["stripe_customer_id"], now["limits_plan"]) == (customer, "starter")

    async def test_a_payment_mode_checkout_is_recorded_without_effect(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        session = {
            "id": stripe_id("cs_test"),
            "object": "checkout.session",
            "mode": "payment",
            "customer": org["customer"],
            "client_reference_id": str(org["id"]),
        }
        response = await deliver(client, event("checkout.session.completed", session))
        assert response.json()["outcome"] == "no-subscription"
        assert stripe_api.requests == []

    async def test_a_completed_checkout_is_no_longer_the_organizations_open_one(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        session_id = stripe_id("cs_test")
        await db.execute(
            "update public.billing_accounts set checkout_attempt = 1, checkout_plan = 'pro',"
            " checkout_expires_at = now() + interval '1 hour', checkout_claimed_at = now(),"
            " checkout_session_id = %s, checkout_url = 'https://checkout.stripe.test/c/pay/x' where org_id = %s",
            (session_id, org["id"]),
        )
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": "subscription",
            "customer": org["customer"],
            "subscription": sub["id"],
            "client_reference_id": str(org["id"]),
        }
        assert (await deliver(client, event("checkout.session.completed", session))).json()["outcome"] == "applied"
        row = await one(
            db,
            "select checkout_session_id, checkout_plan, checkout_attempt from public.billing_accounts"
            " where org_id = %s",
            org["id"],
        )
        assert row == {"checkout_session_id": None, "checkout_plan": None, "checkout_attempt": 1}

    async def test_a_price_that_is_not_ours_records_the_status_and_keeps_the_plan(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"], lookup_key=None))
        response = await deliver(client, event("customer.subscription.created", sub))
        assert response.json()["outcome"] == "applied"
        now = await state(db, org["id"])
        assert (now["subscription_status"], now["limits_plan"], now["plan_changes"]) == ("active", "free", 0)


class TestUnknownAndUnmatched:
    @pytest.mark.parametrize("event_type", ["customer.created", "payment_intent.succeeded", "v1.billing.meter.x"])
    async def test_unknown_types_are_acknowledged_and_recorded(
        self, client: httpx.AsyncClient, db: Connection, stripe_api: FakeStripe, event_type: str
    ) -> None:
        body = event(event_type, {"id": stripe_id("obj"), "object": "thing"})
        response = await deliver(client, body)
        assert response.status_code == 200
        assert response.json()["outcome"] == "ignored-event-type"
        assert [r["outcome"] for r in await ledger(db, event_id_of(body))] == ["ignored-event-type"]
        assert stripe_api.requests == []

    async def test_a_customer_we_do_not_know_is_recorded_without_an_organization(
        self, client: httpx.AsyncClient, db: Connection, stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=stripe_id("cus")))
        body = event("customer.subscription.updated", sub)
        response = await deliver(client, body)
        assert response.json()["outcome"] == "org-unresolved"
        assert [(r["org_id"], r["outcome"]) for r in await ledger(db, event_id_of(body))] == [(None, "org-unresolved")]

    async def test_an_org_id_in_metadata_that_is_not_an_organization_resolves_nothing(
        self, client: httpx.AsyncClient, stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=stripe_id("cus"), org_id=uuid.uuid4()))
        response = await deliver(client, event("customer.subscription.updated", sub))
        assert response.json()["outcome"] == "org-unresolved"

    async def test_a_subscription_stripe_no_longer_has(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        gone = subscription(customer=org["customer"])  # never put: Stripe answers 404
        response = await deliver(client, event("customer.subscription.updated", gone))
        assert response.json()["outcome"] == "subscription-gone"
        assert (await state(db, org["id"]))["subscription_status"] is None

    async def test_a_deleted_subscription_stripe_no_longer_has_still_ends_the_plan(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        await deliver(client, event("customer.subscription.created", sub))
        del stripe_api.subscriptions[sub["id"]]
        await deliver(client, event("customer.subscription.deleted", {**sub, "status": "canceled"}))
        assert (await state(db, org["id"]))["limits_plan"] == "free"

    async def test_another_customers_subscription_never_lands_on_this_organization(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        # The metadata names our organization, but the customer is not the one we stored for it.
        sub = stripe_api.put(subscription(customer=stripe_id("cus"), org_id=org["id"]))
        response = await deliver(client, event("customer.subscription.created", sub))
        assert response.json()["outcome"] == "customer-mismatch"
        assert (await state(db, org["id"]))["limits_plan"] == "free"

    async def test_an_old_subscription_ending_does_not_end_the_current_one(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        old = stripe_api.put(subscription(customer=org["customer"], status="canceled"))
        current = stripe_api.put(subscription(customer=org["customer"]))
        await deliver(client, event("customer.subscription.created", current))
        response = await deliver(client, event("customer.subscription.deleted", old))
        assert response.json()["outcome"] == "other-subscription-active"
        now = await state(db, org["id"])
        assert (now["stripe_subscription_id"], now["limits_plan"]) == (current["id"], "pro")


# -- exactly once ---------------------------------------------------------------------------------


class TestExactlyOnce:
    async def test_fifty_sequential_deliveries_apply_once(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        body = event("customer.subscription.created", sub)

        outcomes = [(await deliver(client, body)).json()["outcome"] for _ in range(50)]

        assert outcomes == ["applied"] + ["duplicate"] * 49
        assert len(await ledger(db, event_id_of(body))) == 1
        assert (await state(db, org["id"]))["plan_changes"] == 1
        assert len(stripe_api.calls("GET", "/v1/subscriptions/")) == 1, "a duplicate called Stripe"

    @pytest.mark.usefixtures("committed_db")
    async def test_fifty_concurrent_deliveries_apply_once(
        self, admin_url: str, stripe_api: FakeStripe, stripe_env: pytest.MonkeyPatch
    ) -> None:
        stripe_env.setenv("DB_POOL_MAX_SIZE", "20")
        stripe_env.setenv("DB_CONNECT_TIMEOUT_SECONDS", "15")
        get_settings.cache_clear()
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            customer = stripe_id("cus")
            await admin.execute(
                "insert into public.billing_accounts (org_id, stripe_customer_id) values (%s, %s)",
                (org["id"], customer),
            )
            sub = stripe_api.put(subscription(customer=customer))
            body = event("customer.subscription.created", sub)
            started = 0

            async def hold_until_all_arrived(sub_id: str) -> dict[str, Any] | None:
                # Every delivery passes the duplicate fast path before any of them commits.
                nonlocal started
                started += 1
                await wait_until(lambda: started == 50)
                return stripe_api.subscriptions[sub_id]

            stripe_api.on_retrieve = hold_until_all_arrived
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                responses = await asyncio.gather(*(deliver(c, body) for _ in range(50)))

            assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200]
            outcomes = sorted(r.json()["outcome"] for r in responses)
            assert outcomes == ["applied"] + ["duplicate"] * 49
            assert await one(admin, "select count(*) from public.stripe_events where id = %s", event_id_of(body)) == 1
            assert (
                await one(
                    admin,
                    "select count(*) from public.audit_log where org_id = %s and action = 'billing.plan_changed'",
                    org["id"],
                )
                == 1
            )
            assert (
                await one(
                    admin, "select monthly_budget_microusd from public.organization_limits where org_id = %s", org["id"]
                )
                == PRO.monthly_budget_microusd
            )
            await admin.execute("delete from public.organizations where id = %s", (org["id"],))


# -- ordering -------------------------------------------------------------------------------------


class TestOrdering:
    async def test_updated_delivered_before_created_ends_in_the_current_state(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        now = int(time.time())
        current = stripe_api.put(subscription(customer=org["customer"], status="active"))
        created = event("customer.subscription.created", {**current, "status": "incomplete"}, created=now)
        updated = event("customer.subscription.updated", current, created=now)  # same second, as often happens

        await deliver(client, updated)
        await deliver(client, created)

        after = await state(db, org["id"])
        assert (after["subscription_status"], after["limits_plan"], after["plan_changes"]) == ("active", "pro", 1)

    async def test_an_old_update_after_a_newer_one_changes_nothing(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        now = int(time.time())
        sub = subscription(customer=org["customer"], lookup_key="hiredhands_starter_monthly")
        upgraded = stripe_api.put({**sub, "items": subscription(customer=org["customer"])["items"]})
        older = event("customer.subscription.updated", sub, created=now - 60)  # says starter
        newer = event("customer.subscription.updated", upgraded, created=now)  # says pro

        await deliver(client, newer)
        await deliver(client, older)

        after = await state(db, org["id"])
        assert (after["limits_plan"], after["monthly_budget_microusd"]) == ("pro", PRO.monthly_budget_microusd)
        assert after["plan_changes"] == 1
        assert after["limits_plan"] != STARTER.name

    @pytest.mark.usefixtures("committed_db")
    async def test_a_slow_read_of_older_state_never_overwrites_a_later_read(
        self, admin_url: str, stripe_api: FakeStripe
    ) -> None:
        """A delivery whose Stripe read started first but finished last lands as stale."""
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            customer = stripe_id("cus")
            await admin.execute(
                "insert into public.billing_accounts (org_id, stripe_customer_id) values (%s, %s)",
                (org["id"], customer),
            )
            starter = subscription(customer=customer, lookup_key="hiredhands_starter_monthly")
            pro = {**starter, "items": subscription(customer=customer)["items"]}
            release = asyncio.Event()
            reads = 0

            async def answer(_: str) -> dict[str, Any]:
                nonlocal reads
                reads += 1
                if reads == 1:  # the first read sees starter, then stalls
                    await release.wait()
                    return starter
                return pro

            stripe_api.on_retrieve = answer
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                slow = asyncio.create_task(deliver(c, event("customer.subscription.updated", starter)))
                await wait_until(lambda: reads == 1)
                fast = await deliver(c, event("customer.subscription.updated", pro))
                release.set()
                slow_response = await slow

            assert fast.json()["outcome"] == "applied"
            assert slow_response.json()["outcome"] == "stale"
            assert await one(admin, "select plan from public.organization_limits where org_id = %s", org["id"]) == "pro"
            await admin.execute("delete from public.organizations where id = %s", (org["id"],))


# -- failures -------------------------------------------------------------------------------------


class TestFailures:
    async def test_stripe_unavailable_is_a_503_and_nothing_is_written_then_the_retry_applies(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        body = event("customer.subscription.created", sub)
        stripe_api.failing = 500

        response = await deliver(client, body)

        assert response.status_code == 503
        assert response.json()["type"].endswith("/billing-unavailable")
        assert await ledger(db, event_id_of(body)) == []
        stripe_api.failing = None
        assert (await deliver(client, body)).json()["outcome"] == "applied"

    async def test_a_failure_while_applying_is_a_5xx_with_no_partial_effect(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        # The database refuses the last write of the effect (the limits), after the ledger row and
        # the billing account were written in the same transaction.
        await db.execute("reset role")
        await db.execute(
            "create function pg_temp.refuse() returns trigger language plpgsql as"
            " $$ begin raise exception 'limits unavailable'; end $$"
        )
        await db.execute(
            "create trigger refuse before update or insert on public.organization_limits"
            " for each row execute function pg_temp.refuse()"
        )
        sub = stripe_api.put(subscription(customer=org["customer"]))
        body = event("customer.subscription.created", sub)

        response = await deliver(client, body)

        assert response.status_code == 500
        assert "limits unavailable" not in response.text
        assert await ledger(db, event_id_of(body)) == [], "the ledger kept an event whose effect failed"
        before = await state(db, org["id"])
        assert (before["subscription_status"], before["plan"], before["plan_changes"]) == (None, "free", 0)

        await db.execute("drop trigger refuse on public.organization_limits")
        assert (await deliver(client, body)).json()["outcome"] == "applied"
        assert (await state(db, org["id"]))["limits_plan"] == "pro"


# -- the ledger keeps ids, never payloads ---------------------------------------------------------

CARD_DETAILS = ("visa", "4242", "2031", "fp_Secret9Fingerprint", "Jane Payer", "jane@example.test", "Elm Street 12")


def charge_succeeded(customer: str) -> dict[str, Any]:
    """A charge as Stripe sends it: the card's brand, last four, expiry, fingerprint, billing details."""
    return {
        "id": stripe_id("ch"),
        "object": "charge",
        "customer": customer,
        "amount": 2500,
        "billing_details": {
            "name": "Jane Payer",
            "email": "jane@example.test",
            "address": {"line1": "Elm Street 12", "postal_code": "90210"},
        },
        "payment_method_details": {
            "type": "card",
            "card": {
                "brand": "visa",
                "last4": "4242",
                "exp_month": 12,
                "exp_year": 2031,
                "fingerprint": "fp_Secret9Fingerprint",
            },
        },
    }


async def ledger_row_text(db: Connection, event_id: str) -> str:
    """The whole stored row, every column, as text."""
    await db.execute("reset role")
    row = await (
        await db.execute("select to_jsonb(e)::text as row from public.stripe_events as e where e.id = %s", (event_id,))
    ).fetchone()
    assert row is not None, "the event was not recorded"
    return str(row["row"])


class TestTheLedgerKeepsOnlyIds:
    async def test_a_charge_is_recorded_with_its_ids_and_none_of_its_card_details(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any]
    ) -> None:
        charge = charge_succeeded(org["customer"])
        body = event("charge.succeeded", charge)
        response = await deliver(client, body)

        assert response.json()["outcome"] == "ignored-event-type"
        stored = await one(
            db,
            "select type, object_type, object_id, customer_id, subscription_id, outcome from public.stripe_events"
            " where id = %s",
            event_id_of(body),
        )
        assert stored == {
            "type": "charge.succeeded",
            "object_type": "charge",
            "object_id": charge["id"],
            "customer_id": org["customer"],
            "subscription_id": None,
            "outcome": "ignored-event-type",
        }
        text = await ledger_row_text(db, event_id_of(body))
        for detail in CARD_DETAILS:
            assert detail not in text.replace(charge["id"], "").replace(event_id_of(body), ""), detail

    async def test_an_invoice_keeps_its_subscription_and_customer(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        sub = stripe_api.put(subscription(customer=org["customer"]))
        invoice = {
            "id": stripe_id("in"),
            "object": "invoice",
            "customer": org["customer"],
            "customer_email": "jane@example.test",
            "parent": {"subscription_details": {"subscription": sub["id"]}},
        }
        body = event("invoice.paid", invoice)
        assert (await deliver(client, body)).json()["outcome"] == "applied"
        stored = await one(
            db,
            "select object_type, object_id, customer_id, subscription_id from public.stripe_events where id = %s",
            event_id_of(body),
        )
        assert stored == {
            "object_type": "invoice",
            "object_id": invoice["id"],
            "customer_id": org["customer"],
            "subscription_id": sub["id"],
        }
        assert "jane@example.test" not in await ledger_row_text(db, event_id_of(body))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        event_type=st.from_regex(r"\A[a-z]{3,12}\.[a-z_]{3,20}\Z"),
        contents=st.dictionaries(
            st.text(min_size=1, max_size=12),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                max_leaves=12,
            ),
            max_size=6,
        ),
        id_field=st.sampled_from(["customer", "subscription", "id", "object"]),
    )
    async def test_no_part_of_any_events_contents_is_stored(
        self, client: httpx.AsyncClient, db: Connection, event_type: str, contents: dict[str, Any], id_field: str
    ) -> None:
        """Whatever an event carries, and even a secret put where an id belongs, stays out of the row."""
        marker = "Zq" + uuid.uuid4().hex[:12] + "Private"
        obj = {**contents, "id": stripe_id("obj"), "object": "thing", "private": marker}
        obj[id_field] = {"id": marker, "name": marker} if id_field != "object" else marker + " type"
        body = event(event_type, obj)
        response = await deliver(client, body)

        assert response.status_code == 200, response.text
        text = await ledger_row_text(db, event_id_of(body))
        assert marker not in text
        await db.execute("delete from public.stripe_events where id = %s", (event_id_of(body),))

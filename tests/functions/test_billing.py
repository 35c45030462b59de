"""POST /api/billing/checkout and /api/billing/portal through the deployed function.

Real database (one rolled-back transaction per test), real tokens, Stripe's API replaced at the
network edge by the respx fake of tests/fakes/stripe_api.py. Every response and log line is checked
for the card numbers the tests send: none may come back out.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from functions.billing import app
from shared.billing import accounts
from shared.billing.stripe_client import close_stripe_clients
from shared.db.session import as_service
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import Connection, TransactionDatabase, without_generated_ids
from tests.factories import access_token, add_member, create_org
from tests.fakes.stripe_api import API_BASE, SECRET_KEY, FakeStripe, fake_stripe, form, stripe_id

DASHBOARD = "https://app.hiredhands.test"
PAN = "4242424242424242"
PAN_SPACED = "4242 4242 4242 4242"
SENT_CARD_DATA = (PAN, PAN_SPACED, "4242")


@pytest.fixture
async def stripe_env(monkeypatch: pytest.MonkeyPatch, worker_db: str) -> AsyncIterator[pytest.MonkeyPatch]:
    monkeypatch.setenv("STRIPE_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", API_BASE)
    monkeypatch.setenv("DASHBOARD_URL", DASHBOARD)
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
    bodies: list[str] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.text)

    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", event_hooks={"response": [keep]}) as c:
        yield c
    app.dependency_overrides.clear()
    for text in bodies + log_lines:
        for sent in SENT_CARD_DATA:
            assert sent not in without_generated_ids(text), "card data came back out in a response or a log line"
        assert SECRET_KEY not in text


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["outsider"] = (await create_org(db))["owner"]
    return org


def auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


async def checkout(client: httpx.AsyncClient, user: dict[str, Any], **body: Any) -> httpx.Response:
    return await client.post("/api/billing/checkout", json=body, headers=auth(user))


async def portal(client: httpx.AsyncClient, user: dict[str, Any], **body: Any) -> httpx.Response:
    return await client.post("/api/billing/portal", json=body, headers=auth(user))


async def stored_customer(db: Connection, org_id: uuid.UUID) -> str | None:
    await db.execute("reset role")
    row = await (
        await db.execute("select stripe_customer_id from public.billing_accounts where org_id = %s", (org_id,))
    ).fetchone()
    return None if row is None else row["stripe_customer_id"]


class TestCheckout:
    async def test_an_owner_gets_a_stripe_checkout_url(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")

        assert response.status_code == 200, response.text
        assert response.json()["url"].startswith("https://checkout.stripe.test/c/pay/cs_test_")
        [session] = stripe_api.session_creates()
        params = form(session)
        customer = await stored_customer(db, org["id"])
        assert params["mode"] == "subscription"
        assert params["customer"] == customer
        assert params["client_reference_id"] == str(org["id"])
        assert params["metadata[org_id]"] == str(org["id"])
        assert params["subscription_data[metadata][org_id]"] == str(org["id"])
        assert params["line_items[0][price]"] == "price_pro_live"
        assert params["line_items[0][quantity]"] == "1"
        assert params["success_url"] == f"{DASHBOARD}/settings/billing?checkout=success"
        assert params["cancel_url"] == f"{DASHBOARD}/settings/billing?checkout=cancelled"

    async def test_the_price_is_found_by_the_plans_lookup_key(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        await checkout(client, org["owner"], org_id=str(org["id"]), plan="starter")
        [lookup] = stripe_api.calls("GET", "/v1/prices")
        assert "hiredhands_starter_monthly" in str(lookup.url)
        assert form(stripe_api.session_creates()[0])["line_items[0][price]"] == "price_starter_live"

    async def test_the_customer_is_created_once_and_reused(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        first = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        second = await checkout(client, org["admin"], org_id=str(org["id"]), plan="starter")

        assert (first.status_code, second.status_code) == (200, 200)
        [created] = stripe_api.calls("POST", "/v1/customers")
        assert created.headers["idempotency-key"] == f"hiredhands-customer-{org['id']}"
        assert form(created)["metadata[org_id]"] == str(org["id"])
        customers = {form(r)["customer"] for r in stripe_api.session_creates()}
        assert customers == {await stored_customer(db, org["id"])}

    async def test_a_stored_customer_is_never_replaced(self, db: Connection, org: dict[str, Any]) -> None:
        async with as_service(TransactionDatabase(db)) as conn:
            first = await accounts.link_customer(conn, org["id"], "cus_first")
            second = await accounts.link_customer(conn, org["id"], "cus_second")
        assert (first, second) == ("cus_first", "cus_first")

    @pytest.mark.usefixtures("committed_db")
    async def test_two_racing_first_checkouts_share_one_customer(self, admin_url: str, stripe_api: FakeStripe) -> None:
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                responses = await asyncio.gather(
                    *(checkout(c, org["owner"], org_id=str(org["id"]), plan="pro") for _ in range(5))
                )
            assert [r.status_code for r in responses] == [200] * 5
            stored = await (
                await admin.execute(
                    "select stripe_customer_id from public.billing_accounts where org_id = %s", (org["id"],)
                )
            ).fetchone()
            sessions = {form(r)["customer"] for r in stripe_api.session_creates()}
            assert stored is not None
            assert sessions == {stored["stripe_customer_id"]}
            assert len(stripe_api.customers) == 1, "Stripe holds more than one customer for the organization"
            await admin.execute("delete from public.organizations where id = %s", (org["id"],))

    async def test_an_admin_may_check_out(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        assert (await checkout(client, org["admin"], org_id=str(org["id"]), plan="pro")).status_code == 200

    async def test_a_member_may_not(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        response = await checkout(client, org["member"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 403
        assert stripe_api.requests == []

    async def test_another_tenant_sees_a_404(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        response = await checkout(client, org["outsider"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 404
        assert stripe_api.requests == []

    async def test_no_token_is_a_401(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        response = await client.post("/api/billing/checkout", json={"org_id": str(org["id"]), "plan": "pro"})
        assert response.status_code == 401

    async def test_an_organization_that_already_pays_is_sent_to_the_portal(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        await db.execute("reset role")
        await db.execute(
            "insert into public.billing_accounts (org_id, stripe_customer_id, stripe_subscription_id,"
            " subscription_status) values (%s, 'cus_paying', 'sub_paying', 'active')",
            (org["id"],),
        )
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 409
        assert response.json()["type"].endswith("/already-subscribed")
        assert stripe_api.requests == []

    async def test_a_canceled_subscription_may_check_out_again_with_the_same_customer(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        stripe_api.customers["cus_returning"] = {"id": "cus_returning", "object": "customer"}
        await db.execute("reset role")
        await db.execute(
            "insert into public.billing_accounts (org_id, stripe_customer_id, stripe_subscription_id,"
            " subscription_status) values (%s, 'cus_returning', 'sub_old', 'canceled')",
            (org["id"],),
        )
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 200
        assert stripe_api.calls("POST", "/v1/customers") == []
        assert form(stripe_api.session_creates()[0])["customer"] == "cus_returning"

    async def test_stripe_down_is_a_503_and_no_customer_is_stored(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        stripe_api.failing = 500
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 503
        assert response.json()["type"].endswith("/billing-unavailable")
        assert await stored_customer(db, org["id"]) is None

    async def test_a_missing_price_is_a_503(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        stripe_api.prices.clear()
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 503
        assert stripe_api.session_creates() == []

    async def test_stripe_not_configured_is_a_503(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_env: pytest.MonkeyPatch
    ) -> None:
        stripe_env.setenv("STRIPE_SECRET_KEY", "")
        get_settings.cache_clear()
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert response.status_code == 503

    @pytest.mark.parametrize(
        "body",
        [
            {"plan": "pro"},
            {"org_id": "ORG", "plan": "free"},
            {"org_id": "ORG", "plan": "enterprise"},
            {"org_id": "ORG"},
            {"org_id": "ORG", "plan": "pro", "coupon": "HALFOFF"},
            {"org_id": "not-a-uuid", "plan": "pro"},
        ],
        ids=["no org", "free", "unknown plan", "no plan", "unknown field", "bad org id"],
    )
    async def test_invalid_bodies_are_422(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe, body: dict[str, Any]
    ) -> None:
        sent = {k: (str(org["id"]) if v == "ORG" else v) for k, v in body.items()}
        response = await checkout(client, org["owner"], **sent)
        assert response.status_code == 422
        assert response.json()["type"].endswith("/validation-error")
        assert stripe_api.requests == []


class TestPortal:
    async def test_an_owner_gets_the_portal_url_for_the_stored_customer(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        customer = stripe_id("cus")
        stripe_api.customers[customer] = {"id": customer, "object": "customer"}
        await db.execute("reset role")
        await db.execute(
            "insert into public.billing_accounts (org_id, stripe_customer_id) values (%s, %s)", (org["id"], customer)
        )
        response = await portal(client, org["admin"], org_id=str(org["id"]))

        assert response.status_code == 200, response.text
        assert response.json()["url"].startswith("https://billing.stripe.test/p/session/")
        [call] = stripe_api.calls("POST", "/v1/billing_portal/sessions")
        assert form(call) == {"customer": customer, "return_url": f"{DASHBOARD}/settings/billing"}

    async def test_no_customer_yet_is_a_409(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        response = await portal(client, org["owner"], org_id=str(org["id"]))
        assert response.status_code == 409
        assert response.json()["type"].endswith("/no-billing-account")
        assert stripe_api.requests == []

    @pytest.mark.parametrize("who", ["member", "outsider"])
    async def test_members_and_outsiders_may_not(
        self, client: httpx.AsyncClient, org: dict[str, Any], stripe_api: FakeStripe, who: str
    ) -> None:
        response = await portal(client, org[who], org_id=str(org["id"]))
        assert response.status_code == (403 if who == "member" else 404)
        assert stripe_api.requests == []


class TestCardDataIsNeverAccepted:
    @pytest.mark.parametrize("path", ["/api/billing/checkout", "/api/billing/portal"])
    @pytest.mark.parametrize(
        "extra",
        [
            {"card": {"number": PAN, "exp_month": 12, "exp_year": 2030, "cvc": "123"}},
            {"number": PAN},
            {"cvc": "123"},
            {"exp_month": 12},
            {"cardNumber": PAN_SPACED},
            {"payment": [{"details": {"Card-Number": "x"}}]},
            {"note": f"please charge {PAN_SPACED}"},
            {"amount": int(PAN)},
        ],
    )
    async def test_card_like_bodies_are_refused_with_a_422_that_says_so(
        self,
        client: httpx.AsyncClient,
        org: dict[str, Any],
        stripe_api: FakeStripe,
        path: str,
        extra: dict[str, Any],
    ) -> None:
        body = {"org_id": str(org["id"]), "plan": "pro", **extra}
        response = await client.post(path, json=body, headers=auth(org["owner"]))

        assert response.status_code == 422
        problem = response.json()
        assert problem["type"].endswith("/card-data-refused")
        assert "Card data is never accepted here" in problem["title"]
        assert stripe_api.requests == []

    async def test_a_pan_in_an_allowed_field_is_refused_too(
        self, client: httpx.AsyncClient, org: dict[str, Any]
    ) -> None:
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan=PAN_SPACED)
        assert response.json()["type"].endswith("/card-data-refused")

    async def test_card_data_is_refused_before_authentication(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/billing/checkout", json={"card": {"number": PAN}})
        assert response.status_code == 422
        assert response.json()["type"].endswith("/card-data-refused")

    async def test_a_body_that_is_not_json_with_a_pan_is_refused(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/billing/checkout", content=f"number={PAN}".encode(), headers={"Content-Type": "text/plain"}
        )
        assert response.status_code == 422
        assert response.json()["type"].endswith("/card-data-refused")

    async def test_a_luhn_invalid_number_is_just_an_unknown_field(
        self, client: httpx.AsyncClient, org: dict[str, Any]
    ) -> None:
        body = json.dumps({"org_id": str(org["id"]), "plan": "pro", "reference": "4242424242424241"})
        response = await client.post(
            "/api/billing/checkout",
            content=body,
            headers={**auth(org["owner"]), "Content-Type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["type"].endswith("/validation-error")
        assert "4242424242424241" not in response.text


class TestOneCustomerPerOrganization:
    async def test_a_customer_never_moves_between_organizations(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        # Each organization gets its own customer, even when one person owns both.
        second = await create_org(db, owner=org["owner"])
        await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        await checkout(client, org["owner"], org_id=str(second["id"]), plan="pro")
        first_customer = await stored_customer(db, org["id"])
        second_customer = await stored_customer(db, second["id"])
        assert first_customer
        assert second_customer
        assert first_customer != second_customer
        sessions = [form(r) for r in stripe_api.session_creates()]
        assert [(s["customer"], s["client_reference_id"]) for s in sessions] == [
            (first_customer, str(org["id"])),
            (second_customer, str(second["id"])),
        ]


async def checkout_row(db: Connection, org_id: uuid.UUID) -> dict[str, Any]:
    await db.execute("reset role")
    row = await (
        await db.execute(
            "select checkout_attempt, checkout_plan, checkout_session_id, checkout_url, checkout_claimed_at,"
            " checkout_expires_at from public.billing_accounts where org_id = %s",
            (org_id,),
        )
    ).fetchone()
    assert row is not None
    return dict(row)


class TestOneOpenCheckoutPerOrganization:
    async def test_a_second_start_for_the_same_plan_gets_the_same_session(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        first = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        second = await checkout(client, org["admin"], org_id=str(org["id"]), plan="pro")

        assert first.json()["url"] == second.json()["url"]
        [create] = stripe_api.session_creates()
        assert create.headers["idempotency-key"] == f"hiredhands-checkout-{org['id']}-1"
        row = await checkout_row(db, org["id"])
        assert (row["checkout_attempt"], row["checkout_plan"]) == (1, "pro")
        assert int(form(create)["expires_at"]) == int(row["checkout_expires_at"].timestamp())

    async def test_another_plan_expires_the_previous_session_first(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        first = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        second = await checkout(client, org["owner"], org_id=str(org["id"]), plan="starter")

        assert first.json()["url"] != second.json()["url"]
        assert [s["url"] for s in stripe_api.open_sessions()] == [second.json()["url"]]
        creates = stripe_api.session_creates()
        assert [c.headers["idempotency-key"] for c in creates] == [
            f"hiredhands-checkout-{org['id']}-1",
            f"hiredhands-checkout-{org['id']}-2",
        ]
        expire = stripe_api.calls("POST", "/v1/checkout/sessions/")
        assert len(expire) == 1
        assert expire[0].url.path.endswith("/expire")
        assert stripe_api.requests.index(expire[0]) < stripe_api.requests.index(creates[1])

    async def test_a_session_close_to_expiry_is_replaced(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        first = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        await db.execute(
            "update public.billing_accounts set checkout_expires_at = now() + interval '5 minutes' where org_id = %s",
            (org["id"],),
        )
        second = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert second.json()["url"] != first.json()["url"]
        assert [s["url"] for s in stripe_api.open_sessions()] == [second.json()["url"]]

    async def test_a_paid_previous_session_is_a_409_and_no_new_session(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        [session] = stripe_api.checkout_sessions.values()
        session["status"] = "complete"  # paid; the webhook has not arrived yet

        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="starter")
        assert response.status_code == 409
        assert response.json()["type"].endswith("/checkout-completed")
        assert len(stripe_api.session_creates()) == 1

    async def test_a_failed_create_releases_the_attempt_and_the_next_start_uses_a_new_key(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")  # creates the customer
        await db.execute(
            "update public.billing_accounts set checkout_plan = null, checkout_expires_at = null,"
            " checkout_session_id = null, checkout_url = null where org_id = %s",
            (org["id"],),
        )
        stripe_api.failing = 500
        failed = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert failed.status_code == 503
        assert failed.headers["retry-after"]
        row = await checkout_row(db, org["id"])
        assert (row["checkout_attempt"], row["checkout_plan"], row["checkout_claimed_at"]) == (2, None, None)

        stripe_api.failing = None
        retried = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        assert retried.status_code == 200
        # Stripe replays a saved 500 for the key it was given, so the retry must not reuse it.
        assert stripe_api.session_creates()[-1].headers["idempotency-key"] == f"hiredhands-checkout-{org['id']}-3"

    async def test_a_start_that_died_after_stripe_answered_is_taken_over_with_the_same_key(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        first = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        # As if that start had died between Stripe's answer and storing the session.
        await db.execute(
            "update public.billing_accounts set checkout_session_id = null, checkout_url = null,"
            " checkout_claimed_at = now() - interval '1 minute' where org_id = %s",
            (org["id"],),
        )
        second = await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")

        assert second.json()["url"] == first.json()["url"]
        keys = [c.headers["idempotency-key"] for c in stripe_api.session_creates()]
        assert keys == [f"hiredhands-checkout-{org['id']}-1"] * 2
        assert len(stripe_api.checkout_sessions) == 1, "Stripe holds a second session"

    async def test_a_start_for_another_plan_while_one_is_being_created_is_a_409(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], stripe_api: FakeStripe
    ) -> None:
        await checkout(client, org["owner"], org_id=str(org["id"]), plan="pro")
        await db.execute(
            "update public.billing_accounts set checkout_session_id = null, checkout_url = null,"
            " checkout_claimed_at = now() where org_id = %s",
            (org["id"],),
        )
        response = await checkout(client, org["owner"], org_id=str(org["id"]), plan="starter")
        assert response.status_code == 409
        assert response.json()["type"].endswith("/checkout-in-progress")
        assert response.headers["retry-after"] == "2"

    @pytest.mark.usefixtures("committed_db")
    @pytest.mark.parametrize("starts", [2, 8])
    async def test_concurrent_starts_create_one_session(
        self, admin_url: str, stripe_api: FakeStripe, starts: int
    ) -> None:
        """A real race: separate requests, the real pool, Stripe slow enough that they overlap."""
        stripe_api.create_delay = 0.3
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            admin_user = await add_member(admin, org, role="admin")
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                responses = await asyncio.gather(
                    *(
                        checkout(c, org["owner"] if i % 2 else admin_user, org_id=str(org["id"]), plan="pro")
                        for i in range(starts)
                    )
                )
            try:
                assert [r.status_code for r in responses] == [200] * starts, [r.text for r in responses]
                assert len({r.json()["url"] for r in responses}) == 1
                assert len(stripe_api.checkout_sessions) == 1, "two checkout sessions for one organization"
                assert len(stripe_api.session_creates()) == 1
                stored = await (
                    await admin.execute(
                        "select checkout_url, checkout_attempt from public.billing_accounts where org_id = %s",
                        (org["id"],),
                    )
                ).fetchone()
                assert stored == {"checkout_url": responses[0].json()["url"], "checkout_attempt": 1}
            finally:
                await admin.execute("delete from public.organizations where id = %s", (org["id"],))

    @pytest.mark.usefixtures("committed_db")
    async def test_concurrent_starts_for_two_plans_leave_one_open_session(
        self, admin_url: str, stripe_api: FakeStripe
    ) -> None:
        stripe_api.create_delay = 0.2
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                responses = await asyncio.gather(
                    *(checkout(c, org["owner"], org_id=str(org["id"]), plan=plan) for plan in ("pro", "starter") * 3)
                )
            try:
                statuses = sorted(r.status_code for r in responses)
                assert set(statuses) <= {200, 409}
                assert 200 in statuses
                refused = [r.json()["type"] for r in responses if r.status_code == 409]
                assert all(t.endswith("/checkout-in-progress") for t in refused)
                assert len(stripe_api.open_sessions()) == 1
            finally:
                await admin.execute("delete from public.organizations where id = %s", (org["id"],))

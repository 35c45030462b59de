"""A fake of the parts of Stripe's API that billing calls, mounted at the network edge with respx.

The code under test talks to it through stripe-python's own HTTPX client (``STRIPE_API_BASE`` points
here); answers have the shapes of Stripe's current API version (``current_period_end`` on the
subscription items), errors Stripe's error envelope. Every request is recorded. Also: event
builders, signed offline with stripe-python's ``WebhookSignature.generate_signature_header``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx
import stripe

API_BASE = "https://stripe.test"
SECRET_KEY = "sk_test_fake_0123456789abcdefghijklmnopqrstuvwxyz"
WEBHOOK_SECRET = "whsec_fake_current_0123456789abcdefghij"
OLD_WEBHOOK_SECRET = "whsec_fake_previous_0123456789abcdefghij"

_ids = itertools.count(1)


def stripe_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}{uuid.uuid4().hex[:14]}"


def form(request: httpx.Request) -> dict[str, str]:
    """A Stripe POST body (nested keys as Stripe encodes them: ``metadata[org_id]``)."""
    return dict(urllib.parse.parse_qsl(request.content.decode()))


def subscription(
    *,
    customer: str,
    status: str = "active",
    lookup_key: str | None = "hiredhands_pro_monthly",
    org_id: uuid.UUID | str | None = None,
    sub_id: str | None = None,
    period_end: int | None = None,
) -> dict[str, Any]:
    sub_id = sub_id or stripe_id("sub")
    end = period_end or int(time.time()) + 30 * 86400
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "metadata": {"org_id": str(org_id)} if org_id else {},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": stripe_id("si"),
                    "object": "subscription_item",
                    "current_period_end": end,
                    "price": {"id": f"price_{lookup_key or 'other'}", "object": "price", "lookup_key": lookup_key},
                    "quantity": 1,
                }
            ],
        },
    }


def event(event_type: str, obj: dict[str, Any], *, event_id: str | None = None, created: int | None = None) -> str:
    return json.dumps(
        {
            "id": event_id or stripe_id("evt"),
            "object": "event",
            "api_version": "2026-10-28.endive",
            "type": event_type,
            "created": created or int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "data": {"object": obj},
        }
    )


def sign(body: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp or int(time.time()))
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def _error(status: int, message: str, code: str | None = None) -> httpx.Response:
    kind = "invalid_request_error" if status < 500 else "api_error"
    headers = {"Stripe-Should-Retry": "false", "Request-Id": stripe_id("req")}
    return httpx.Response(status, json={"error": {"type": kind, "message": message, "code": code}}, headers=headers)


SubscriptionHook = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass
class FakeStripe:
    router: respx.MockRouter
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, str] = field(
        default_factory=lambda: {
            "hiredhands_starter_monthly": "price_starter_live",
            "hiredhands_pro_monthly": "price_pro_live",
        }
    )
    requests: list[httpx.Request] = field(default_factory=list)
    failing: int | None = None  # answer every request with this status
    on_retrieve: SubscriptionHook | None = None  # replaces the stored answer (delays, races)
    checkout_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_delay: float = 0.0  # seconds a checkout session create takes (to make starts overlap)
    _idempotent: dict[str, dict[str, Any]] = field(default_factory=dict)
    _idempotent_params: dict[str, dict[str, str]] = field(default_factory=dict)

    def calls(self, method: str, path_prefix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.startswith(path_prefix)]

    def session_creates(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST" and r.url.path == "/v1/checkout/sessions"]

    def put(self, sub: dict[str, Any]) -> dict[str, Any]:
        self.subscriptions[sub["id"]] = sub
        return sub

    # -- routes ----------------------------------------------------------------------------------

    async def _retrieve_subscription(self, request: httpx.Request, sub_id: str) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        found = await self.on_retrieve(sub_id) if self.on_retrieve else self.subscriptions.get(sub_id)
        if found is None:
            return _error(404, f"No such subscription: '{sub_id}'", "resource_missing")
        return httpx.Response(200, json=found)

    def _create_customer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        key = request.headers.get("idempotency-key")
        if key and key in self._idempotent:
            return httpx.Response(200, json=self._idempotent[key], headers={"Idempotent-Replayed": "true"})
        params = form(request)
        customer_id = stripe_id("cus")
        customer: dict[str, Any] = {
            "id": customer_id,
            "object": "customer",
            "name": params.get("name"),
            "metadata": {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")},
        }
        self.customers[customer_id] = customer
        if key:
            self._idempotent[key] = customer
        return httpx.Response(200, json=customer)

    def _list_prices(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        keys = request.url.params.get_list("lookup_keys[0]") or request.url.params.get_list("lookup_keys[]")
        data = [{"id": self.prices[k], "object": "price", "lookup_key": k} for k in keys if k in self.prices]
        return httpx.Response(200, json={"object": "list", "data": data[:1], "has_more": False, "url": "/v1/prices"})

    async def _create_checkout_session(self, request: httpx.Request) -> httpx.Response:
        """Stripe's idempotency: a key seen before replays its first answer when the parameters are
        the same and is an ``idempotency_error`` when they differ."""
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        params = form(request)
        key = request.headers.get("idempotency-key")
        if key and key in self._idempotent:
            if self._idempotent_params[key] != params:
                return httpx.Response(
                    400,
                    json={
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only "
                            "be used with the same parameters they were first used with.",
                        }
                    },
                )
            return httpx.Response(200, json=self._idempotent[key], headers={"Idempotent-Replayed": "true"})
        if key:
            self._idempotent[key] = {}  # reserved while the create runs, as Stripe locks the key
            self._idempotent_params[key] = params
        if params.get("customer") not in self.customers:
            return _error(400, f"No such customer: '{params.get('customer')}'", "resource_missing")
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        session_id = stripe_id("cs_test")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": params.get("mode"),
            "status": "open",
            "customer": params.get("customer"),
            "client_reference_id": params.get("client_reference_id"),
            "expires_at": int(params["expires_at"]) if "expires_at" in params else None,
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
        }
        self.checkout_sessions[session_id] = session
        if key:
            self._idempotent[key] = session
        return httpx.Response(200, json=session)

    def _retrieve_checkout_session(self, request: httpx.Request, session_id: str) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        found = self.checkout_sessions.get(session_id)
        if found is None:
            return _error(404, f"No such checkout.session: '{session_id}'", "resource_missing")
        return httpx.Response(200, json=found)

    def _expire_checkout_session(self, request: httpx.Request, session_id: str) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        found = self.checkout_sessions.get(session_id)
        if found is None:
            return _error(404, f"No such checkout.session: '{session_id}'", "resource_missing")
        if found["status"] != "open":
            return _error(400, "Only Checkout Sessions with a status of `open` can be expired.")
        found["status"] = "expired"
        found["url"] = None
        return httpx.Response(200, json=found)

    def open_sessions(self) -> list[dict[str, Any]]:
        return [s for s in self.checkout_sessions.values() if s["status"] == "open"]

    def _create_portal_session(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failing:
            return _error(self.failing, "Something went wrong on Stripe's end.")
        params = form(request)
        if params.get("customer") not in self.customers:
            return _error(400, f"No such customer: '{params.get('customer')}'", "resource_missing")
        session_id = stripe_id("bps")
        return httpx.Response(
            200,
            json={
                "id": session_id,
                "object": "billing_portal.session",
                "customer": params["customer"],
                "return_url": params.get("return_url"),
                "url": f"https://billing.stripe.test/p/session/{session_id}",
            },
        )


@contextmanager
def fake_stripe() -> Iterator[FakeStripe]:
    with respx.mock(base_url=API_BASE, assert_all_called=False, assert_all_mocked=True) as router:
        fake = FakeStripe(router)
        router.get(path__regex=r"^/v1/subscriptions/(?P<sub_id>[^/]+)$").mock(side_effect=fake._retrieve_subscription)
        router.post("/v1/customers").mock(side_effect=fake._create_customer)
        router.get("/v1/prices").mock(side_effect=fake._list_prices)
        router.post("/v1/checkout/sessions").mock(side_effect=fake._create_checkout_session)
        router.get(path__regex=r"^/v1/checkout/sessions/(?P<session_id>[^/]+)$").mock(
            side_effect=fake._retrieve_checkout_session
        )
        router.post(path__regex=r"^/v1/checkout/sessions/(?P<session_id>[^/]+)/expire$").mock(
            side_effect=fake._expire_checkout_session
        )
        router.post("/v1/billing_portal/sessions").mock(side_effect=fake._create_portal_session)
        # Everything else (the Redis REST bridge, loopback fakes) is not Stripe's: let it through.
        router.route(host__regex=r"^(?!stripe\.test$)").pass_through()
        yield fake


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - polls state that code under test changes
            await asyncio.sleep(0.005)

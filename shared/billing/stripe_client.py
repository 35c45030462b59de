"""The only module that talks to Stripe's API.

stripe-python's ``StripeClient`` with its HTTPX client, pointed at ``STRIPE_API_BASE`` (so tests and
the benchmark put a fake Stripe at the network edge: respx or a loopback server), explicit timeouts,
one network retry (stripe-python adds an idempotency key to retried POSTs itself). ``stripe`` is
imported inside the functions that use it, to keep it off the cold-start path of every other route.

Clients are created lazily per running event loop (Mangum may start a new loop per invocation and
an httpx client belongs to the loop that first used it). Every Stripe failure leaves this module as
``BillingUnavailable`` (503, so Stripe retries a webhook), through ``map_stripe_errors``, with only
the error's type, HTTP status, code and Stripe request id logged; a missing object on a read is
``None``, which callers decide about.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from shared.billing.errors import BillingUnavailable
from shared.logs import DECISION_REASON, log_event, register_secret
from shared.settings import get_settings

if TYPE_CHECKING:
    from stripe import HTTPXClient, StripeClient

TIMEOUT_SECONDS: Final = 10.0
MAX_NETWORK_RETRIES: Final = 1

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, tuple[StripeClient, HTTPXClient]]] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def _httpx_client_class() -> type[HTTPXClient]:
    import stripe

    class BodyAsContentHTTPXClient(stripe.HTTPXClient):
        """stripe-python hands httpx its form-encoded body as ``data=<str>``, which httpx 0.28
        deprecates (a DeprecationWarning on every POST); the same bytes go as ``content=``."""

        def _get_request_args_kwargs(
            self, method: str, url: str, headers: Mapping[str, str], post_data: Any
        ) -> list[Any]:
            args_kwargs: list[Any] = super()._get_request_args_kwargs(method, url, headers, post_data)
            kwargs = args_kwargs[1]
            body = kwargs.pop("data", None)
            if body:
                kwargs["content"] = body
            return args_kwargs

    return BodyAsContentHTTPXClient


def stripe_client() -> StripeClient:
    import stripe

    settings = get_settings()
    api_key = settings.stripe_secret_key.get_secret_value().strip()
    if not api_key:
        log_event("stripe not configured", logging.ERROR, **{DECISION_REASON: "stripe-key-unset"})
        raise BillingUnavailable("Billing is not configured on this server.")
    register_secret(api_key)
    cache_key = hashlib.sha256(f"{api_key}\n{settings.stripe_api_base}".encode()).hexdigest()
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    cached = per_loop.get(cache_key)
    if cached is None:
        http = _httpx_client_class()(timeout=TIMEOUT_SECONDS)
        client = stripe.StripeClient(
            api_key,
            base_addresses={"api": settings.stripe_api_base.rstrip("/")},
            http_client=http,
            max_network_retries=MAX_NETWORK_RETRIES,
        )
        cached = per_loop[cache_key] = (client, http)
    return cached[0]


async def close_stripe_clients() -> None:
    """Close the running loop's clients (tests and the benchmark call this before their loop ends)."""
    for _, http in _clients.pop(asyncio.get_running_loop(), {}).values():
        await http.close_async()  # type: ignore[no-untyped-call]


class StripeObjectMissing(Exception):
    """Stripe answered 404 for an object we asked for by id."""


@contextmanager
def map_stripe_errors(operation: str) -> Iterator[None]:
    import stripe

    try:
        yield
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            raise StripeObjectMissing(operation) from None
        _log_failure(operation, exc)
        raise BillingUnavailable("Stripe refused the request; it has been logged.") from None
    except stripe.StripeError as exc:
        _log_failure(operation, exc)
        raise BillingUnavailable("Stripe could not be reached; try again shortly.") from None


def _log_failure(operation: str, exc: Any) -> None:
    log_event(
        "stripe call failed",
        logging.WARNING,
        **{DECISION_REASON: "stripe-error"},
        operation=operation,
        error_type=type(exc).__name__,
        http_status=getattr(exc, "http_status", None),
        stripe_code=getattr(exc, "code", None),
        stripe_request_id=getattr(exc, "request_id", None),
    )


# ---------------------------------------------------------------------------------------------
# The calls billing makes. Objects come back as plain dicts.
# ---------------------------------------------------------------------------------------------


async def create_customer(org_id: uuid.UUID, *, org_name: str) -> str:
    """One customer per organization: the idempotency key is the organization's, so two racing
    first checkouts (or a retry after our write failed) get the same customer back from Stripe."""
    with map_stripe_errors("customers.create"):
        customer = await stripe_client().v1.customers.create_async(
            params={"name": org_name, "metadata": {"org_id": str(org_id)}},
            options={"idempotency_key": f"hiredhands-customer-{org_id}"},
        )
    return str(customer.id)


async def find_price(lookup_key: str) -> str | None:
    with map_stripe_errors("prices.list"):
        prices = await stripe_client().v1.prices.list_async(
            params={"lookup_keys": [lookup_key], "active": True, "limit": 1}
        )
    return str(prices.data[0].id) if prices.data else None


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str | None
    status: str | None  # open, complete, expired


def _checkout_session(session: Any) -> CheckoutSession:
    return CheckoutSession(
        id=str(session.id),
        url=str(session.url) if getattr(session, "url", None) else None,
        status=str(session.status) if getattr(session, "status", None) else None,
    )


async def create_checkout_session(
    *,
    customer_id: str,
    price_id: str,
    org_id: uuid.UUID,
    plan: str,
    success_url: str,
    cancel_url: str,
    expires_at: datetime,
    idempotency_key: str,
) -> CheckoutSession:
    """Every parameter is fixed by the claimed attempt (``expires_at`` included), so a retry with
    the attempt's idempotency key is the same request and Stripe answers it with the same session."""
    metadata = {"org_id": str(org_id), "plan": plan}
    with map_stripe_errors("checkout.sessions.create"):
        session = await stripe_client().v1.checkout.sessions.create_async(
            params={
                "mode": "subscription",
                "customer": customer_id,
                "client_reference_id": str(org_id),
                "metadata": metadata,
                "subscription_data": {"metadata": metadata},
                "line_items": [{"price": price_id, "quantity": 1}],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "expires_at": int(expires_at.timestamp()),
            },
            options={"idempotency_key": idempotency_key},
        )
    created = _checkout_session(session)
    if not created.url:
        raise BillingUnavailable("Stripe returned a checkout session without a URL.")
    return created


async def retrieve_checkout_session(session_id: str) -> CheckoutSession | None:
    try:
        with map_stripe_errors("checkout.sessions.retrieve"):
            session = await stripe_client().v1.checkout.sessions.retrieve_async(session_id)
    except StripeObjectMissing:
        return None
    return _checkout_session(session)


async def expire_checkout_session(session_id: str) -> CheckoutSession | None:
    """Expire an open session; None when Stripe no longer knows it. Stripe refuses to expire a
    session that is not open, so callers read its status first."""
    try:
        with map_stripe_errors("checkout.sessions.expire"):
            session = await stripe_client().v1.checkout.sessions.expire_async(session_id)
    except StripeObjectMissing:
        return None
    return _checkout_session(session)


async def create_portal_session(*, customer_id: str, return_url: str) -> str:
    with map_stripe_errors("billing_portal.sessions.create"):
        session = await stripe_client().v1.billing_portal.sessions.create_async(
            params={"customer": customer_id, "return_url": return_url}
        )
    return str(session.url)


async def retrieve_subscription(subscription_id: str) -> dict[str, Any] | None:
    """The subscription as Stripe has it now, or None when Stripe no longer knows it."""
    try:
        with map_stripe_errors("subscriptions.retrieve"):
            subscription = await stripe_client().v1.subscriptions.retrieve_async(subscription_id)
    except StripeObjectMissing:
        return None
    return subscription.to_dict()

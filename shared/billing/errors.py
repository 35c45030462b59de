"""Billing's domain errors: each type slug is also the log's ``decision_reason``."""

from __future__ import annotations

from shared.errors import BadRequest, Conflict, DependencyUnavailable


class WebhookRefused(BadRequest):
    """A delivery that is not a verified Stripe event. Nothing was written."""

    type_slug = "stripe-webhook-refused"
    title = "Webhook refused"


class WebhookSecretUnset(WebhookRefused):
    type_slug = "stripe-webhook-secret-unset"
    title = "Webhook signing secret is not configured"


class SignatureMissing(WebhookRefused):
    type_slug = "stripe-signature-missing"
    title = "Stripe-Signature header missing"


class SignatureInvalid(WebhookRefused):
    type_slug = "stripe-signature-invalid"
    title = "Stripe signature does not match"


class TimestampOutsideTolerance(WebhookRefused):
    type_slug = "stripe-timestamp-outside-tolerance"
    title = "Stripe signature timestamp outside the tolerance window"


class EventMalformed(WebhookRefused):
    type_slug = "stripe-event-malformed"
    title = "Webhook body is not a Stripe event"


class BillingUnavailable(DependencyUnavailable):
    type_slug = "billing-unavailable"
    title = "Billing is unavailable right now"


class AlreadySubscribed(Conflict):
    type_slug = "already-subscribed"
    title = "The organization already has a subscription"


class NoBillingAccount(Conflict):
    type_slug = "no-billing-account"
    title = "The organization has no billing account yet"


class CheckoutInProgress(Conflict):
    type_slug = "checkout-in-progress"
    title = "A checkout is being started for this organization"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "2"})


class CheckoutCompleted(Conflict):
    type_slug = "checkout-completed"
    title = "The organization's checkout was just completed"

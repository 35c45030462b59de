"""Verify a Stripe webhook delivery with stripe-python's own code, on the raw body.

``stripe.WebhookSignature.verify_header`` does the work: HMAC-SHA256 of ``"{t}.{body}"`` compared in
constant time against every ``v1`` signature in the header (a header carries several while a rolled
endpoint secret is still valid; any ``v0`` test signature is ignored), then the age check. On top of
it, because more than one endpoint secret can be configured during a rotation, each secret is tried
in turn; and a timestamp in the future beyond the tolerance is refused too (the library only bounds
the past).

Every refusal is a ``WebhookRefused`` subclass with its own reason slug and happens before the
database is touched: nothing is written for a delivery that is not a verified event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

from pydantic import ValidationError

from shared.billing.errors import (
    EventMalformed,
    SignatureInvalid,
    SignatureMissing,
    TimestampOutsideTolerance,
    WebhookSecretUnset,
)
from shared.billing.schemas import StripeEvent
from shared.settings import Settings

# Stripe's libraries default to five minutes; every retry is signed afresh, so this only bounds replays.
TOLERANCE_SECONDS: Final = 300
# A real header is one timestamp and a few 64-hex signatures.
MAX_HEADER_CHARS: Final = 4096


def webhook_secrets(settings: Settings) -> list[str]:
    """The endpoint secrets in force: STRIPE_WEBHOOK_SECRETS, comma separated, new and old during a roll."""
    return [s.strip() for s in settings.stripe_webhook_secrets.get_secret_value().split(",") if s.strip()]


def _signed_at(header: str) -> int | None:
    # The first ``t``, as stripe-python reads it.
    for item in header.split(","):
        name, _, value = item.partition("=")
        if name == "t":
            return int(value) if value.isdigit() else None
    return None


def _signature_matches(body: str, header: str, secrets: Sequence[str], tolerance: int | None) -> bool:
    import stripe

    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, tolerance)
        except stripe.SignatureVerificationError:
            continue
        return True
    return False


def verify_event(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    tolerance: int = TOLERANCE_SECONDS,
    now: float | None = None,
) -> tuple[StripeEvent, dict[str, Any]]:
    """The verified event (typed envelope, and the parsed document for the ledger), or a refusal."""
    if not secrets:
        raise WebhookSecretUnset("No webhook signing secret is configured, so no event can be verified.")
    if not header or not header.strip():
        raise SignatureMissing("The Stripe-Signature header is required.")
    if len(header) > MAX_HEADER_CHARS:
        raise SignatureInvalid("The Stripe-Signature header is too long to be Stripe's.")
    try:
        body = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise EventMalformed("The body is not UTF-8 text.") from None

    if not _signature_matches(body, header, secrets, tolerance):
        # The library checks the signature before the age: a header that matches with the age
        # check off is a genuine but stale delivery (or a replay of one).
        if _signature_matches(body, header, secrets, None):
            raise TimestampOutsideTolerance(f"The signature is older than {tolerance} seconds.")
        raise SignatureInvalid("No v1 signature in the Stripe-Signature header matches this body.")
    signed_at = _signed_at(header)
    current = time.time() if now is None else now
    if signed_at is None or signed_at > current + tolerance:
        raise TimestampOutsideTolerance(f"The signature is dated more than {tolerance} seconds ahead.")

    try:
        document = json.loads(body)
        event = StripeEvent.model_validate(document)
    except (ValueError, RecursionError, ValidationError):
        raise EventMalformed("The signed body is not a Stripe event.") from None
    return event, document

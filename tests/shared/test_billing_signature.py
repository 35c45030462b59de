"""Webhook verification, with headers signed offline by stripe-python's own signing code
(``stripe.WebhookSignature.generate_signature_header``)."""

from __future__ import annotations

import json
import time

import pytest
import stripe

from shared.billing.errors import (
    EventMalformed,
    SignatureInvalid,
    SignatureMissing,
    TimestampOutsideTolerance,
    WebhookRefused,
    WebhookSecretUnset,
)
from shared.billing.signature import TOLERANCE_SECONDS, verify_event, webhook_secrets
from shared.settings import Settings

SECRET = "whsec_test_current_0123456789abcdef"
OLD_SECRET = "whsec_test_previous_0123456789abcdef"
BODY = json.dumps(
    {
        "id": "evt_1SigTest",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": 1_764_000_000,
        "livemode": False,
        "data": {"object": {"id": "sub_1", "object": "subscription"}},
    }
)


def header(body: str = BODY, secret: str = SECRET, timestamp: int | None = None) -> str:
    signed: str = stripe.WebhookSignature.generate_signature_header(
        body, secret, timestamp=timestamp or int(time.time())
    )
    return signed


def v1(signed_header: str) -> str:
    return signed_header.split(",", 1)[1]


class TestAccepted:
    def test_a_valid_signature_yields_the_event_and_its_document(self) -> None:
        event, document = verify_event(BODY.encode(), header(), [SECRET])
        assert event.id == "evt_1SigTest"
        assert event.type == "customer.subscription.updated"
        assert document == json.loads(BODY)

    def test_several_v1_signatures_pass_when_any_one_matches(self) -> None:
        now = int(time.time())
        mixed = f"t={now},{v1(header(secret=OLD_SECRET, timestamp=now))},{v1(header(timestamp=now))}"
        assert verify_event(BODY.encode(), mixed, [SECRET])[0].id == "evt_1SigTest"

    def test_during_a_rotation_the_old_secret_still_verifies(self) -> None:
        signed_with_old = header(secret=OLD_SECRET)
        assert verify_event(BODY.encode(), signed_with_old, [SECRET, OLD_SECRET])[0].id == "evt_1SigTest"

    def test_a_fake_v0_signature_beside_the_real_v1_is_ignored(self) -> None:
        signed = header()
        with_v0 = signed + ",v0=" + "0" * 64
        assert verify_event(BODY.encode(), with_v0, [SECRET])[0].id == "evt_1SigTest"

    def test_a_timestamp_inside_the_window_passes(self) -> None:
        recent = header(timestamp=int(time.time()) - TOLERANCE_SECONDS + 30)
        assert verify_event(BODY.encode(), recent, [SECRET])[0].id == "evt_1SigTest"


class TestRefused:
    def test_tampered_body(self) -> None:
        tampered = BODY.replace("sub_1", "sub_2")
        with pytest.raises(SignatureInvalid):
            verify_event(tampered.encode(), header(), [SECRET])

    def test_one_changed_byte_of_whitespace_is_a_different_body(self) -> None:
        with pytest.raises(SignatureInvalid):
            verify_event((BODY + " ").encode(), header(), [SECRET])

    def test_wrong_secret(self) -> None:
        with pytest.raises(SignatureInvalid):
            verify_event(BODY.encode(), header(secret="whsec_someone_else"), [SECRET])

    def test_after_the_rotation_ends_the_old_secret_no_longer_verifies(self) -> None:
        with pytest.raises(SignatureInvalid):
            verify_event(BODY.encode(), header(secret=OLD_SECRET), [SECRET])

    def test_stale_timestamp(self) -> None:
        stale = header(timestamp=int(time.time()) - TOLERANCE_SECONDS - 60)
        with pytest.raises(TimestampOutsideTolerance):
            verify_event(BODY.encode(), stale, [SECRET])

    def test_timestamp_too_far_in_the_future(self) -> None:
        ahead = header(timestamp=int(time.time()) + TOLERANCE_SECONDS + 60)
        with pytest.raises(TimestampOutsideTolerance):
            verify_event(BODY.encode(), ahead, [SECRET])

    def test_a_replayed_signature_with_a_new_timestamp_does_not_match(self) -> None:
        old = header(timestamp=int(time.time()) - 3600)
        replayed = f"t={int(time.time())},{v1(old)}"
        with pytest.raises(SignatureInvalid):
            verify_event(BODY.encode(), replayed, [SECRET])

    @pytest.mark.parametrize("missing", [None, "", "   "])
    def test_missing_header(self, missing: str | None) -> None:
        with pytest.raises(SignatureMissing):
            verify_event(BODY.encode(), missing, [SECRET])

    def test_only_a_v0_signature(self) -> None:
        now = int(time.time())
        v0_only = f"t={now},v0=" + WebhookSignatureV0.sign(BODY, now)
        with pytest.raises(SignatureInvalid):
            verify_event(BODY.encode(), v0_only, [SECRET])

    @pytest.mark.parametrize("garbage", ["nonsense", "t=abc,v1=00", "v1=abc", "t=,v1=", "t=1," + "v1=00," * 1000])
    def test_unparsable_header(self, garbage: str) -> None:
        with pytest.raises(SignatureInvalid):
            verify_event(BODY.encode(), garbage, [SECRET])

    def test_no_secret_configured(self) -> None:
        with pytest.raises(WebhookSecretUnset):
            verify_event(BODY.encode(), header(), [])

    @pytest.mark.parametrize(
        "body",
        [
            "not json",
            "[]",
            '{"id": "evt_1", "object": "event"}',
            '{"id": "not-an-event-id", "object": "event", "type": "x", "created": 1, "data": {"object": {}}}',
            '{"id": "evt_1", "object": "v2.core.event", "type": "x", "created": 1, "data": {"object": {}}}',
            "[" * 100_000,
        ],
    )
    def test_a_signed_body_that_is_not_a_stripe_event(self, body: str) -> None:
        with pytest.raises(EventMalformed):
            verify_event(body.encode(), header(body), [SECRET])

    def test_a_body_that_is_not_utf8(self) -> None:
        with pytest.raises(EventMalformed):
            verify_event(b"\xff\xfe{}", header("{}"), [SECRET])

    def test_every_refusal_is_a_400(self) -> None:
        for error in (
            WebhookSecretUnset,
            SignatureMissing,
            SignatureInvalid,
            TimestampOutsideTolerance,
            EventMalformed,
        ):
            assert issubclass(error, WebhookRefused)
            assert error.status == 400
            assert error.type_slug.startswith("stripe-")


class TestSecretsSetting:
    def test_comma_separated_secrets_in_order_blanks_dropped(self) -> None:
        settings = Settings(stripe_webhook_secrets=f" {SECRET} ,, {OLD_SECRET} ")
        assert webhook_secrets(settings) == [SECRET, OLD_SECRET]

    def test_unset(self) -> None:
        assert webhook_secrets(Settings(stripe_webhook_secrets="")) == []


class WebhookSignatureV0:
    """Test-mode events also carry a ``v0`` signature; it must never be what lets an event in."""

    @staticmethod
    def sign(body: str, timestamp: int) -> str:
        return stripe.WebhookSignature._compute_signature(f"{timestamp}.{body}", SECRET)

"""The card-data guard: card-like keys at any depth, and Luhn-valid PANs anywhere in the raw body."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cards import CardDataRefused, carries_card_data, contains_pan, is_card_key, luhn_valid, refuse_card_data

# Stripe's documented test numbers: Visa, Mastercard, Amex (15), Diners (14), a 19-digit Visa.
PANS = ["4242424242424242", "5555555555554444", "378282246310005", "36227206271667", "4000000760000002"]


def body(**fields: object) -> bytes:
    return json.dumps({"org_id": str(uuid.uuid4()), "plan": "pro", **fields}).encode()


class TestLuhn:
    @pytest.mark.parametrize("pan", PANS)
    def test_test_card_numbers_pass(self, pan: str) -> None:
        assert luhn_valid(pan)

    def test_one_wrong_digit_fails(self) -> None:
        assert not luhn_valid("4242424242424241")


class TestPanAnywhere:
    @pytest.mark.parametrize("pan", PANS)
    def test_in_a_string_value(self, pan: str) -> None:
        assert carries_card_data(body(note=f"my card is {pan} thanks"))

    @pytest.mark.parametrize(
        "written", ["4242 4242 4242 4242", "4242-4242-4242-4242", "3782 822463 10005", "4242424242424242 12/34 123"]
    )
    def test_grouped_as_people_type_them(self, written: str) -> None:
        assert carries_card_data(body(plan=written))

    def test_as_a_json_number(self) -> None:
        assert carries_card_data(b'{"org_id": "x", "amount": 4242424242424242}')

    def test_as_a_key(self) -> None:
        assert carries_card_data(b'{"4242424242424242": 1}')

    def test_in_a_body_that_is_not_json(self) -> None:
        assert carries_card_data(b"plan=pro&x=4242424242424242")

    def test_nested_deep(self) -> None:
        assert carries_card_data(json.dumps({"a": [{"b": {"c": ["4242424242424242"]}}]}).encode())

    @pytest.mark.parametrize(
        "harmless",
        [
            "4242424242424241",  # fails Luhn
            "424242424242",  # 12 digits
            "42424242424242424242",  # 20 digits in one group
            "a4242424242424242",  # glued to letters: an id, not a number someone typed
            "cus_4242424242424242",
            "1764000000",  # a Unix timestamp
        ],
    )
    def test_not_a_pan(self, harmless: str) -> None:
        assert not contains_pan(harmless)

    @settings(max_examples=2000, deadline=None)
    @given(st.uuids())
    def test_no_uuid_is_ever_mistaken_for_a_card(self, value: uuid.UUID) -> None:
        assert not carries_card_data(body(org_id=str(value)))

    def test_an_all_digit_uuid_is_not_a_card_either(self) -> None:
        assert not carries_card_data(body(org_id="12345678-1234-4234-8234-123456789012"))


class TestCardKeys:
    @pytest.mark.parametrize(
        "key",
        [
            "card",
            "number",
            "cvc",
            "cvv",
            "exp_month",
            "exp_year",
            "card_number",
            "cardNumber",
            "Card-Number",
            "CVV2",
            "expMonth",
            "cardholder_name",
            "security_code",
        ],
    )
    def test_card_keys(self, key: str) -> None:
        assert is_card_key(key)
        assert carries_card_data(body(**{key: "x"}))

    def test_nested_card_object(self) -> None:
        assert carries_card_data(body(payment={"card": {"exp_month": 12}}))

    def test_key_inside_a_list(self) -> None:
        assert carries_card_data(body(items=[{"ok": 1}, {"cvc": "123"}]))

    @pytest.mark.parametrize("key", ["org_id", "plan", "url", "customer", "cancel_url", "discount"])
    def test_ordinary_keys(self, key: str) -> None:
        assert not is_card_key(key)

    def test_an_ordinary_body_passes(self) -> None:
        refuse_card_data(body())
        refuse_card_data(b"")


class TestRefusal:
    def test_the_error_never_repeats_the_number(self) -> None:
        with pytest.raises(CardDataRefused) as caught:
            refuse_card_data(body(card="4242424242424242"))
        error = caught.value
        assert error.status == 422
        assert "never accepted" in error.detail
        assert "4242" not in error.detail
        assert "4242" not in str(error)

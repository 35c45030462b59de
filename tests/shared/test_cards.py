"""The card-data guard: what the application decodes is scanned, free text and keys always, machine
values (webhook URLs, ids, tokens) never; both directions proved with generated data."""

from __future__ import annotations

import importlib
import json
import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from shared.cards import (
    REDACTED_PAN,
    CardDataRefused,
    FormFields,
    Identifier,
    Text,
    carries_card_data,
    contains_pan,
    decode_body,
    identifier_paths,
    is_card_key,
    luhn_valid,
    redact_pans,
    refuse_card_data,
)
from shared.connections.schemas import ConnectionCreate
from shared.local.routes import function_modules
from shared.widget.schemas import ChatRequest
from tests.card_data import (
    discord_webhook_urls,
    every_body,
    free_text_with_card,
    pans,
    slack_webhook_urls,
    snowflakes,
    webhook_urls_with_numeric_ids,
    written,
)
from tests.test_vercel_routes import _api_routes as api_routes

# Stripe's documented test numbers: Visa, Mastercard, Amex (15), Diners (14), a 19-digit Visa.
PANS = ["4242424242424242", "5555555555554444", "378282246310005", "36227206271667", "4000000760000002"]
CONNECTION_PATHS = identifier_paths(ConnectionCreate)
CHAT_PATHS = identifier_paths(ChatRequest)


def decoded(content: bytes, content_type: str = "application/json") -> Any:
    return decode_body(content, content_type)


class TestLuhn:
    @pytest.mark.parametrize("pan", PANS)
    def test_test_card_numbers_pass(self, pan: str) -> None:
        assert luhn_valid(pan)

    def test_one_wrong_digit_fails(self) -> None:
        assert not luhn_valid("4242424242424241")


class TestFreeText:
    """A card number in text a person typed is found however it is written."""

    @settings(max_examples=300, deadline=None)
    @given(free_text_with_card())
    def test_every_written_form_is_found(self, case: tuple[str, str]) -> None:
        text, _ = case
        assert contains_pan(text), f"missed {text!r}"

    @settings(max_examples=150, deadline=None)
    @given(free_text_with_card(), st.sampled_from(["message", "name", "note"]))
    def test_every_encoding_of_every_body_is_refused(self, case: tuple[str, str], field: str) -> None:
        text, _ = case
        for body in every_body({field: text}):
            document = decode_body(body.content, body.content_type)
            assert carries_card_data(document, CHAT_PATHS), f"{body.encoding} hid {text!r}"

    @pytest.mark.parametrize(
        "text",
        [
            "card \u0034242424242424242 thanks",
            "\uff14\uff12\uff14\uff12" * 4,  # full-width digits
            "4242.4242.4242.4242",
            "4242\u200b4242\u200b4242\u200b4242",
            "4242 - 4242 - 4242 - 4242",
            "3782 822463 10005",
            "4242424242424242 12/34 123",
        ],
    )
    def test_examples(self, text: str) -> None:
        assert contains_pan(text)

    @pytest.mark.parametrize(
        "harmless",
        [
            "4242424242424241",  # fails Luhn
            "424242424242",  # 12 digits
            "42424242424242424242",  # 20 digits in one group
            "a4242424242424242",  # glued to letters: an id, not a number someone typed
            "cus_4242424242424242",
            "ORD-4242424242424242",
            "+4915100000004",  # E.164: a phone number a visitor leaves as a lead
            "1764000000",  # a Unix timestamp
        ],
    )
    def test_not_a_pan(self, harmless: str) -> None:
        assert not contains_pan(harmless)

    def test_a_run_of_thousands_of_digit_groups_is_decided(self) -> None:
        # Every contiguous choice of groups is a candidate; the check is linear, so this stays cheap.
        assert not contains_pan("1 " * 30_000 + "x")


class TestKeys:
    @pytest.mark.parametrize(
        "key",
        ["card", "number", "cvc", "cvv", "exp_month", "exp_year", "card_number", "cardNumber", "Card-Number", "CVV2",
         "expMonth", "cardholder_name", "security_code", "\uff43\uff41\uff52\uff44"],
    )  # fmt: skip
    def test_card_field_names(self, key: str) -> None:
        assert is_card_key(key)
        assert carries_card_data({"org_id": "x", key: "x"})

    @settings(max_examples=200, deadline=None)
    @given(pans().flatmap(written))
    def test_a_card_number_as_a_key_is_refused_at_any_depth_even_under_an_identifier(self, key: str) -> None:
        assert carries_card_data({key: 1})
        assert carries_card_data({"payment": [{"details": {key: "x"}}]})
        assert carries_card_data({"webhook_url": {key: "x"}}, CONNECTION_PATHS)

    @pytest.mark.parametrize("key", ["org_id", "plan", "url", "customer", "cancel_url", "discount", "message"])
    def test_ordinary_keys(self, key: str) -> None:
        assert not is_card_key(key)


class TestDecoding:
    def test_json_escapes_and_utf16_are_decoded(self) -> None:
        assert decoded(b'{"message": "card \\u0034242424242424242"}') == {"message": "card 4242424242424242"}
        assert decoded(json.dumps({"m": "x"}).encode("utf-16")) == {"m": "x"}

    def test_a_form_is_percent_decoded(self) -> None:
        form = decoded(b"message=card+%34242%20424242424242", "application/x-www-form-urlencoded")
        assert form == FormFields((("message", "card 4242 424242424242"),))

    def test_anything_else_is_text(self) -> None:
        assert decoded(b"not json", "text/plain") == Text("not json")
        assert carries_card_data(decoded(b"x=4242424242424242", "text/plain"))

    def test_a_json_number_is_scanned(self) -> None:
        assert carries_card_data(decoded(b'{"amount": 4242424242424242}'))
        assert carries_card_data(decoded(b'{"amount": 4242424242424242.0}'))


class TestMachineValues:
    """URLs, ids and tokens are not free text: numbers in them are ids, never refused."""

    def test_the_connection_schema_marks_its_credentials_and_ids(self) -> None:
        assert {("webhook_url",), ("url",), ("token",), ("signing_secret",), ("repository",), ("org_id",)} <= (
            CONNECTION_PATHS
        )
        assert ("name",) not in CONNECTION_PATHS, "a connection's name is free text"
        assert {("conversation_id",)} == CHAT_PATHS, "the chat message is free text"

    @settings(max_examples=1000, deadline=None)
    @given(discord_webhook_urls())
    def test_discord_webhook_urls_are_accepted(self, url: str) -> None:
        # Every id drawn passes Luhn: before the fix, each of these bodies was refused.
        body = {"org_id": str(uuid.uuid4()), "kind": "discord_webhook", "name": "Alerts", "webhook_url": url}
        as_json = json.dumps(body).encode()
        as_form = urlencode(body).encode()
        assert not carries_card_data(decode_body(as_json, "application/json"), CONNECTION_PATHS)
        assert not carries_card_data(decode_body(as_form, "application/x-www-form-urlencoded"), CONNECTION_PATHS)

    @settings(max_examples=500, deadline=None)
    @given(slack_webhook_urls(), webhook_urls_with_numeric_ids())
    def test_slack_and_custom_webhook_urls_are_accepted(self, slack: str, custom: str) -> None:
        org = str(uuid.uuid4())
        assert not carries_card_data(
            {"org_id": org, "kind": "slack_webhook", "name": "Alerts", "webhook_url": slack}, CONNECTION_PATHS
        )
        assert not carries_card_data({"org_id": org, "kind": "webhook", "name": "Ops", "url": custom}, CONNECTION_PATHS)

    @settings(max_examples=300, deadline=None)
    @given(snowflakes())
    def test_the_same_number_in_free_text_is_refused(self, snowflake: str) -> None:
        # The exemption belongs to the field, not to the number.
        assert carries_card_data({"kind": "discord_webhook", "name": f"hook {snowflake}"}, CONNECTION_PATHS)

    @settings(max_examples=1000, deadline=None)
    @given(st.uuids())
    def test_no_uuid_field_is_ever_taken_for_a_card(self, value: uuid.UUID) -> None:
        assert not carries_card_data({"message": "hi", "conversation_id": str(value)}, CHAT_PATHS)

    def test_a_path_that_is_free_text_in_any_union_member_stays_scanned(self) -> None:
        class A(BaseModel):
            kind: Literal["a"]
            ref: Annotated[SecretStr, Identifier("a token")]

        class B(BaseModel):
            kind: Literal["b"]
            ref: str

        class C(BaseModel):
            kind: Literal["c"]
            ref: Annotated[str, Identifier("an id")]
            items: list[Annotated[str, Identifier("an id")]]
            notes: dict[str, str]

        assert identifier_paths(A | B) == frozenset()
        assert identifier_paths(A | C) == {("ref",), ("items", "*")}
        assert carries_card_data(
            {"items": ["4242424242424242"], "notes": {"x": "4242424242424242"}}, identifier_paths(C)
        )
        assert not carries_card_data({"items": ["4242424242424242"]}, identifier_paths(C))


class TestRefusal:
    def test_the_error_never_repeats_the_number(self) -> None:
        with pytest.raises(CardDataRefused) as caught:
            refuse_card_data({"card": "4242424242424242"})
        error = caught.value
        assert error.status == 422
        assert "never accepted" in error.detail
        assert "4242" not in error.detail
        assert "4242" not in str(error)

    @settings(max_examples=300, deadline=None)
    @given(free_text_with_card())
    def test_redaction_removes_every_written_form(self, case: tuple[str, str]) -> None:
        text, _ = case
        redacted = redact_pans(f"loc {text} end")
        assert REDACTED_PAN in redacted
        assert not contains_pan(redacted)
        assert redacted.startswith("loc ")
        assert redacted.endswith(" end")


# Every request body field the card scan skips, by function and route: a reviewed, enumerated list.
EXPECTED_EXEMPTIONS = {
    ("billing", "POST /api/billing/checkout"): {("org_id",)},
    ("billing", "POST /api/billing/portal"): {("org_id",)},
    ("connection_verify", "POST /api/connections"): {
        ("org_id",),
        ("parent", "id"),
        ("repository",),
        ("signing_secret",),
        ("token",),
        ("url",),
        ("webhook_url",),
    },
    ("invitations", "POST /api/invitations"): {("email",), ("org_id",)},
    ("scan", "POST /api/scans"): {("agent_id",), ("start_url",)},
    ("external.widget_chat", "POST /api/widget/{key}/chat"): {("conversation_id",)},
    ("model_key", "PUT /api/model-key"): {("api_key",), ("base_url",), ("org_id",)},
    ("model_key", "PATCH /api/model-key"): {("org_id",)},
}


class TestEveryExemptionIsListed:
    async def test_the_fields_skipped_by_the_scan_are_exactly_the_reviewed_ones(self) -> None:
        found: dict[tuple[str, str], set[tuple[str, ...]]] = {}
        for name in function_modules():
            app = getattr(importlib.import_module(f"functions.{name}"), "app", None)
            if app is None:  # queue consumers take no HTTP bodies
                continue
            for route in api_routes(app.routes):
                if route.body_field is not None and (paths := identifier_paths(route.body_field.field_info.annotation)):
                    found[(name, " ".join(sorted(route.methods)) + " " + route.path)] = set(paths)
        assert found == EXPECTED_EXEMPTIONS

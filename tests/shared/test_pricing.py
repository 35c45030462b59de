"""The price table and the reservation bound."""

from __future__ import annotations

import pytest

from shared.errors import ModelUnavailable
from shared.gateway import WIDGET_TOOLS
from shared.pricing import (
    OFFLINE_MODEL,
    PRICES,
    UnknownModel,
    cost_microusd,
    max_cost_microusd,
    price_of,
    prompt_token_bound,
)


class TestPrices:
    def test_the_supported_models_have_prices_and_offline_is_free(self) -> None:
        assert set(PRICES) == {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", OFFLINE_MODEL}
        assert cost_microusd(OFFLINE_MODEL, prompt_tokens=10_000, completion_tokens=10_000) == 0

    @pytest.mark.parametrize(
        ("model", "prompt_tokens", "completion_tokens", "expected"),
        [
            ("gpt-4o-mini", 1_000_000, 0, 150_000),
            ("gpt-4o-mini", 0, 1_000_000, 600_000),
            ("gpt-4o", 1_000_000, 1_000_000, 12_500_000),
            ("gpt-4.1-mini", 2_000, 500, 1_600),
            ("text-embedding-3-small", 1_000, 0, 20),
            ("gpt-4o-mini", 1, 0, 1),  # 0.15 micro-dollars round up: never metered for less than it cost
            ("gpt-4o-mini", 0, 0, 0),
        ],
    )
    def test_costs_are_whole_micro_dollars_rounded_up(
        self, model: str, prompt_tokens: int, completion_tokens: int, expected: int
    ) -> None:
        assert cost_microusd(model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens) == expected

    def test_an_unknown_model_is_refused_with_the_supported_ones_named(self) -> None:
        with pytest.raises(UnknownModel) as raised:
            price_of("gpt-5-preview")
        assert isinstance(raised.value, ModelUnavailable)
        assert raised.value.type_slug == "model-unknown"
        assert "'gpt-5-preview'" in raised.value.detail
        assert "gpt-4o-mini" in raised.value.detail
        assert "offline" not in raised.value.detail

    def test_negative_token_counts_are_refused(self) -> None:
        with pytest.raises(ValueError, match="negative"):
            cost_microusd("gpt-4o", prompt_tokens=-1, completion_tokens=0)


class TestBound:
    @pytest.mark.parametrize("text", ["hello", "héllo wörld", "日本語のテキスト", "🙂" * 10, ""])
    def test_the_prompt_bound_is_at_least_the_utf8_length(self, text: str) -> None:
        assert prompt_token_bound([text], messages=1) >= len(text.encode()) + 8

    def test_tools_and_messages_add_to_the_bound(self) -> None:
        bare = prompt_token_bound(["hi"], messages=1)
        assert prompt_token_bound(["hi", "there"], messages=2) > bare
        assert prompt_token_bound(["hi"], messages=1, tools=WIDGET_TOOLS) > bare + 1000

    def test_the_most_a_call_can_cost_counts_every_completion_token(self) -> None:
        assert max_cost_microusd("gpt-4o-mini", prompt_token_bound=1000, max_completion_tokens=400) == 150 + 240

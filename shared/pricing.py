"""The price table: what a model call costs, in integer micro-dollars (1 USD = 1,000,000).

Prices are per million tokens, input and output separately, as OpenAI publishes them. A price
change is a code change (reviewed, tested), never a setting someone can mistype in production.
A model that is not in the table is refused before anything is reserved or called: metering a
call at an unknown price would either undercharge the organization's budget or invent a number.

Costs round up to the next micro-dollar, so a call is never metered for less than it cost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shared.errors import ModelUnavailable

MICROUSD_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000

OFFLINE_MODEL = "offline"
EMBEDDING_MODEL = "text-embedding-3-small"

# Chat formatting adds a few tokens per message (role markers) and per request (reply priming);
# OpenAI documents 3-4 of each. The bound below uses a generous 8 of each.
_TOKENS_PER_MESSAGE = 8
_TOKENS_PER_REQUEST = 8
_TOKENS_PER_TOOL = 16


@dataclass(frozen=True, slots=True)
class Price:
    input_microusd_per_mtok: int
    output_microusd_per_mtok: int


# USD per 1M tokens from openai.com/api/pricing: gpt-4o-mini 0.15 / 0.60, gpt-4o 2.50 / 10.00,
# gpt-4.1-mini 0.40 / 1.60, text-embedding-3-small 0.02 (embeddings have no output tokens).
PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "gpt-4o-mini": Price(150_000, 600_000),
        "gpt-4o": Price(2_500_000, 10_000_000),
        "gpt-4.1-mini": Price(400_000, 1_600_000),
        EMBEDDING_MODEL: Price(20_000, 0),
        OFFLINE_MODEL: Price(0, 0),
    }
)


class UnknownModel(ModelUnavailable):
    """The agent names a model that has no price: refused before any reservation or call."""

    type_slug = "model-unknown"
    title = "The configured model is not supported"


def price_of(model: str) -> Price:
    try:
        return PRICES[model]
    except KeyError:
        supported = ", ".join(sorted(name for name in PRICES if name != OFFLINE_MODEL))
        raise UnknownModel(f"The model {model!r} has no price; supported models: {supported}.") from None


def cost_microusd(model: str, *, prompt_tokens: int, completion_tokens: int) -> int:
    """The cost of a call, rounded up to a whole micro-dollar."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts are never negative")
    price = price_of(model)
    numerator = prompt_tokens * price.input_microusd_per_mtok + completion_tokens * price.output_microusd_per_mtok
    return -(-numerator // TOKENS_PER_PRICE_UNIT)


def prompt_token_bound(texts: Iterable[str], *, messages: int, tools: Iterable[Mapping[str, Any]] = ()) -> int:
    """An upper bound on the prompt tokens of a request, without a tokenizer.

    A BPE token is at least one byte of UTF-8, so a text never has more tokens than bytes; tool
    schemas are counted as their JSON, and chat formatting adds a fixed overhead per message.
    The bound is loose for English (about four bytes a token), which only means a reservation
    holds a little more than the call will cost until it is settled, a moment later.
    """
    total = _TOKENS_PER_REQUEST + messages * _TOKENS_PER_MESSAGE
    total += sum(len(text.encode()) for text in texts)
    for tool in tools:
        total += _TOKENS_PER_TOOL + len(json.dumps(tool, separators=(",", ":")).encode())
    return total


def max_cost_microusd(model: str, *, prompt_token_bound: int, max_completion_tokens: int) -> int:
    """The most a call can cost: the reservation made before it."""
    return cost_microusd(model, prompt_tokens=prompt_token_bound, completion_tokens=max_completion_tokens)

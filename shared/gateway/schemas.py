"""The gateway's public data: what a caller sends and what a model call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]

MAX_REPLY_CHARS = 100_000
"""The longest reply a transcript stores (``messages.content``); a longer one is clipped, saying so."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation, oldest first.

    ``tool`` messages carry the result of an earlier action in plain text. The gateway keeps no
    state between calls and a ``ChatMessage`` has no tool call id, so it hands such a message to
    the model as a system note rather than as an OpenAI ``tool`` message (which needs the id).
    """

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool the model (or the offline provider) asks the caller to run, with its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A metered answer. ``content`` may be empty when the model only called a tool; ``clipped``: the
    model's reply was longer than ``MAX_REPLY_CHARS`` and ``content`` ends with a note saying it was cut."""

    content: str
    tool_calls: list[ToolCall]
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_microusd: int
    usage_event_id: int
    offline: bool
    clipped: bool = False

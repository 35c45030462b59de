"""What the widget sends and receives. Every field is bounded and nothing else is accepted."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGE_CHARS = 2000
"""One visitor message. Longer is a 422, not a silent cut: the visitor should know."""
MAX_CONVERSATION_MESSAGES = 200
"""Stored messages (visitor and agent) per conversation; then ``conversation-full`` (409)."""
HISTORY_MESSAGES = 20
"""The most recent stored messages the model sees with the new one."""
HISTORY_CHARS = 12000
"""...and at most this many characters of them, newest kept first."""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    message: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS)]
    conversation_id: UUID | None = None
    """Optional: when sent it must be the conversation the visitor token names."""

    @field_validator("message")
    @classmethod
    def _printable(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class WidgetConfig(BaseModel):
    """What the widget needs to render, and nothing else: no prompt, no model, no organization."""

    model_config = ConfigDict(frozen=True)

    display_name: str | None
    greeting: str | None
    theme: dict[str, Any]


class ChatReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    conversation_id: UUID
    visitor_token: str
    """Send it back as ``Authorization: Bearer <token>`` with the next message; each reply renews it."""
    visitor_token_expires_at: int
    """Unix seconds."""
    reply: str
    status: Literal["answered", "handed_to_team"]
    """``handed_to_team`` when the conversation went to a person (asked for, or the model failed)."""

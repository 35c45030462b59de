"""The widget service's pure parts: what it reads from headers and what history the model sees."""

from __future__ import annotations

import uuid

from shared.gateway import ChatMessage
from shared.widget.queries import ChatContext, HistoryMessage
from shared.widget.schemas import HISTORY_CHARS
from shared.widget.service import WIDGET_INSTRUCTIONS, bearer_token, client_address, model_messages, visitor_address_key


def context(history: list[HistoryMessage], system_prompt: str = "You answer for Acme.") -> ChatContext:
    return ChatContext(
        agent_id=uuid.uuid4(),
        org_id=uuid.uuid4(),
        system_prompt=system_prompt,
        model="gpt-4o-mini",
        temperature=0.3,
        allowed_origins=[],
        rpm_per_agent=60,
        rpm_per_visitor=10,
        burst_per_minute=30,
        conversation_id=None,
        conversation_status=None,
        message_count=None,
        has_knowledge=False,
        history=history,
    )


class TestHeaders:
    def test_bearer_token(self) -> None:
        assert bearer_token(None) is None
        assert bearer_token("Bearer hh_vt_abc") == "hh_vt_abc"
        assert bearer_token("bearer   hh_vt_abc ") == "hh_vt_abc"
        assert bearer_token("Basic Zm9v") == "", "another scheme is a bad token, not a missing one"
        assert bearer_token("Bearer") == ""

    def test_client_address_prefers_the_platforms_header(self) -> None:
        assert client_address("203.0.113.9", ("10.0.0.1", 5000)) == "203.0.113.9"
        assert client_address(None, ("10.0.0.1", 5000)) == "10.0.0.1"
        assert client_address("  ", None) == "unknown"
        assert len(client_address("x" * 1000, None)) == 64

    def test_addresses_are_counted_by_hash(self) -> None:
        key = visitor_address_key("203.0.113.9")
        assert "203.0.113.9" not in key
        assert key == visitor_address_key("203.0.113.9") != visitor_address_key("203.0.113.10")


class TestPrompt:
    def test_system_prompt_rules_history_then_the_message(self) -> None:
        history = [
            HistoryMessage("visitor", "Hi"),
            HistoryMessage("agent", "Hello! How can I help?"),
            HistoryMessage("system", "Sorry, I can't answer that right now."),
        ]

        messages = model_messages(context(history), "Opening hours?")

        assert messages == [
            ChatMessage("system", "You answer for Acme."),
            ChatMessage("system", WIDGET_INSTRUCTIONS),
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello! How can I help?"),
            ChatMessage("user", "Opening hours?"),
        ]

    def test_history_keeps_the_newest_messages_within_its_character_budget(self) -> None:
        history = [HistoryMessage("visitor" if i % 2 == 0 else "agent", f"{i:02d}" + "x" * 1998) for i in range(20)]

        messages = model_messages(context(history), "now")

        kept = [m.content[:2] for m in messages if m.role in {"user", "assistant"}][:-1]
        assert kept == [f"{i:02d}" for i in range(20 - HISTORY_CHARS // 2000, 20)]

    def test_an_empty_system_prompt_is_left_out(self) -> None:
        assert model_messages(context([], system_prompt="  "), "hi")[0] == ChatMessage("system", WIDGET_INSTRUCTIONS)

"""The widget's tools: handing a conversation to a person, and recording a visitor's contact details.

Both are OpenAI function tools in strict mode: every property is required (``null`` where a value
is unknown) and no other property is allowed, so the arguments that come back always have the
same keys, from the model and from the offline provider alike. The caller (the widget) still
validates the values (an email address, a phone number) before it stores anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from shared.gateway.schemas import ToolCall

ESCALATE: Final = "escalate"
CAPTURE_LEAD: Final = "capture_lead"

ESCALATION_REASONS: Final = ("visitor_requested_human", "cannot_answer", "complaint", "other")

WIDGET_TOOLS: Final[list[dict[str, Any]]] = [
    {
        "type": "function",
        "function": {
            "name": ESCALATE,
            "description": (
                "Hand the conversation to a person on the team. Call it when the visitor asks for a human, "
                "when the documentation does not answer the question, or when the visitor is unhappy."
            ),
            "strict": True,
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "required": ["reason", "summary", "draft_reply"],
                "properties": {
                    "reason": {
                        "type": "string",
                        "enum": list(ESCALATION_REASONS),
                        "description": "Why a person should take over.",
                    },
                    "summary": {
                        "type": "string",
                        "description": "One or two sentences for the team: what the visitor needs.",
                    },
                    "draft_reply": {
                        "type": "string",
                        "description": (
                            "A reply the team could send the visitor, grounded only in the documentation; "
                            "empty when the documentation has no answer."
                        ),
                    },
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": CAPTURE_LEAD,
            "description": (
                "Record the visitor's contact details so the team can follow up. Call it when the visitor "
                "shares an email address or a phone number."
            ),
            "strict": True,
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "required": ["email", "phone", "name", "note"],
                "properties": {
                    "email": {"type": ["string", "null"], "description": "The email address, as the visitor wrote it."},
                    "phone": {"type": ["string", "null"], "description": "The phone number, as the visitor wrote it."},
                    "name": {"type": ["string", "null"], "description": "The visitor's name, if they gave it."},
                    "note": {
                        "type": ["string", "null"],
                        "description": "What the visitor wants to be contacted about.",
                    },
                },
            },
        },
    },
]


def tool_names(tools: Iterable[Mapping[str, Any]] | None) -> frozenset[str]:
    """The names of the function tools offered in a request."""
    names: set[str] = set()
    for tool in tools or ():
        function = tool.get("function")
        if tool.get("type") == "function" and isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def parse_arguments(raw: str | None) -> dict[str, Any] | None:
    """A tool call's JSON arguments as a dict; ``None`` when they are not a JSON object."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def accepted_tool_calls(calls: Iterable[ToolCall], offered: frozenset[str]) -> list[ToolCall]:
    """Only calls of tools that were offered: a model may name a tool it was never given."""
    return [call for call in calls if call.name in offered]

"""The model gateway: the only code that calls a model.

Every call is rate-limited per organization, reserved against the organization's monthly budget,
made through the openai SDK (or answered by the offline provider when no key is configured), and
metered with one usage row that settles the reservation. See docs/gateway.md.

``openai`` is imported only by ``shared.gateway.provider`` (tests/architecture enforces it), and
only inside the functions that call a model.
"""

from shared.gateway.provider import close_clients
from shared.gateway.schemas import ChatMessage, ChatResult, Role, ToolCall
from shared.gateway.service import (
    BURST_BUCKET,
    EMBEDDING_DIMENSIONS,
    BurstPass,
    admit_burst,
    chat,
    embed,
    embed_then,
    online,
)
from shared.gateway.streaming import ChatStream, StreamedChat, open_chat_stream
from shared.gateway.tools import CAPTURE_LEAD, ESCALATE, ESCALATION_REASONS, WIDGET_TOOLS

__all__ = [
    "BURST_BUCKET",
    "CAPTURE_LEAD",
    "EMBEDDING_DIMENSIONS",
    "ESCALATE",
    "ESCALATION_REASONS",
    "WIDGET_TOOLS",
    "BurstPass",
    "ChatMessage",
    "ChatResult",
    "ChatStream",
    "Role",
    "StreamedChat",
    "ToolCall",
    "admit_burst",
    "chat",
    "close_clients",
    "embed",
    "embed_then",
    "online",
    "open_chat_stream",
]

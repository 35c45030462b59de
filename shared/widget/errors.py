"""The widget's own problem types. Every message here is written for the visitor's browser.

Nothing in a detail depends on why a lookup failed: an unknown, disabled and rotated-out key share
``WidgetNotFound``, and a missing, forged, expired or foreign visitor token shares
``ConversationNotFound``, so neither answer is an oracle.
"""

from __future__ import annotations

from shared.errors import Conflict, DomainError, Forbidden, NotFound


class WidgetNotFound(NotFound):
    type_slug = "widget-not-found"
    title = "Widget not found"

    def __init__(self) -> None:
        super().__init__("No widget is available at this address.")


class ConversationNotFound(NotFound):
    type_slug = "conversation-not-found"
    title = "Conversation not found"

    def __init__(self) -> None:
        super().__init__("This conversation does not exist or has expired; start a new one without a visitor token.")


class OriginNotAllowed(Forbidden):
    type_slug = "origin-not-allowed"
    title = "This website may not use this widget"

    def __init__(self) -> None:
        super().__init__("The widget's owner has not allowed it on this website.")


class ConversationClosed(Conflict):
    type_slug = "conversation-closed"
    title = "Conversation closed"

    def __init__(self) -> None:
        super().__init__("The team has closed this conversation; start a new one without a visitor token.")


class ConversationFull(Conflict):
    type_slug = "conversation-full"
    title = "Conversation too long"

    def __init__(self, limit: int) -> None:
        super().__init__(f"A conversation holds at most {limit} messages; start a new one without a visitor token.")


class AgentUnavailable(DomainError):
    """The agent cannot answer right now (the organization's budget or burst limit): nothing was stored.

    503 with ``Retry-After``: the message was not processed, so the widget may send it again later
    without duplicating it in the transcript. The detail is the sentence to show the visitor; it
    never says why (a customer's spending is not the visitor's business).
    """

    status = 503
    type_slug = "agent-unavailable"
    title = "The agent is unavailable right now"

    def __init__(self, retry_after_seconds: int) -> None:
        self.retry_after_seconds = max(1, int(retry_after_seconds))
        super().__init__(
            "Sorry, I can't answer right now. Please try again a little later.",
            headers={"Retry-After": str(self.retry_after_seconds)},
        )

"""What can go wrong with a connection, in two vocabularies.

Provider outcomes (`ProviderFailure` and its subclasses) are what a live call to Slack, Discord,
GitHub, Notion or a custom endpoint taught us; each message is written by us from the status code
and the provider's documented error code, never copied from a response body, so it is safe to show.
The delivery worker turns them into retry decisions; the API turns them into problems (below).
"""

from __future__ import annotations

from shared.errors import Unprocessable


class ProviderFailure(Exception):
    """A live call did not succeed. ``message`` is safe to show the customer."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        self.message = message
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class CredentialRejected(ProviderFailure):
    """The credential or its target no longer works (revoked, deleted, not shared, wrong scope,
    or refused by the egress guard): the connection is broken and retrying cannot help."""


class RequestRejected(ProviderFailure):
    """The provider refused this one message (validation, a redirect): the delivery is dead, the
    connection stays active."""


class ProviderUnavailable(ProviderFailure):
    """A transient failure (timeout, network, 429, 5xx): retry later."""


class ConnectionVerificationFailed(Unprocessable):
    type_slug = "connection-verification-failed"
    title = "The connection could not be verified"


class InvalidConnectionTarget(Unprocessable):
    type_slug = "invalid-connection"
    title = "The connection settings are not valid"

"""Why a destination was refused: enumerated reasons, the exception, and the one denial log line.

Every refusal in the egress guard goes through `deny()`, so the log line, the exception's `reason` and
(later) the problem `type` and counters all speak the same enumerated vocabulary (smokescreen's
`decision_reason` approach).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from shared.logs import DECISION_REASON, get_logger

# Its own logger under "hiredhands", rendered by the project's JSON formatter as one line.
logger = get_logger("hiredhands.egress")

# Log field names: module constants so the log, dashboards and tests agree on them.
LOG_REASON: Final = DECISION_REASON
LOG_HOST: Final = "egress_host"
LOG_ADDRESS: Final = "egress_address"
LOG_PORT: Final = "egress_port"
LOG_RANGE: Final = "egress_range"
LOG_PURPOSE: Final = "egress_purpose"
LOG_STAGE: Final = "egress_stage"


class EgressReason(StrEnum):
    """Machine-readable reason codes. Stable: they name problem types and log fields."""

    SCHEME = "scheme"
    PORT = "port"
    MALFORMED_URL = "malformed_url"
    USERINFO = "userinfo"
    AMBIGUOUS_HOST = "ambiguous_host"
    INTERNAL_NAME = "internal_name"
    PRIVATE_ADDRESS = "private_address"
    METADATA = "metadata"
    UNRESOLVABLE = "unresolvable"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    RESPONSE_TOO_LARGE = "response_too_large"


class Stage(StrEnum):
    """Where the refusal happened; logged, never shown to the customer."""

    SAVE = "save"  # check_url, when a customer saves a URL
    SEND = "send"  # every request the guarded client sends, each redirect hop included
    CONNECT = "connect"  # the moment a socket is about to be opened
    REDIRECT = "redirect"
    RESPONSE = "response"


# Shown to the customer: each names the rule, never what we resolved or what sits behind it.
CUSTOMER_MESSAGES: Final[dict[EgressReason, str]] = {
    EgressReason.SCHEME: "Only http and https URLs are allowed.",
    EgressReason.PORT: "This URL uses a port that is not allowed; use a standard web port such as 443.",
    EgressReason.MALFORMED_URL: (
        "This URL could not be read unambiguously; check it for spaces, backslashes or control characters."
    ),
    EgressReason.USERINFO: "URLs with a user name or password before the host are not accepted.",
    EgressReason.AMBIGUOUS_HOST: "Write the host as a domain name or a standard dotted IP address.",
    EgressReason.INTERNAL_NAME: "This host name is reserved for private networks and cannot be reached.",
    EgressReason.PRIVATE_ADDRESS: (
        "This URL points to a private, loopback, link-local or reserved network address, which is not allowed."
    ),
    EgressReason.METADATA: "This URL points to a cloud metadata service, which is not allowed.",
    EgressReason.UNRESOLVABLE: "This host name could not be resolved.",
    EgressReason.TOO_MANY_REDIRECTS: "The URL redirected more times than allowed.",
    EgressReason.RESPONSE_TOO_LARGE: "The response was larger than the allowed size.",
}


class EgressDenied(Exception):
    """A customer-supplied destination was refused.

    `reason` is the machine-readable code; `str(exc)` is safe to show the customer. The host, the
    resolved address and the matched range are deliberately not carried here: they go to the log only.
    """

    def __init__(self, reason: EgressReason) -> None:
        self.reason = reason
        self.message = CUSTOMER_MESSAGES[reason]
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type[EgressDenied], tuple[EgressReason]]:
        return (EgressDenied, (self.reason,))  # rebuilt from the reason, not from the message


def deny(
    reason: EgressReason,
    *,
    purpose: str,
    stage: Stage,
    host: str | None = None,
    address: str | None = None,
    port: int | None = None,
    matched: str | None = None,
) -> EgressDenied:
    """Log one structured line for the refusal and return the exception to raise.

    Only the host is logged, never the URL: a Slack or Discord webhook's path is its credential, and
    userinfo is refused before anything would log it.
    """
    logger.warning(
        "egress denied",
        extra={
            "fields": {
                LOG_REASON: reason.value,
                LOG_HOST: host,
                LOG_ADDRESS: address,
                LOG_PORT: port,
                LOG_RANGE: matched,
                LOG_PURPOSE: purpose,
                LOG_STAGE: stage.value,
            }
        },
    )
    return EgressDenied(reason)

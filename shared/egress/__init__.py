"""Egress guard: customer-supplied URLs never reach private networks, loopback, link-local or metadata.

Every request to a URL a customer supplied goes through `guarded_client()`; `check_url()` is the
save-time check. Policy and reason codes: docs/egress.md.
"""

from shared.egress.checks import Resolver, SystemResolver, check_url
from shared.egress.client import guarded_client
from shared.egress.errors import CUSTOMER_MESSAGES, EgressDenied, EgressReason
from shared.egress.policy import DEFAULT_PORTS, SCAN_POLICY, WEBHOOK_POLICY, EgressPolicy

__all__ = [
    "CUSTOMER_MESSAGES",
    "DEFAULT_PORTS",
    "SCAN_POLICY",
    "WEBHOOK_POLICY",
    "EgressDenied",
    "EgressPolicy",
    "EgressReason",
    "Resolver",
    "SystemResolver",
    "check_url",
    "guarded_client",
]

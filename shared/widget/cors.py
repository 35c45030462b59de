"""The widget's origin policy and its CORS headers, per agent.

Browsers send ``Origin`` with every cross-origin request and with every POST. The rules:

* ``Origin`` present and in the agent's ``allowed_origins``: served, with CORS headers for that
  origin (and ``Vary: Origin``), errors included, so the widget can read a 429's ``Retry-After``.
* ``Origin`` present and not allowed (an empty list allows no website): 403 ``origin-not-allowed``
  without CORS headers, so the page's script cannot read even that.
* No ``Origin`` (a server, a mobile app, curl): served without CORS headers while the agent allows
  no website; refused once it names any, so a restricted agent is only reached by clients that claim
  one of its origins.

This stops other websites from embedding an agent. It is not an abuse control: any client outside
a browser can send whatever ``Origin`` it likes. The per-agent and per-visitor rate limits and the
organization's monthly budget are the controls (docs/widget.md).

Origins compare exactly after normalisation (lowercase, no trailing slash, no default port): no
wildcards, so ``https://example.com`` does not admit ``https://evil.example.com``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.widget.errors import OriginNotAllowed

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "authorization, content-type"
EXPOSED_HEADERS = "retry-after, x-request-id"
PREFLIGHT_MAX_AGE_SECONDS = 600
MAX_ORIGIN_CHARS = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in canonical form; ``None`` when ``value`` is not an origin."""
    value = value.strip()
    if not value or len(value) > MAX_ORIGIN_CHARS:
        return None
    try:
        parts = urlsplit(value.rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class OriginDecision:
    origin: str | None
    """The origin to grant CORS to; ``None`` when the request had no ``Origin``."""

    def headers(self) -> dict[str, str]:
        """Headers for every response to this request (actual requests, errors included)."""
        if self.origin is None:
            return {"Vary": "Origin"}
        return {
            "Access-Control-Allow-Origin": self.origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }

    def preflight_headers(self) -> dict[str, str]:
        return {
            **self.headers(),
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
        }


def decide(origin_header: str | None, allowed_origins: Iterable[str]) -> OriginDecision:
    """Apply the policy above; raises ``OriginNotAllowed``."""
    allowed = {normalized for item in allowed_origins if (normalized := normalize_origin(item)) is not None}
    if origin_header is None:
        if allowed:
            raise OriginNotAllowed()
        return OriginDecision(None)
    origin = normalize_origin(origin_header)
    if origin is None or origin not in allowed:
        raise OriginNotAllowed()
    return OriginDecision(origin)

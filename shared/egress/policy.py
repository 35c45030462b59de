"""EgressPolicy: what one purpose (webhook delivery, site scan, ...) may reach, and how patiently.

Set in code only. There is deliberately no constructor from the environment: an operator flag that
widens the guard is how other products lost it (firecrawl#4419, Dify's SSRF_PROXY_ALLOW_*).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

from shared.egress.ranges import METADATA_ADDRESSES, IPAddress

DEFAULT_SCHEMES: Final = frozenset({"http", "https"})
# 80/443 are the web; 8080/8443 are the conventional alternates customers run self-hosted webhook
# receivers and staging sites on. Everything else stays closed so the guard cannot be used to talk
# to mail, database or cache ports of third parties (cross-protocol abuse, port scans).
DEFAULT_PORTS: Final = frozenset({80, 443, 8080, 8443})
SCHEME_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

_ADDRESS_PORT = re.compile(r"^\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<v6port>\d{1,5})$|^(?P<v4>[0-9.]+):(?P<v4port>\d{1,5})$")


def _parse_exception(text: str) -> tuple[IPAddress, int]:
    match = _ADDRESS_PORT.match(text)
    if match is None:
        raise ValueError(f"allow_addresses entries are exact 'ip:port' or '[ipv6]:port', got {text!r}")
    address = ipaddress.ip_address(match["v6"] or match["v4"])
    port = int(match["v6port"] or match["v4port"])
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    if address in METADATA_ADDRESSES:
        # No purpose needs a metadata service; refuse to build a policy that could reach one.
        raise ValueError(f"{text!r} is a cloud metadata address and can never be allowed")
    return address, port


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressPolicy:
    """Frozen, so one instance can be shared by every client of a purpose."""

    purpose: str = "unspecified"  # logged with every denial ("webhook", "scan", ...)
    allowed_schemes: frozenset[str] = DEFAULT_SCHEMES
    allowed_ports: frozenset[int] = DEFAULT_PORTS
    # 0 = never follow: a webhook's 3xx comes back to the caller as a failed delivery.
    max_redirects: int = 0
    connect_timeout: float = 5.0  # also bounds the DNS lookup
    read_timeout: float = 15.0  # per read and per write, not per response
    max_response_bytes: int = 5 * 1024 * 1024  # raw and decoded, so a gzip bomb stops too
    # Exact 'ip:port' destinations allowed despite the table and the port list (tests' loopback
    # servers). Exact on purpose: no CIDRs, no host names, never a metadata address.
    allow_addresses: frozenset[str] = frozenset()
    _exceptions: frozenset[tuple[IPAddress, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Copy into frozensets: a caller's mutable set must not be able to widen the policy later.
        for name in ("allowed_schemes", "allowed_ports", "allow_addresses"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} is a set, not a string")
            object.__setattr__(self, name, frozenset(value))
        unsupported = self.allowed_schemes - DEFAULT_SCHEMES
        if unsupported:
            raise ValueError(f"the guarded client speaks only http and https, not {sorted(unsupported)}")
        if any(not 0 < port < 65536 for port in self.allowed_ports):
            raise ValueError("allowed_ports must be between 1 and 65535")
        if not 0 <= self.max_redirects <= 20:
            raise ValueError("max_redirects must be between 0 and 20")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_response_bytes <= 0:
            raise ValueError("max_response_bytes must be positive")
        exceptions = frozenset(_parse_exception(entry) for entry in self.allow_addresses)
        object.__setattr__(self, "_exceptions", exceptions)

    def is_excepted(self, address: IPAddress, port: int) -> bool:
        return (address, port) in self._exceptions

    def port_may_be_allowed(self, port: int) -> bool:
        """Before DNS: could any destination on this port pass (listed port or an exact exception)?"""
        return port in self.allowed_ports or any(port == excepted for _, excepted in self._exceptions)


# Presets for the two purposes the product has. Webhooks never follow redirects (a 3xx is a recorded
# delivery failure); scans follow a few, each hop re-checked.
WEBHOOK_POLICY: Final = EgressPolicy(purpose="webhook")
SCAN_POLICY: Final = EgressPolicy(purpose="scan", max_redirects=5)

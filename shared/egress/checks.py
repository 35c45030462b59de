"""URL and destination checks shared by save time (`check_url`) and send time (the guarded client).

One parser for both: httpx.URL. What it hands the socket layer (`raw_host`, already IDNA-encoded and
lowercased) is what we judge, so a Unicode dot or an upper-case host cannot look different to us than
to the connection. Anything that other parsers (browsers, glibc) could read differently is refused
rather than interpreted.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
import httpx

from shared.egress.errors import EgressReason, Stage, deny
from shared.egress.policy import SCHEME_DEFAULT_PORTS, EgressPolicy
from shared.egress.ranges import METADATA_NAMES, IPAddress, classify_address

MAX_URL_LENGTH: Final = 2048

# Names only private DNS answers: RFC 6761/6762 special-use names, ICANN's .internal, and the RFC 6762
# appendix G names ICANN will not delegate (corp, home, lan, ...).
_INTERNAL_NAME: Final = re.compile(r"(?:^|\.)(?:localhost|local|internal|intranet|private|corp|home|lan|home\.arpa)$")
_HOST_CHARS: Final = re.compile(r"^[a-z0-9._-]+$")
# WHATWG and glibc treat a host whose last label is a number as an IPv4 address (decimal, 0x-hex,
# octal, with 1 to 4 parts), so such a host must be an exact dotted quad or nothing.
_NUMERIC_LABEL: Final = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_DOTTED_QUAD: Final = re.compile(
    r"^(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$"
)


class Resolver(Protocol):
    """Turns a host name into IP address strings. Tests inject their own; production uses the system's."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """getaddrinfo in a worker thread (anyio), so the event loop never blocks on DNS."""

    async def resolve(self, host: str, port: int) -> list[str]:
        answers = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(sockaddr[0]) for _family, _type, _proto, _canon, sockaddr in answers]


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # ASCII, as the connection will use it; IPv6 without brackets
    port: int
    literal: IPAddress | None  # set when the host is an IP literal: no DNS involved


def classify_host(host: str, *, policy: EgressPolicy, stage: Stage) -> IPAddress | None:
    """Refuse host spellings we will not interpret; return the address if the host is an IP literal."""
    if ":" in host:  # httpx only lets a bracketed IPv6 literal through with a colon in the host
        if "%" in host:  # zone ids ("fe80::1%25eth0") select an interface: never a public destination
            raise deny(EgressReason.AMBIGUOUS_HOST, purpose=policy.purpose, stage=stage, host=host)
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise deny(EgressReason.MALFORMED_URL, purpose=policy.purpose, stage=stage, host=host) from None
    if not _HOST_CHARS.match(host):  # e.g. percent-encoding, which some resolvers decode
        raise deny(EgressReason.AMBIGUOUS_HOST, purpose=policy.purpose, stage=stage, host=host)
    name = host.removesuffix(".")  # one trailing dot is a fully qualified name, nothing more
    labels = name.split(".")
    if not name or "" in labels or len(name) > 253 or any(len(label) > 63 for label in labels):
        raise deny(EgressReason.MALFORMED_URL, purpose=policy.purpose, stage=stage, host=host)
    if _NUMERIC_LABEL.match(labels[-1]):
        if name == host and _DOTTED_QUAD.match(host):
            return ipaddress.IPv4Address(host)
        raise deny(EgressReason.AMBIGUOUS_HOST, purpose=policy.purpose, stage=stage, host=host)
    if name in METADATA_NAMES:
        raise deny(EgressReason.METADATA, purpose=policy.purpose, stage=stage, host=host)
    # Single-label names are completed with the machine's search domains: internal by construction.
    if "." not in name or _INTERNAL_NAME.search(name):
        raise deny(EgressReason.INTERNAL_NAME, purpose=policy.purpose, stage=stage, host=host)
    return None


def vet_url(url: httpx.URL, *, policy: EgressPolicy, stage: Stage) -> Target:
    """The checks that need no DNS: scheme, userinfo, host spelling, port."""
    scheme = url.scheme
    if scheme not in policy.allowed_schemes:
        raise deny(EgressReason.SCHEME, purpose=policy.purpose, stage=stage)
    if url.userinfo:
        # "https://good.example@127.0.0.1/" reads as good.example to a person; and credentials in a
        # URL end up in logs. Refused before the host is even looked at.
        raise deny(EgressReason.USERINFO, purpose=policy.purpose, stage=stage)
    host = url.raw_host.decode("ascii")
    if not host:
        raise deny(EgressReason.MALFORMED_URL, purpose=policy.purpose, stage=stage)
    literal = classify_host(host, policy=policy, stage=stage)
    port = url.port if url.port is not None else SCHEME_DEFAULT_PORTS[scheme]
    if not policy.port_may_be_allowed(port):
        raise deny(EgressReason.PORT, purpose=policy.purpose, stage=stage, host=host, port=port)
    return Target(host=host, port=port, literal=literal)


def _check_address(address: IPAddress, *, host: str, port: int, policy: EgressPolicy, stage: Stage) -> None:
    if policy.is_excepted(address, port):
        return
    if port not in policy.allowed_ports:
        raise deny(EgressReason.PORT, purpose=policy.purpose, stage=stage, host=host, address=str(address), port=port)
    block = classify_address(address)
    if block is not None:
        reason = EgressReason.METADATA if block.metadata else EgressReason.PRIVATE_ADDRESS
        raise deny(
            reason,
            purpose=policy.purpose,
            stage=stage,
            host=host,
            address=str(address),
            port=port,
            matched=block.label,
        )


async def vet_destination(host: str, port: int, *, policy: EgressPolicy, resolver: Resolver, stage: Stage) -> list[str]:
    """Resolve `host` once and return the addresses that may be connected to, or refuse.

    If any answer is refused, the whole answer set is: a name that resolves to an internal address
    among public ones is an attack signal, not something to route around. DNS failure refuses.
    """
    literal = classify_host(host, policy=policy, stage=stage)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            with anyio.fail_after(policy.connect_timeout):
                answers = await resolver.resolve(host, port)
            addresses = [ipaddress.ip_address(answer) for answer in answers]
        except (OSError, TimeoutError, UnicodeError, ValueError):
            raise deny(EgressReason.UNRESOLVABLE, purpose=policy.purpose, stage=stage, host=host, port=port) from None
        if not addresses:
            raise deny(EgressReason.UNRESOLVABLE, purpose=policy.purpose, stage=stage, host=host, port=port)
    for address in addresses:
        _check_address(address, host=host, port=port, policy=policy, stage=stage)
    return list(dict.fromkeys(str(address) for address in addresses))


async def check_url(url: str, *, policy: EgressPolicy | None = None, resolver: Resolver | None = None) -> None:
    """Save-time check: parse, normalise, resolve, and raise EgressDenied if the URL may not be used.

    Stricter than send time on the raw string, because only here do we see what the customer typed.
    """
    policy = policy or EgressPolicy()
    # Backslashes and control characters are where URL parsers disagree ("a\\@b" is host b to RFC 3986,
    # host a to WHATWG); tabs and newlines are silently dropped by browsers.
    if len(url) > MAX_URL_LENGTH or "\\" in url or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise deny(EgressReason.MALFORMED_URL, purpose=policy.purpose, stage=Stage.SAVE)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise deny(EgressReason.MALFORMED_URL, purpose=policy.purpose, stage=Stage.SAVE) from None
    target = vet_url(parsed, policy=policy, stage=Stage.SAVE)
    await vet_destination(
        target.host, target.port, policy=policy, resolver=resolver or SystemResolver(), stage=Stage.SAVE
    )

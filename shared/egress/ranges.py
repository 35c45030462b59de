"""The address table: every destination that is not globally routable unicast, and why.

Built from the IANA IPv4 and IPv6 Special-Purpose Address Registries plus the multicast registries,
not from `ipaddress.is_private` / `is_global`: their answers changed between 3.11, 3.12.4 and 3.13, and
on every version 100.64.0.0/10 is neither private nor global. One row per range; the label goes to the
denial log so a refusal says which row matched.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Block:
    metadata: bool  # True: a cloud metadata service (its own reason code), False: a non-global range
    label: str  # for the log only


def _v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def _v6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


# Cloud metadata endpoints. Most sit inside ranges the table already refuses; they are listed so
# that a probe for credentials is logged as such. Azure's WireServer is a public-looking address that
# no range would catch. On AWS Lambda (under Vercel) the runtime API is on loopback, refused below.
METADATA_ADDRESSES: Final[dict[IPAddress, str]] = {
    _v4("169.254.169.254"): "instance metadata (AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack, Hetzner)",
    _v4("169.254.170.2"): "AWS ECS task metadata and credentials",
    _v4("169.254.170.23"): "AWS EKS Pod Identity credentials",
    _v4("169.254.0.23"): "Tencent Cloud metadata",
    _v4("169.254.42.42"): "Scaleway metadata",
    _v4("100.100.100.200"): "Alibaba Cloud metadata",
    _v4("192.0.0.192"): "Oracle Cloud legacy metadata",
    _v4("168.63.129.16"): "Azure WireServer",
    _v6("fd00:ec2::254"): "AWS instance metadata (IPv6)",
    _v6("fd00:ec2::23"): "AWS EKS Pod Identity credentials (IPv6)",
}

# Host names that reach metadata services through the platform's resolver (or its search domains).
METADATA_NAMES: Final[frozenset[str]] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
        "metadata.packet.net",
    }
)

_IPV4_TABLE: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        ("255.255.255.255/32", "limited broadcast"),
        ("0.0.0.0/8", "this network (RFC 791)"),
        ("10.0.0.0/8", "private use (RFC 1918)"),
        ("100.64.0.0/10", "shared address space / carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private use (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
        ("192.0.2.0/24", "documentation TEST-NET-1"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
        ("192.168.0.0/16", "private use (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("198.51.100.0/24", "documentation TEST-NET-2"),
        ("203.0.113.0/24", "documentation TEST-NET-3"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (class E)"),
    )
)

_IPV6_TABLE: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation (RFC 8215)"),
        ("100::/64", "discard-only (RFC 6666)"),
        ("100:0:0:1::/64", "dummy prefix (RFC 9780)"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation (RFC 9637)"),
        ("5f00::/16", "segment routing SIDs (RFC 9602)"),
        ("fc00::/7", "unique local (RFC 4193)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "deprecated site-local"),
        ("ff00::/8", "multicast"),
    )
)

# Everything outside 2000::/3 is not global unicast (IANA has allocated no other unicast space).
_IPV6_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]] | None:
    """IPv6 forms that carry an IPv4 address, which they are judged by (the packet ends up there)."""
    as_int = int(ip)
    low32 = ipaddress.IPv4Address(as_int & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", (ip.ipv4_mapped,)
    if as_int >> 32 == 0xFFFF0000:
        return "IPv4-translated (SIIT)", (low32,)
    if ip in _NAT64:
        return "NAT64", (low32,)
    if ip.sixtofour is not None:
        return "6to4", (ip.sixtofour,)
    if ip.teredo is not None:
        return "Teredo", ip.teredo  # (server, client): both must be acceptable
    if as_int >> 32 == 0 and as_int > 1:  # :: and ::1 have their own rows
        return "IPv4-compatible", (low32,)
    return None


def _classify_v4(ip: ipaddress.IPv4Address) -> Block | None:
    if ip in METADATA_ADDRESSES:
        return Block(metadata=True, label=METADATA_ADDRESSES[ip])
    for network, label in _IPV4_TABLE:
        if ip in network:
            return Block(metadata=False, label=f"{network} {label}")
    return None


def _classify_v6(ip: ipaddress.IPv6Address) -> Block | None:
    plain = ipaddress.IPv6Address(int(ip))  # drop any %scope before comparing
    if plain in METADATA_ADDRESSES:
        return Block(metadata=True, label=METADATA_ADDRESSES[plain])
    for network, label in _IPV6_TABLE[:2]:  # :: and ::1 before unwrapping, for an exact label
        if plain in network:
            return Block(metadata=False, label=f"{network} {label}")
    embedded = _embedded_ipv4(plain)
    if embedded is not None:
        form, carried = embedded
        for v4 in carried:
            block = _classify_v4(v4)
            if block is not None:
                return Block(metadata=block.metadata, label=f"{form} {v4}: {block.label}")
        return None
    for network, label in _IPV6_TABLE[2:]:
        if plain in network:
            return Block(metadata=False, label=f"{network} {label}")
    if plain not in _IPV6_GLOBAL_UNICAST:
        return Block(metadata=False, label="outside 2000::/3 global unicast")
    return None


def classify_address(ip: IPAddress) -> Block | None:
    """Return why `ip` may not be reached, or None if it is globally routable unicast."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _classify_v4(ip)
    return _classify_v6(ip)

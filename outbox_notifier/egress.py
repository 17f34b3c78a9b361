"""The egress guard: which network addresses a provider call may connect to.

Webhook URLs come from rows that applications (and sometimes end users) write, while the
daemon runs inside a trusted network. Without a guard, a channel pointing at
``https://10.0.0.5:6379/`` or ``http://169.254.169.254/`` would make the daemon a port scanner
and a metadata fetcher for whoever can write ``notification_channels``.

Usage::

    guard = EgressGuard(allow_cidrs=("10.20.0.0/16",))
    guard.check_address(ipaddress.ip_address("10.20.1.1"), host="hooks.internal")  # passes
    guard.literal_address("127.1")  # raises DestinationForbidden (127.0.0.1 is loopback)

Refused, unless inside an ``allow_cidrs`` range: loopback, RFC 1918 private, CGNAT
(100.64/10), link-local (169.254/16, fe80::/10), unique-local (fc00::/7), multicast,
unspecified, broadcast and reserved ranges, and any IPv6 address that embeds one of those
IPv4 addresses (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64). Always refused, whatever
``allow_cidrs`` says: the cloud metadata addresses and host names, since no webhook lives there.

Numeric host tricks (``127.1``, ``2130706433``, ``0x7f.1``) are read the way the C library
would read them and judged by the address they denote, so they can neither slip past the
guard nor reach a different address than the one checked.

The guard only decides; ``outbox_notifier.httpclient`` applies it at connect time, on the
very addresses the connection is then made to (no second lookup, so DNS rebinding cannot
switch the address between check and connect).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["DestinationForbidden", "EgressGuard", "IPAddress", "parse_cidrs"]

# Cloud metadata services: refused even inside an allowed range (AWS, GCP, Azure, OpenStack
# on 169.254.169.254; AWS over IPv6; Alibaba; Oracle).
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})

# Belt and braces next to ipaddress's own ``is_global``: the ranges the issue names, so a
# change in a Python release cannot quietly open one of them.
_FORBIDDEN_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fc00::/7", "unique-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

# A host made only of digits, hex letters, ``x`` and dots may be an address in one of the
# legacy numeric forms inet_aton accepts.
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


class DestinationForbidden(Exception):
    """The egress guard refused a destination; no connection was made.

    Not an ``OSError`` on purpose: the HTTP library must not mistake it for a network
    failure (and retry, or wrap it); the shared sender maps it to the permanent error code
    ``destination_forbidden``. The message names the host and the kind of address, never a
    URL path, so it is safe for ``last_error``.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"egress guard refused {host[:100]!r}: {reason}; nothing was sent")
        self.host = host
        self.reason = reason


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Networks from ``values`` (``10.0.0.0/8``, ``fd00::/8``, or a bare address).

    Raises ``ValueError`` naming the bad entry; host bits set are an error too, since
    ``10.1.2.3/8`` more likely means a typo than ``10.0.0.0/8``.
    """
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR range ({exc})") from None
    return tuple(networks)


class EgressGuard:
    """Decides whether a provider call may connect to an address (see the module docstring)."""

    def __init__(self, allow_cidrs: Iterable[str] = ()) -> None:
        self.allowed_networks = parse_cidrs(allow_cidrs)

    def literal_address(self, host: str) -> IPAddress | None:
        """The checked address a literal or numeric host denotes; None for a DNS name.

        Raises ``DestinationForbidden`` for a refused address or a metadata host name.
        """
        bare = host.strip("[]").rstrip(".").lower()
        if bare in _METADATA_NAMES:
            raise DestinationForbidden(host, "cloud metadata host name")
        address = _numeric_address(bare)
        if address is not None:
            self.check_address(address, host=host)
        return address

    def check_address(self, address: IPAddress, *, host: str) -> None:
        """Raise ``DestinationForbidden`` unless a connection to ``address`` is allowed."""
        reason = self.refusal(address)
        if reason is not None:
            raise DestinationForbidden(host, reason)

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` is refused (e.g. ``"loopback address"``), or None when allowed."""
        if address in _METADATA_ADDRESSES:
            return "cloud metadata address"
        embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
        if embedded is not None and embedded in _METADATA_ADDRESSES:
            return "cloud metadata address"
        if self._allowed(address) or (embedded is not None and self._allowed(embedded)):
            return None
        if embedded is not None:
            inner = _category(embedded)
            return None if inner is None else f"IPv6 address embedding a {inner} IPv4 address"
        what = _category(address)
        return None if what is None else f"{what} address"

    def _allowed(self, address: IPAddress) -> bool:
        return any(
            address.version == net.version and address in net for net in self.allowed_networks
        )


def _numeric_address(host: str) -> IPAddress | None:
    """The address a host written as a number denotes, in any form the C library accepts."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not _NUMERIC_HOST.fullmatch(host) or not any(c.isdigit() for c in host):
        return None
    try:
        # inet_aton reads 127.1, 2130706433, 0x7f.1 and 0177.0.0.1 like getaddrinfo would.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _category(address: IPAddress) -> str | None:
    """The kind of non-public address ``address`` is, or None for a public one."""
    for network, what in _FORBIDDEN_NETWORKS:
        if address.version == network.version and address in network:
            return what
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-public"
    return None

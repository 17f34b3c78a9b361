"""The egress guard's decisions: which addresses and hosts a provider call may reach."""

from __future__ import annotations

import ipaddress

import pytest

from outbox_notifier.egress import DestinationForbidden, EgressGuard, parse_cidrs
from outbox_notifier.names import PERMANENT_ERROR_CODES, ErrorCode

GUARD = EgressGuard()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback address"),
        ("127.255.0.9", "loopback address"),
        ("::1", "loopback address"),
        ("10.0.0.1", "private address"),
        ("172.16.5.4", "private address"),
        ("192.168.1.1", "private address"),
        ("100.64.0.1", "shared (CGNAT) address"),
        ("100.127.255.254", "shared (CGNAT) address"),
        ("169.254.1.1", "link-local address"),
        ("169.254.169.254", "cloud metadata address"),
        ("fd00:ec2::254", "cloud metadata address"),
        ("fe80::1", "link-local address"),
        ("fc00::1", "unique-local address"),
        ("fd12:3456::1", "unique-local address"),
        ("224.0.0.1", "multicast address"),
        ("ff02::1", "multicast address"),
        ("0.0.0.0", "unspecified address"),
        ("::", "unspecified address"),
        ("255.255.255.255", "reserved address"),
        ("240.0.0.1", "reserved address"),
        ("192.0.2.1", "non-public address"),  # documentation range
        ("::ffff:127.0.0.1", "IPv6 address embedding a loopback IPv4 address"),
        ("::ffff:10.1.2.3", "IPv6 address embedding a private IPv4 address"),
        ("::127.0.0.1", "IPv6 address embedding a loopback IPv4 address"),
        ("::ffff:169.254.169.254", "cloud metadata address"),
        ("2002:7f00:1::", "IPv6 address embedding a loopback IPv4 address"),  # 6to4
        ("64:ff9b::a00:1", "IPv6 address embedding a private IPv4 address"),  # NAT64
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert GUARD.refusal(ipaddress.ip_address(address)) == reason
    with pytest.raises(DestinationForbidden, match="nothing was sent"):
        GUARD.check_address(ipaddress.ip_address(address), host=address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "101.0.0.1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert GUARD.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_numeric_host_tricks_are_read_as_the_address_they_denote(host: str, address: str) -> None:
    with pytest.raises(DestinationForbidden):
        GUARD.literal_address(host)
    allowing = EgressGuard(("127.0.0.0/8", "10.0.0.0/8", "::1/128"))
    if address != "169.254.169.254":
        assert allowing.literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "host", ["metadata.google.internal", "METADATA.GOOGLE.INTERNAL.", "metadata"]
)
def test_metadata_names_are_refused_whatever_the_allow_list(host: str) -> None:
    with pytest.raises(DestinationForbidden, match="cloud metadata host name"):
        EgressGuard(("0.0.0.0/0", "::/0")).literal_address(host)


def test_metadata_addresses_are_refused_even_inside_an_allowed_range() -> None:
    guard = EgressGuard(("169.254.0.0/16",))
    assert guard.refusal(ipaddress.ip_address("169.254.1.1")) is None
    assert guard.refusal(ipaddress.ip_address("169.254.169.254")) == "cloud metadata address"


@pytest.mark.parametrize("host", ["open.feishu.cn", "hooks.example", "deadbeef", "a1.b2"])
def test_dns_names_are_left_to_the_resolver(host: str) -> None:
    assert GUARD.literal_address(host) is None


def test_allow_list_admits_only_its_ranges() -> None:
    guard = EgressGuard(("10.20.0.0/16", "fd00:1::/32"))
    assert guard.refusal(ipaddress.ip_address("10.20.3.4")) is None
    assert guard.refusal(ipaddress.ip_address("::ffff:10.20.3.4")) is None
    assert guard.refusal(ipaddress.ip_address("fd00:1::5")) is None
    assert guard.refusal(ipaddress.ip_address("10.21.0.1")) == "private address"
    assert guard.refusal(ipaddress.ip_address("127.0.0.1")) == "loopback address"


@pytest.mark.parametrize("value", ["10.0.0.1/8", "not-a-range", "10.0.0.0/33", ""])
def test_bad_cidrs_are_refused_with_the_entry_named(value: str) -> None:
    with pytest.raises(ValueError, match="is not a CIDR range"):
        parse_cidrs([value])


def test_destination_forbidden_is_a_permanent_public_code() -> None:
    assert str(ErrorCode.DESTINATION_FORBIDDEN) == "destination_forbidden"
    assert ErrorCode.DESTINATION_FORBIDDEN in PERMANENT_ERROR_CODES
    assert not issubclass(DestinationForbidden, OSError)

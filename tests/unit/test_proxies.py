"""garin/proxies.py: who the client is behind a trusted proxy."""

from __future__ import annotations

import pytest

from garin.proxies import TrustedProxies, address_of, client_address, peer_name

LOCAL = TrustedProxies.parse("127.0.0.1,::1")


@pytest.mark.parametrize(
    ("peer", "xff", "fwd", "client"),
    [
        # Not trusted: headers ignored, whatever they say.
        ("203.0.113.9", "198.51.100.1", None, "203.0.113.9"),
        ("203.0.113.9", None, "for=198.51.100.1", "203.0.113.9"),
        # Trusted, no header: the proxy is the client.
        ("127.0.0.1", None, None, "127.0.0.1"),
        # The rightmost untrusted hop is the client.
        ("127.0.0.1", "198.51.100.1", None, "198.51.100.1"),
        ("127.0.0.1", "10.0.0.1, 198.51.100.1", None, "198.51.100.1"),
        ("127.0.0.1", "198.51.100.1, 127.0.0.1", None, "198.51.100.1"),
        # Every hop trusted: the leftmost.
        ("127.0.0.1", "127.0.0.1, ::1", None, "127.0.0.1"),
        # Forwarded (RFC 7239) wins over X-Forwarded-For; quotes, ports, v6.
        ("127.0.0.1", "198.51.100.1", "for=192.0.2.60;proto=https", "192.0.2.60"),
        ("127.0.0.1", None, 'for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ("127.0.0.1", None, "for=192.0.2.43, for=198.51.100.17", "198.51.100.17"),
        ("127.0.0.1", "192.0.2.5:1234", None, "192.0.2.5"),
        # Garbage or hidden hops: nothing to believe.
        ("127.0.0.1", "unknown", None, "127.0.0.1"),
        ("127.0.0.1", None, "for=_hidden", "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1, not-an-ip", None, "127.0.0.1"),
        ("127.0.0.1", "", None, "127.0.0.1"),
        # An IPv4-mapped proxy address is trusted as its IPv4 address.
        ("::ffff:127.0.0.1", "198.51.100.1", None, "198.51.100.1"),
    ],
)
def test_client_address(peer: str, xff: str | None, fwd: str | None, client: str) -> None:
    assert client_address(peer, LOCAL, xff, fwd) == client


def test_networks_and_everyone() -> None:
    nets = TrustedProxies.parse("10.0.0.0/8, 2001:db8::/32")
    assert nets.trusts("10.1.2.3") and nets.trusts("2001:db8::1") and not nets.trusts("11.0.0.1")
    assert client_address("10.9.9.9", nets, "198.51.100.1, 10.0.0.2", None) == "198.51.100.1"
    everyone = TrustedProxies.parse("*")
    assert everyone.trusts("203.0.113.1")
    assert client_address("203.0.113.1", everyone, "198.51.100.1", None) == "198.51.100.1"


@pytest.mark.parametrize("text", ["localhost", "10.0.0.0/33", "1.2.3"])
def test_bad_entries_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        TrustedProxies.parse(text)


def test_peer_names_round_trip() -> None:
    assert address_of(peer_name("198.51.100.1", 5000, None)) == "198.51.100.1"
    assert address_of(peer_name("198.51.100.1", 5000, "127.0.0.1")) == "198.51.100.1"
    assert address_of(peer_name("2001:db8::1", 5000, "::1")) == "2001:db8::1"

"""Who the client is behind a reverse proxy, as a pure function.

Theory of operation
-------------------
Behind nginx or Caddy (TLS usually ends there) every connection comes from
the proxy's address, which would put every user under one per-address limit
and one log address. A proxy says who it forwards for in `X-Forwarded-For`
(`client, proxy1, proxy2`) or RFC 7239 `Forwarded` (`for=client;proto=https,
for=proxy1`); anybody can send those headers, so they are believed only
from a trusted peer (GARIN_FORWARDED_ALLOW_IPS, as uvicorn's
`--forwarded-allow-ips`). The list is read from the right, the hop nearest
to us: each trusted address in it is skipped, and the first untrusted one is
the client. If every hop is trusted, the leftmost is the client. With no
usable header the peer itself is the client. `Forwarded` wins over
`X-Forwarded-For` when both are present.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Addresses whose forwarding headers are believed; `everyone`: all (*)."""

    networks: tuple[Network, ...] = ()
    everyone: bool = False

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """`127.0.0.1,10.0.0.0/8,::1` or `*`; ValueError names a bad entry."""
        networks: list[Network] = []
        everyone = False
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                everyone = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network like 10.0.0.0/8") from None
        return cls(tuple(networks), everyone)

    def trusts(self, address: str) -> bool:
        if self.everyone:
            return True
        ip = _ip(address)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def _forwarded_for(header: str) -> list[str]:
    """The `for=` values of an RFC 7239 Forwarded header, left to right."""
    hops = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, eq, value = pair.strip().partition("=")
            if eq and name.strip().lower() == "for":
                hops.append(value.strip())
    return hops


def client_address(
    peer: str, trusted: TrustedProxies, x_forwarded_for: str | None, forwarded: str | None
) -> str:
    """The client's address for `peer`'s request (see the module's docstring)."""
    if not (forwarded or x_forwarded_for) or not trusted.trusts(peer):
        return peer  # headers first: most connections have none (no address to parse)
    hops: Sequence[str]
    if forwarded:
        hops = _forwarded_for(forwarded)
    else:
        assert x_forwarded_for is not None
        hops = [hop.strip() for hop in x_forwarded_for.split(",")]
    addresses = [ip for ip in (_ip(hop) for hop in hops)]
    if not addresses or any(ip is None for ip in addresses):
        return peer  # "unknown", an obfuscated name, garbage: nothing to believe
    for ip in reversed(addresses):
        assert ip is not None
        if not trusted.trusts(str(ip)):
            return str(ip)
    first = addresses[0]
    assert first is not None
    return str(first)


def peer_name(client: str, port: int, proxy: str | None) -> str:
    """How a connection is named in logs and hand-overs: `address:port`, and
    ` via PROXY` when a trusted proxy forwarded it (the port is the proxy's)."""
    return f"{client}:{port}" if proxy is None else f"{client}:{port} via {proxy}"


def address_of(peer: str) -> str:
    """The client address in a `peer_name`."""
    return peer.partition(" ")[0].rpartition(":")[0]

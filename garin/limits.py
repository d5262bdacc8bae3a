"""How many connections one router holds: in all, and per client address.

Theory of operation
-------------------
The router calls `admit(address)` as it accepts a TCP connection and, if that
returned None, `release(address)` once the connection is gone. Counting starts
at accept, not at the end of the WebSocket handshake, so sockets that never
finish their handshake count too (until GARIN_HANDSHAKE_TIMEOUT drops them). A
refused connection is not counted: the shell completes its handshake only to
close it with the returned `Close`, bounded by the same timeout.

A refused connection is answered (the handshake completed, then a close
frame that a browser shows its page) only while fewer than `max_refusing`
refusals are under way (`start_refusal` / `end_refusal`), each bounded by a
short timeout in the shell; past that a refused connection is dropped at
once. So one address opening sockets in a loop holds at most its limit plus
that many descriptors, and cannot starve the others.

The per-client limit is checked first: when both apply, "too many connections"
is the one the client can do something about.

With several routers (`--routers N`) the per-client limit is the host's:
`admit` adds what the other routers hold of that client
(garin/clientcounts.py, `elsewhere`), and every change to this router's
counts is passed on (`add`). The total stays per router.

Addresses are grouped by who controls them: an IPv4 address is one client; an
IPv6 client is its /64, since one host is usually handed a whole /64 and could
otherwise open each connection from a new address; an IPv4-mapped IPv6 address
is its IPv4 address. Behind a reverse proxy every client has the proxy's
address, so there the per-client limit must be raised or turned off (0).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Protocol

from garin import closes
from garin.closes import Close


class OtherRouters(Protocol):
    def elsewhere(self, key: str) -> int:
        """Connections of client `key` the other routers hold."""
        ...

    def add(self, key: str, delta: int) -> None:
        """This router holds `delta` more (or fewer) of `key`'s connections."""
        ...


@functools.lru_cache(maxsize=4096)  # asked at every accept and release; clients come back
def client_key(address: str) -> str:
    """The name under which `address` is counted: the IPv4 address or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# Refusals answered at once, per router: enough for a burst of clients over
# a limit to be told why, few enough that refused sockets cannot exhaust
# descriptors.
MAX_REFUSING = 64


class ConnectionLimits:
    def __init__(
        self, max_total: int, max_per_client: int, max_refusing: int = MAX_REFUSING, others: OtherRouters | None = None
    ) -> None:
        """0 turns a limit off (but for max_refusing: 0 answers no refusal).
        `others`: the other routers' counts, for the per-client limit."""
        self.others = others
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_refusing = max_refusing
        self.total = 0
        self.refusing = 0
        self._held: dict[str, int] = {}
        # Of those, admitted with per_client=False (a trusted proxy's).
        self._proxied: dict[str, int] = {}

    def start_refusal(self) -> bool:
        """May a refused connection be answered with a close frame? If True,
        call `end_refusal` when it is gone."""
        if self.refusing >= self.max_refusing:
            return False
        self.refusing += 1
        return True

    def end_refusal(self) -> None:
        if self.refusing <= 0:
            raise ValueError("end_refusal() without start_refusal()")
        self.refusing -= 1

    def held(self, address: str) -> int:
        """Connections counted for `address`'s client."""
        return self._held.get(client_key(address), 0)

    @property
    def clients(self) -> int:
        """Distinct clients holding at least one connection."""
        return len(self._held)

    def admit(self, address: str, per_client: bool = True) -> Close | None:
        """Count a new connection from `address`, or say why it is refused (not
        counted). `per_client=False`: a trusted proxy, whose connections carry
        many clients; only the total applies until `readdress` names the client."""
        key = client_key(address)
        held = self._held.get(key, 0)
        if per_client and 0 < self.max_per_client <= held + self._elsewhere(key):
            return closes.TOO_MANY_CONNECTIONS
        if 0 < self.max_total <= self.total:
            return closes.SERVER_FULL
        self._change(key, 1, shared=per_client)
        self.total += 1
        return None

    def _elsewhere(self, key: str) -> int:
        return 0 if self.others is None else self.others.elsewhere(key)

    def _change(self, key: str, delta: int, shared: bool) -> None:
        """`key` holds `delta` more (or fewer) connections here. Not `shared`
        with the other routers: a trusted proxy's, which carry many clients
        and would count against whoever shares their bucket there."""
        held = self._held.get(key, 0) + delta
        if held:
            self._held[key] = held
        else:
            del self._held[key]
        if not shared:
            proxied = self._proxied.get(key, 0) + delta
            if proxied:
                self._proxied[key] = proxied
            else:
                del self._proxied[key]
        elif self.others is not None:
            self.others.add(key, delta)

    def readdress(self, old: str, new: str) -> Close | None:
        """A connection counted under `old` (a proxy) is `new`'s (the client it
        forwards): count it there, or say why not (it stays under `old`)."""
        if client_key(old) == client_key(new):
            return None
        key = client_key(new)
        if 0 < self.max_per_client <= self._held.get(key, 0) + self._elsewhere(key):
            return closes.TOO_MANY_CONNECTIONS
        self.release(old)
        self._change(key, 1, shared=True)
        self.total += 1
        return None

    def release(self, address: str) -> None:
        """An admitted connection from `address` is gone."""
        key = client_key(address)
        held = self._held.get(key, 0)
        if held == 0:
            raise ValueError(f"release({address!r}): no admitted connection is counted for it")
        # A key with proxied connections releases those first (a proxy and
        # its clients share a key only within one IPv6 /64).
        self._change(key, -1, shared=key not in self._proxied)
        self.total -= 1

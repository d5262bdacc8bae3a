"""The router's accepted sockets carry TCP_NODELAY without a setsockopt per
connection: set on the listening socket, Linux copies it to each accepted one."""

from __future__ import annotations

import socket

import trio

from garin.router.server import _no_delay


async def test_accepted_sockets_inherit_no_delay_from_the_listener() -> None:
    listeners = _no_delay(await trio.open_tcp_listeners(0, host="127.0.0.1"))
    listener = listeners[0].socket
    client = trio.socket.socket()
    try:
        await client.connect(listener.getsockname())
        accepted, peer = await listener.accept()
        with accepted:
            assert peer == client.getsockname()
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        listener.close()


async def test_without_it_accepted_sockets_would_have_nagle_on() -> None:
    """What the test above guards against: no option, no TCP_NODELAY."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0].socket
    client = trio.socket.socket()
    try:
        await client.connect(listener.getsockname())
        accepted, _ = await listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    finally:
        client.close()
        listener.close()

"""The router's accepted sockets carry TCP_NODELAY and a fixed SO_SNDBUF
without a setsockopt per connection: set on the listening socket, Linux
copies them to each accepted one."""

from __future__ import annotations

import socket

import trio

from garin.router.server import _tune


async def test_accepted_sockets_inherit_no_delay_and_the_send_buffer_from_the_listener() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    _tune(listeners, 100_000)
    listener = listeners[0].socket
    client = trio.socket.socket()
    try:
        await client.connect(listener.getsockname())
        accepted, peer = await listener.accept()
        with accepted:
            assert peer == client.getsockname()
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 200_000  # Linux doubles it
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
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != 200_000
    finally:
        client.close()
        listener.close()

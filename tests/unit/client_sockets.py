"""Real client sockets for router tests: a server-side ClientWebSocket past
its upgrade, and the client's end of a socketpair to read what it was sent."""

from __future__ import annotations

import socket

import trio

from garin.websocket import ClientWebSocket

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def read_available(peer: socket.socket) -> list[bytes]:
    """Every recv() that returns data now, one entry per read."""
    reads = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return reads
        if not chunk:
            return reads
        reads.append(chunk)


async def open_client(
    nursery: trio.Nursery, max_outbox_bytes: int = 1 << 20, send_buffer: int | None = None
) -> tuple[ClientWebSocket, socket.socket]:
    """An accepted connection (its 101 answer already read) and the client's
    end (non-blocking); `send_buffer` shrinks the server side's SO_SNDBUF."""
    ours, peer = socket.socketpair()
    if send_buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    peer.setblocking(False)
    ws = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), nursery, 1 << 16, max_outbox_bytes)
    peer.sendall(UPGRADE)
    request = await ws.handshake()
    assert request is not None
    ws.accept(request)
    await trio.sleep(0)
    assert b"".join(read_available(peer)).startswith(b"HTTP/1.1 101 ")
    return ws, peer

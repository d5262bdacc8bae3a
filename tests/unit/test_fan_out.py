"""router.websocket.fan_out: one write per member per scheduler pass for the
first frame, the rest of a burst coalesced into one more write, in order."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio

from garin import closes
from router.frames import text_frame
from router.websocket import ClientWebSocket, fan_out

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


@pytest.fixture
async def members() -> AsyncIterator[list[tuple[ClientWebSocket, socket.socket]]]:
    out = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            ours, peer = socket.socketpair()
            peer.setblocking(False)
            ws = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), nursery, 1 << 16, 1 << 20)
            peer.sendall(UPGRADE)
            request = await ws.handshake()
            assert request is not None
            ws.accept(request)
            await trio.sleep(0)
            assert b"101" in b"".join(read_available(peer))
            out.append((ws, peer))
        yield out
        for ws, peer in out:
            ws.hang_up()
            peer.close()


async def test_a_burst_in_one_pass_reaches_each_member_in_two_writes_in_order(
    members: list[tuple[ClientWebSocket, socket.socket]],
) -> None:
    room = list(enumerate(ws for ws, _ in members))
    frames = [text_frame(f'{{"n":{i}}}'.encode()) for i in range(5)]
    for frame in frames:
        fan_out(room, frame, exclude=-1)
    # Within the pass only the first frame went out.
    for _, peer in members:
        assert read_available(peer) == [frames[0]]
    await trio.sleep(0)  # the pass ends: the flusher writes the rest at once
    for _, peer in members:
        assert read_available(peer) == [b"".join(frames[1:])]
    # A new pass writes directly again.
    fan_out(room, frames[0], exclude=1)
    assert read_available(members[0][1]) == [frames[0]]
    assert read_available(members[1][1]) == []


async def test_frames_held_for_the_pass_end_are_dropped_once_the_member_closes(
    members: list[tuple[ClientWebSocket, socket.socket]],
) -> None:
    ws, peer = members[0]
    room = [(0, ws)]
    fan_out(room, text_frame(b'{"n":1}'), exclude=-1)
    fan_out(room, text_frame(b'{"n":2}'), exclude=-1)
    ws.kick(closes.TOO_SLOW)  # closing: only the close frame may follow
    await trio.sleep(0)
    assert read_available(peer) == [text_frame(b'{"n":1}')]

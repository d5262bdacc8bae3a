"""garin.websocket.fan_out: one write per member per scheduler pass for the
first frame, the rest of a burst coalesced into one more write, in order."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from garin import closes
from garin.frames import text_frame
from garin.websocket import ClientWebSocket, fan_out
from .client_sockets import open_client, read_available

@pytest.fixture
async def members() -> AsyncIterator[list[tuple[ClientWebSocket, socket.socket]]]:
    out = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            out.append(await open_client(nursery))
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


async def test_a_held_burst_too_big_for_the_socket_reaches_the_member_without_any_other_event() -> None:
    # The rest of a partly written burst goes to a drain task started from the
    # flusher; it must run at once, not at some unrelated later event.
    small, big = text_frame(b'{"n":0}'), text_frame(b"x" * 60000)
    token = trio.lowlevel.current_trio_token()
    received = trio.Event()

    def read_all(peer: socket.socket) -> None:
        got = 0
        while got < len(small) + len(big):
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        token.run_sync_soon(received.set)

    async with trio.open_nursery() as nursery:
        ws, peer = await open_client(nursery, max_outbox_bytes=1 << 24, send_buffer=4096)
        peer.setblocking(True)
        threading.Thread(target=read_all, args=(peer,), daemon=True).start()
        fan_out([(0, ws)], small, exclude=-1)
        fan_out([(0, ws)], big, exclude=-1)  # held for the pass end, then partly written
        with trio.fail_after(10):  # a hang guard: without the fix, this expires
            await received.wait()
        ws.hang_up()
        peer.close()


async def test_close_sends_the_frames_held_in_this_pass_before_the_close_frame(
    members: list[tuple[ClientWebSocket, socket.socket]],
) -> None:
    ws, peer = members[0]
    room = [(0, ws)]
    first, second = text_frame(b'{"n":1}'), text_frame(b'{"n":2}')
    fan_out(room, first, exclude=-1)
    fan_out(room, second, exclude=-1)
    peer.shutdown(socket.SHUT_WR)  # the peer hangs up after our close frame
    await ws.close(closes.IDLE_TIMEOUT)
    data = b"".join(read_available(peer))
    assert data.startswith(first + second)
    assert data[len(first + second)] == 0x88  # then the close frame


async def test_a_burst_to_members_that_do_not_read_queues_the_shared_frames_not_a_copy_each() -> None:
    # K senders of large messages into a room of K that never read: a copy of
    # the burst per member made the shard's memory grow with K squared.
    # The first frame fits the socket; the others are held for the pass end.
    frames = [text_frame(b"hi")] + [text_frame(b"x" * 20000 + str(i).encode()) for i in range(12)]
    async with trio.open_nursery() as nursery:
        room = [await open_client(nursery, max_outbox_bytes=1 << 24, send_buffer=4096) for _ in range(3)]
        for frame in frames:
            fan_out(list(enumerate(ws for ws, _ in room)), frame, exclude=-1)
        await trio.sleep(0)  # the pass ends: the held frames are written or queued
        for ws, peer in room:
            outbox = ws._outbox
            assert outbox, "the small socket buffer cannot take 240 KB"
            assert ws.outbox_bytes == sum(len(item) for item in outbox)
            for item in outbox:
                # The frame itself, or the unwritten tail of it.
                assert any(item is frame or (isinstance(item, memoryview) and item.obj is frame) for frame in frames)
            ws.hang_up()
            peer.close()


async def test_a_burst_past_the_outbox_bound_kicks_a_member_that_does_not_read() -> None:
    frame = text_frame(b"y" * 30000)
    async with trio.open_nursery() as nursery:
        ws, peer = await open_client(nursery, max_outbox_bytes=100_000, send_buffer=4096)
        fan_out([(0, ws)], text_frame(b"hi"), exclude=-1)  # fits: the rest of the pass is held
        for _ in range(10):  # 300 KB more in the same pass
            fan_out([(0, ws)], frame, exclude=-1)
        assert ws.kicked == closes.TOO_SLOW  # at the bound, not at the pass's end
        await trio.sleep(0)
        assert ws.outbox_bytes < len(frame)  # at most a partly written frame's tail
        ws.hang_up()
        peer.close()


async def test_a_burst_bigger_than_the_outbox_bound_is_written_before_the_pass_ends_whole_and_in_order() -> None:
    # Held frames are bounded like queued ones: past the bound they are
    # written at once (a member whose socket takes them is not too slow).
    frames = [text_frame(b"%d" % i + b"z" * 25000) for i in range(12)]  # 300 KB
    async with trio.open_nursery() as nursery:
        ws, peer = await open_client(nursery, max_outbox_bytes=100_000, send_buffer=1 << 20)
        for frame in frames:
            fan_out([(0, ws)], frame, exclude=-1)
        got = b"".join(read_available(peer))
        assert len(got) > 100_000  # before the pass's end
        await trio.sleep(0)
        got += b"".join(read_available(peer))
        assert got == b"".join(frames)
        assert ws.kicked is None
        ws.hang_up()
        peer.close()

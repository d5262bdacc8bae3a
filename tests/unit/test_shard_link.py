"""router.shard_link: batches flushed per scheduler pass reach a real Unix socket
whole and in order, even when the shard reads slowly; a link that breaks relinks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from garin import wire
from router import shard_link
from router.outbox import LinkState
from router.shard_link import ShardLink


class FakeShard:
    """A Unix listener that welcomes one router link at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.decoder = wire.Decoder()
        self.pending: list[wire.WireMessage] = []

    async def accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        stream = await listener.accept()
        self.decoder = wire.Decoder()
        hello = await self.receive(stream)
        assert isinstance(hello, wire.Hello)
        await stream.send_all(wire.encode(wire.Welcome(wire.PROTOCOL_VERSION, hello.shard_index)))
        # A router replays its members (none here) first.
        assert await self.receive(stream) == wire.Replayed()
        return stream

    async def receive(self, stream: trio.SocketStream) -> wire.WireMessage:
        while not self.pending:
            data = await stream.receive_some(1 << 16)
            assert data, "router closed the link"
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)


async def listen(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    return trio.SocketListener(sock)


@contextlib.asynccontextmanager
async def running_link(
    tmp_path: Path, on_unavailable: Callable[[int], int] = lambda index: 0, hold_bytes: int = 1 << 24
) -> AsyncIterator[tuple[ShardLink, FakeShard, trio.SocketListener]]:
    """A listening fake shard and a running link to it; cancelled and closed after."""
    path = tmp_path / "shard-0.sock"
    listener = await listen(path)
    link = ShardLink(0, path, "router-t", 1, lambda message: None, on_unavailable, hold_bytes, 10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        yield link, FakeShard(path), listener
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_a_backlog_bigger_than_the_socket_buffer_arrives_whole_and_in_order(tmp_path: Path) -> None:
    body = "x" * 1000
    count = 3000  # ~3 MB: far more than a Unix socket buffer takes at once
    async with running_link(tmp_path) as (link, shard, listener):
        stream = await shard.accept(listener)
        for member in range(count):
            assert link.send(wire.Publish(member, body))
        await trio.sleep(0.05)  # the shard is not reading: the rest waits in the link
        assert link._tail is not None  # the kernel took part; the writer task holds the rest
        with trio.fail_after(10):
            for member in range(count):
                assert await shard.receive(stream) == wire.Publish(member, body)
        # The link keeps working after the backlog.
        link.send(wire.Publish(count, "after"))
        with trio.fail_after(10):
            assert await shard.receive(stream) == wire.Publish(count, "after")
    await stream.aclose()


async def test_one_pass_leaves_in_one_write(tmp_path: Path) -> None:
    async with running_link(tmp_path) as (link, shard, listener):
        stream = await shard.accept(listener)
        await trio.sleep(0.01)
        link.send(wire.Publish(1, "a"))
        link.send(wire.Publish(2, "b"))
        with trio.fail_after(5):
            data = await stream.receive_some(1 << 16)
        # Both messages came in one read: they were written together.
        assert list(wire.Decoder().feed(data)) == [wire.Publish(1, "a"), wire.Publish(2, "b")]
    await stream.aclose()


async def test_a_broken_link_relinks_and_sends_what_was_queued(tmp_path: Path) -> None:
    async with running_link(tmp_path) as (link, shard, listener):
        first = await shard.accept(listener)
        await first.aclose()  # the shard dies
        with trio.fail_after(5):
            while link.connected:
                await trio.sleep(0.01)
        link.send(wire.Publish(7, "held"))  # held while down
        second = await shard.accept(listener)
        with trio.fail_after(5):
            assert await shard.receive(second) == wire.Publish(7, "held")
    await second.aclose()


async def test_a_shard_that_stops_reading_is_dropped_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_link, "MAX_LINK_QUEUE_BYTES", 1 << 20)
    closing: list[int] = []
    async with running_link(tmp_path, lambda index: closing.append(index) or 3, 1 << 16) as (link, shard, listener):
        stream = await shard.accept(listener)  # linked, then it never reads again
        sent = 0
        with trio.fail_after(10):
            while link.connected:
                link.send(wire.Publish(sent, "x" * 1000))
                sent += 1
                if sent % 100 == 0:
                    await trio.sleep(0)
        # Over 1 MiB was queued (a socket buffer's worth went to the kernel):
        # the link dropped, and with more than the hold bound queued, the
        # shard's clients are closed at once.
        assert sent * 1000 > 1 << 20
        assert closing == [0]
        assert link.outbox.state is LinkState.UNAVAILABLE
    await stream.aclose()

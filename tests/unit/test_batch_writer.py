"""garin.batch_writer: one write per scheduler pass, backlog in order, errors raised."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from garin.batch_writer import BatchWriter, LinkOverflow

from .client_sockets import read_available


@pytest.fixture
async def pair() -> AsyncIterator[tuple[trio.socket.SocketType, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    ours = trio.socket.from_stdlib_socket(a)
    try:
        yield ours, b
    finally:
        ours.close()
        b.close()


async def test_one_pass_is_one_write(pair: tuple[trio.socket.SocketType, socket.socket]) -> None:
    ours, peer = pair
    writer = BatchWriter(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        writer.send(b"a")
        writer.send(b"bc")
        assert writer.queued == 3
        await trio.sleep(0)  # the pass ends: the flusher writes
        assert writer.queued == 0
        # Both messages arrived, and as one write (one recv sees them all).
        assert peer.recv(100) == b"abc"
        writer.send(b"d")
        await trio.sleep(0)
        assert peer.recv(100) == b"d"
        nursery.cancel_scope.cancel()
    writer.close()


async def test_backlog_goes_out_in_order_when_the_peer_reads(pair: tuple[trio.socket.SocketType, socket.socket]) -> None:
    ours, peer = pair
    writer = BatchWriter(ours)
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for i in range(64):  # far more than a socket buffer
            writer.send(chunk)
            sent += chunk
            await trio.sleep(0)
        assert writer.queued > 0
        received = b""
        with trio.fail_after(10):
            while len(received) < len(sent):
                received += b"".join(read_available(peer))
                await trio.sleep(0.001)
        assert received == sent
        assert writer.queued == 0
        nursery.cancel_scope.cancel()
    writer.close()


async def test_a_broken_peer_raises_from_run(pair: tuple[trio.socket.SocketType, socket.socket]) -> None:
    ours, peer = pair
    writer = BatchWriter(ours)
    peer.close()
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.send(b"x")
            await trio.sleep_forever()
    assert info.group_contains(trio.BrokenResourceError)
    writer.close()


async def test_overflow_raises_link_overflow(pair: tuple[trio.socket.SocketType, socket.socket]) -> None:
    ours, peer = pair
    writer = BatchWriter(ours, max_queued_bytes=10, peer="router 7")
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.send(b"x" * 11)
            await trio.sleep_forever()
    assert info.group_contains(LinkOverflow, match="router 7 is not reading")
    writer.close()


async def test_overflow_while_the_writer_waits_on_a_full_socket_ends_the_link(
    pair: tuple[trio.socket.SocketType, socket.socket],
) -> None:
    ours, peer = pair  # the peer never reads
    writer = BatchWriter(ours, max_queued_bytes=1 << 20, peer="router 7")
    reader_error: list[BaseException] = []

    async def reader() -> None:  # the link's reader, waiting for the peer
        try:
            await trio.lowlevel.wait_readable(ours)
        except trio.ClosedResourceError as exc:
            reader_error.append(exc)

    with trio.fail_after(5), pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            nursery.start_soon(reader)
            while writer._tail is None:  # until the kernel buffer is full
                writer.send(b"x" * 65536)
                await trio.sleep(0)
            await trio.sleep(0.05)  # the writer task now waits for writability
            for _ in range(20):  # 1.25 MiB more: past the bound
                writer.send(b"y" * 65536)
            await trio.sleep_forever()
    assert info.group_contains(LinkOverflow, match="router 7 is not reading")
    assert len(reader_error) == 1
    writer.close()


async def test_closed_writer_never_writes(pair: tuple[trio.socket.SocketType, socket.socket]) -> None:
    ours, peer = pair
    writer = BatchWriter(ours)
    writer.send(b"lost")
    writer.close()
    writer.send(b"also lost")
    await trio.sleep(0)
    assert b"".join(read_available(peer)) == b""


async def test_an_unexpected_flush_error_fails_only_that_link(
    pair: tuple[trio.socket.SocketType, socket.socket],
) -> None:
    ours, peer = pair
    broken = BatchWriter(ours)
    healthy_ours, healthy_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    healthy_ours.setblocking(False)
    healthy_trio = trio.socket.from_stdlib_socket(healthy_ours)
    healthy = BatchWriter(healthy_trio)
    try:
        broken.send("not bytes")  # type: ignore[arg-type]  # join() raises TypeError in the flusher
        healthy.send(b"ok")
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broken.run)
                await trio.sleep(0)
                # The flusher survived: the other link still flushes.
                assert healthy_peer.recv(10) == b"ok"
                await trio.sleep_forever()
        assert info.group_contains(trio.BrokenResourceError)
    finally:
        broken.close()
        healthy.close()
        healthy_trio.close()
        healthy_peer.close()


async def test_a_partial_flush_finishes_without_any_other_event() -> None:
    # The flusher runs after trio chose how long to wait for I/O: the writer
    # task it wakes must run now, not at some unrelated later event. Here
    # nothing else happens: a reader thread drains the socket and reports back.
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    data = b"x" * 300_000
    token = trio.lowlevel.current_trio_token()
    received = trio.Event()

    def read_all() -> None:
        got = 0
        while got < len(data):
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        token.run_sync_soon(received.set)

    writer = BatchWriter(trio.socket.from_stdlib_socket(ours))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.sleep(0)
            threading.Thread(target=read_all, daemon=True).start()
            writer.send(data)
            with trio.fail_after(10):  # a hang guard: without the fix, this expires
                await received.wait()
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        peer.close()

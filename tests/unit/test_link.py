"""garin.link: wire messages and client sockets over a real Unix socketpair."""

from __future__ import annotations

import array
import contextlib
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from garin import wire
from garin.link import DRAIN_TIMEOUT_S, LOST, Link, LinkClosed, receive_first
from garin.wire import Adopt, Ended, Hello, Ping, Pong, Refuse, Welcome, WireError, WireMessage


def adopt(conn: int, frames: tuple[object, ...] = ()) -> Adopt:
    session = ("in_room", None, -0.5, -0.5, None, "lobby", f"user{conn}", None, 0.0)
    return Adopt(conn, "router-0", "10.0.0.1:4000", None, None, "lobby", f"user{conn}", session, frames, 123.5)


def link_pair() -> tuple[Link, Link]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Link(trio.socket.from_stdlib_socket(a)), Link(trio.socket.from_stdlib_socket(b))


@pytest.fixture
async def links() -> AsyncIterator[tuple[Link, Link]]:
    router, shard = link_pair()
    yield router, shard
    router.close()
    shard.close()


@pytest.fixture
def client_pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Socketpairs standing in for clients: [0] travels, [1] is the client's end."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    yield pairs
    for a, b in pairs:
        a.close()
        b.close()


def new_client(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    pairs.append((a, b))
    return a, b


async def receive_n(link: Link, n: int) -> list[tuple[WireMessage, int | None]]:
    out: list[tuple[WireMessage, int | None]] = []
    with trio.fail_after(5):
        while len(out) < n:
            out.extend(await link.receive())
    return out


def works(fd: int, other_end: socket.socket, marker: bytes) -> None:
    """`fd` is a socket whose peer is `other_end`: write through it, read there."""
    sock = socket.socket(fileno=fd)
    try:
        sock.sendall(marker)
        assert other_end.recv(100) == marker
        other_end.sendall(marker[::-1])
        assert sock.recv(100) == marker[::-1]
    finally:
        sock.close()


def is_closed_everywhere(other_end: socket.socket) -> bool:
    """True if the peer of `other_end` has no open descriptor left (EOF)."""
    other_end.settimeout(0.05)
    try:
        return other_end.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False


# -- messages -----------------------------------------------------------------------


async def test_messages_arrive_in_order(links: tuple[Link, Link]) -> None:
    router, shard = links
    sent: list[WireMessage] = [
        Hello(wire.PROTOCOL_VERSION, "router-0", 1, 2, "h"), Welcome(wire.PROTOCOL_VERSION, 1, (3, 4)),
        Refuse("no"), Ping(1), Pong(1, False), *[Ended(i, i % 2 == 0) for i in range(50)],
    ]
    for message in sent:
        await router.send(message)
    got = await receive_n(shard, len(sent))
    assert [m for m, _ in got] == sent
    assert all(fd is None for _, fd in got)


async def test_both_directions(links: tuple[Link, Link]) -> None:
    router, shard = links
    await router.send(Hello(wire.PROTOCOL_VERSION, "r", 0, 1, "h"))
    await shard.send(Welcome(wire.PROTOCOL_VERSION, 0, ()))
    assert await receive_n(shard, 1) == [(Hello(wire.PROTOCOL_VERSION, "r", 0, 1, "h"), None)]
    assert await receive_n(router, 1) == [(Welcome(wire.PROTOCOL_VERSION, 0, ()), None)]


async def test_a_large_adopt_is_sent_whole_with_one_descriptor(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    big = adopt(1, frames=(os.urandom(3 << 20), False, 0, b"", False, None, None, None, 0))
    big_ours, big_client = new_client(client_pairs)
    next_ours, next_client = new_client(client_pairs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.send, big, big_ours.fileno())
        # The big send fills the socket buffer and waits, halfway through.
        await trio.testing.wait_all_tasks_blocked()
        # Other sends meanwhile wait their turn: no bytes in the middle.
        nursery.start_soon(router.send, Ended(9, False))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(router.send, adopt(2), next_ours.fileno())
        await trio.testing.wait_all_tasks_blocked()
        got = await receive_n(shard, 3)
    assert [m for m, _ in got] == [big, Ended(9, False), adopt(2)]
    big_fd, no_fd, next_fd = (fd for _, fd in got)
    assert no_fd is None
    # The descriptor went once, with the first bytes: each Adopt has its own
    # (the next one's is not a copy of the big one's, nor the other way round).
    assert big_fd is not None and next_fd is not None
    works(big_fd, big_client, b"big")
    works(next_fd, next_client, b"next")


# -- descriptors ----------------------------------------------------------------------


async def test_an_adopt_arrives_with_a_working_descriptor(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    ours, client = new_client(client_pairs)
    await router.send(adopt(1), ours.fileno())
    ours.close()  # the sender's copy: the one received must stand alone
    ((message, fd),) = await receive_n(shard, 1)
    assert message == adopt(1)
    assert fd is not None
    works(fd, client, b"hello")


async def test_several_adopts_in_a_row_each_get_their_own_descriptor_in_order(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    clients = []
    for i in range(5):
        ours, client = new_client(client_pairs)
        await router.send(adopt(i), ours.fileno())
        # Interleaved messages without descriptors change nothing.
        await router.send(Ended(100 + i, False))
        clients.append(client)
    for a, _ in client_pairs:
        a.close()
    got = await receive_n(shard, 10)
    assert [m for m, _ in got] == [m for i in range(5) for m in (adopt(i), Ended(100 + i, False))]
    fds = [fd for m, fd in got if isinstance(m, Adopt)]
    assert all(fd is None for m, fd in got if not isinstance(m, Adopt))
    assert len(set(fds)) == 5
    for i, (fd, client) in enumerate(zip(fds, clients)):
        assert fd is not None
        works(fd, client, b"client-%d" % i)


def send_raw(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    """What a Link's send does, by hand: `fd` goes with the first byte of `data`."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    assert sock.sendmsg([data], ancillary) == len(data)


async def test_descriptors_wait_in_order_for_their_messages(
    client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    # The second descriptor arrives before the first Adopt is complete: the
    # first Adopt still gets the first descriptor.
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = Link(trio.socket.from_stdlib_socket(theirs))
    try:
        first_ours, first_client = new_client(client_pairs)
        second_ours, second_client = new_client(client_pairs)
        first, second = wire.encode(adopt(1)), wire.encode(adopt(2))
        send_raw(raw, first[:10], first_ours.fileno())
        with trio.move_on_after(0.1):
            assert await link.receive() == []  # never returns: nothing complete
        send_raw(raw, first[10:] + second, second_ours.fileno())
        got = await receive_n(link, 2)
        assert [m for m, _ in got] == [adopt(1), adopt(2)]
        first_fd, second_fd = (fd for _, fd in got)
        assert first_fd is not None and second_fd is not None
        works(first_fd, first_client, b"first")
        works(second_fd, second_client, b"second")
    finally:
        raw.close()
        link.close()


async def test_an_adopt_without_a_descriptor_is_a_protocol_error(links: tuple[Link, Link]) -> None:
    router, shard = links
    await router.send(adopt(1))
    with trio.fail_after(5), pytest.raises(WireError):
        await shard.receive()


async def test_garbage_on_the_link_is_a_protocol_error() -> None:
    raw_a, raw_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = Link(trio.socket.from_stdlib_socket(raw_b))
    try:
        raw_a.sendall(b"\xc1")
        with trio.fail_after(5), pytest.raises(WireError):
            await link.receive()
    finally:
        raw_a.close()
        link.close()


async def test_close_closes_descriptors_received_but_not_handed_out(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    # A descriptor sent with a message that takes none stays with the link.
    ours, client = new_client(client_pairs)
    await router.send(Ended(1, False), ours.fileno())
    ours.close()
    assert await receive_n(shard, 1) == [(Ended(1, False), None)]
    assert not is_closed_everywhere(client)
    shard.close()
    assert is_closed_everywhere(client)


async def test_close_closes_the_descriptor_of_an_adopt_not_fully_received(
    client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = Link(trio.socket.from_stdlib_socket(theirs))
    try:
        ours, client = new_client(client_pairs)
        data = wire.encode(adopt(1))
        # The first half of an Adopt, with its socket: nothing to hand out yet.
        send_raw(raw, data[: len(data) // 2], ours.fileno())
        ours.close()
        with trio.move_on_after(0.2) as waited:
            await link.receive()
        assert waited.cancelled_caught
        assert not is_closed_everywhere(client)
        link.close()
        assert is_closed_everywhere(client)
    finally:
        raw.close()
        link.close()


async def test_a_descriptor_handed_out_is_not_closed_by_close(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    ours, client = new_client(client_pairs)
    await router.send(adopt(1), ours.fileno())
    ours.close()
    ((_, fd),) = await receive_n(shard, 1)
    assert fd is not None
    shard.close()
    works(fd, client, b"still here")


# -- posting --------------------------------------------------------------------------


async def test_post_and_run_posted_deliver_in_order(links: tuple[Link, Link]) -> None:
    router, shard = links
    with pytest.RaisesGroup(LinkClosed):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(router.run_posted)
            router.post(Ended(1, False))
            router.post(Ended(2, True))
            assert router.posting
            assert await receive_n(shard, 2) == [(Ended(1, False), None), (Ended(2, True), None)]
            await trio.testing.wait_all_tasks_blocked()
            assert not router.posting
            router.post(Ended(3, False))
            assert await receive_n(shard, 1) == [(Ended(3, False), None)]
            # Closing the link ends run_posted with LinkClosed.
            router.close()
    assert not router.posting
    router.post(Ended(4, False))  # ignored once closed
    assert not router.posting


async def test_posted_and_sent_messages_keep_their_order_per_writer(links: tuple[Link, Link]) -> None:
    router, shard = links
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.run_posted)
        router.post(Ended(1, False))
        await trio.testing.wait_all_tasks_blocked()
        await router.send(Ended(2, False))
        assert await receive_n(shard, 2) == [(Ended(1, False), None), (Ended(2, False), None)]
        nursery.cancel_scope.cancel()


# -- closing ----------------------------------------------------------------------------


async def test_a_closed_peer_raises_link_closed(links: tuple[Link, Link]) -> None:
    router, shard = links
    await router.send(Ended(1, False))
    router.close()
    # What was sent before the close still arrives, then the end.
    assert await receive_n(shard, 1) == [(Ended(1, False), None)]
    with trio.fail_after(5), pytest.raises(LinkClosed):
        await shard.receive()


async def test_send_on_a_closed_link_raises_link_closed(links: tuple[Link, Link]) -> None:
    router, shard = links
    router.close()
    assert router.closed
    with pytest.raises(LinkClosed):
        await router.send(Ended(1, False))


async def test_send_to_a_closed_peer_raises_link_closed(links: tuple[Link, Link]) -> None:
    router, shard = links
    shard.close()
    with trio.fail_after(5), pytest.raises(LinkClosed):
        for _ in range(100):
            await router.send(Ended(1, False))
    # Only sending stopped: what the peer sent before it went is still read.
    assert not router.can_send and not router.closed
    with pytest.raises(LinkClosed):
        await router.send(Ended(2, False))
    router.post(Ended(3, False))
    assert not router.posting
    with trio.fail_after(5), pytest.raises(LinkClosed):
        await router.receive()


async def test_a_write_failing_for_another_reason_closes_the_link_at_once(links: tuple[Link, Link]) -> None:
    # Not the peer gone (EPIPE, ECONNRESET): nothing says the end of the
    # stream is coming, so the link is not kept for reading.
    router, shard = links
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # `w` is no descriptor now: sendmsg fails with EBADF
    with pytest.raises(LinkClosed, match="EBADF|Bad file descriptor"):
        await router.send(adopt(1), w)
    assert router.closed


async def test_what_a_peer_sent_before_it_went_is_read_after_a_failed_write(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    # A router hands a client over and exits; the shard, answering a ping
    # before it reads on, finds the router gone: the client is still its
    # own (the failed write closed the link and, with it, the descriptor
    # not read yet: the client was dropped with no close frame).
    router, shard = links
    travelling, client_end = new_client(client_pairs)
    await router.send(Ping(1))
    await router.send(adopt(7), travelling.fileno())
    travelling.close()
    router.close()
    with trio.fail_after(5), pytest.raises(LinkClosed, match="write failed"):
        await shard.send(Pong(1, False))
    messages = await receive_n(shard, 2)
    assert messages[0] == (Ping(1), None)
    message, fd = messages[1]
    assert message == adopt(7) and fd is not None
    works(fd, client_end, b"still here")
    with trio.fail_after(5), pytest.raises(LinkClosed):
        await shard.receive()


async def test_what_a_peer_sent_is_read_though_it_went_with_ours_unread(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    # A router exits with a Pong of ours unread: the kernel then reports
    # ECONNRESET, once, after the data it left us. A receive that read the
    # Adopt and then met that error closed the descriptor with the batch:
    # the client was dropped with no close frame.
    router, shard = links
    travelling, client_end = new_client(client_pairs)
    await shard.send(Pong(1, False))  # never read by the router
    await router.send(Ping(1))
    await router.send(adopt(7), travelling.fileno())
    travelling.close()
    router.close()
    messages = await receive_n(shard, 2)
    assert [message for message, _ in messages] == [Ping(1), adopt(7)]
    fd = messages[1][1]
    assert fd is not None
    works(fd, client_end, b"still here")
    with trio.fail_after(5), pytest.raises(LinkClosed):
        await shard.receive()


async def test_run_posted_gives_the_reader_time_after_a_failed_write(
    links: tuple[Link, Link], autojump_clock: trio.abc.Clock
) -> None:
    # It does not end the link at once (the reader ends it at the end of the
    # stream), nor wait on forever for a peer that somehow did not go.
    router, shard = links
    router.close()
    shard.post(Pong(1, False))
    started = trio.current_time()
    with trio.fail_after(DRAIN_TIMEOUT_S + 5), pytest.raises(LinkClosed, match="write failed"):
        await shard.run_posted()
    assert trio.current_time() - started >= DRAIN_TIMEOUT_S


async def test_close_twice_is_harmless() -> None:
    a, b = link_pair()
    a.close()
    a.close()
    b.close()


# -- the first message ---------------------------------------------------------------------


async def test_receive_first_returns_the_one_message(links: tuple[Link, Link]) -> None:
    router, shard = links
    hello = Hello(wire.PROTOCOL_VERSION, "r", 0, 1, "h")
    await router.send(hello)
    assert await receive_first(shard, 5) == hello


async def test_receive_first_refuses_two_messages(links: tuple[Link, Link]) -> None:
    router, shard = links
    await router.send(Hello(wire.PROTOCOL_VERSION, "r", 0, 1, "h"))
    await router.send(Refuse("extra"))
    with pytest.raises(WireError):
        await receive_first(shard, 5)


async def test_receive_first_refuses_a_descriptor(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    router, shard = links
    ours, _ = new_client(client_pairs)
    await router.send(adopt(1), ours.fileno())
    with pytest.raises(WireError):
        await receive_first(shard, 5)


async def test_receive_first_times_out(links: tuple[Link, Link]) -> None:
    _, shard = links
    with pytest.raises(trio.TooSlowError):
        await receive_first(shard, 0.05)


async def test_receive_first_sees_a_closed_peer(links: tuple[Link, Link]) -> None:
    router, shard = links
    router.close()
    with pytest.raises(LinkClosed):
        await receive_first(shard, 5)


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """This process at its open-files limit meanwhile (EMFILE for any new one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_socket_this_process_cannot_take_is_lost_alone_and_the_link_goes_on(
    links: tuple[Link, Link], client_pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    router, shard = links
    first, _ = new_client(client_pairs)
    await router.send(adopt(1), first.fileno())
    with no_free_descriptors():
        got = await receive_n(shard, 1)
    assert got == [(adopt(1), LOST)]  # once a protocol error that took the whole link down
    second, peer = new_client(client_pairs)
    await router.send(adopt(2), second.fileno())
    ((message, fd),) = await receive_n(shard, 1)
    assert message == adopt(2) and fd not in (None, LOST)
    with socket.socket(fileno=fd) as received:
        received.sendall(b"ok")
        assert peer.recv(2) == b"ok"

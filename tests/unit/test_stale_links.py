"""A hand-off whose link closed a moment ago (its peer restarted, and our
side has not read the end of the stream yet) is sent again on the next link
within the hold, not refused 1013; a stopping process bounds its link sends.

Real sockets in one process: the race a test with processes can only hope
to hit (a send scheduled before the task that reads the link's end) is set
up here with no checkpoint between closing the peer and the send."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from garin import closes, wire
from garin.config import load_config
from garin.connection import Connection
from garin.frames import close_frame
from garin.handoff import adopted_connection, hand_over
from garin.link import SEND_TIMEOUT_S, Link, LinkClosed, receive_first
from garin.router.router import Router
from garin.routing import HASH_NAME
from garin.shard.server import Shard
from .client_sockets import read_available
from .test_connection_handoff import MAX_CHARS, MAX_OUTBOX, ONE, ONE_FRAME, RULES, adopt_now, joined, masked

HOLD_S = 2.0


def env(socket_dir: Path) -> dict[str, str]:
    return {
        "JWT_DECODE_SECRET": "x" * 32, "ALLOWED_ORIGINS": "http://a.test", "GARIN_SHARDS": "1",
        "GARIN_SOCKET_DIR": str(socket_dir), "GARIN_SHARD_HOLD_TIMEOUT": str(HOLD_S),
    }


class FakeShard:
    """Shard 0's socket: welcomes each router link it accepts (`links`)."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.links: list[Link] = []
        self.linked = trio.Event()

    async def run(self) -> None:
        while True:
            stream = await self.listener.accept()
            link = Link(stream.socket)
            hello = await receive_first(link, 5)
            assert isinstance(hello, wire.Hello)
            await link.send(wire.Welcome(wire.PROTOCOL_VERSION, hello.shard_index, ()))
            self.links.append(link)
            self.linked.set()
            self.linked = trio.Event()


async def adopted_on(link: Link) -> tuple[wire.Adopt, int]:
    """The next Adopt on `link` (skipping pings, a welcome) and its descriptor."""
    with trio.fail_after(5):
        while True:
            for message, fd in await link.receive():
                if isinstance(message, wire.Adopt):
                    assert fd is not None
                    return message, fd


@pytest.fixture
async def router_and_shard(tmp_path: Path) -> AsyncIterator[tuple[Router, FakeShard]]:
    router = Router(load_config({}, env(tmp_path)), "0")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(router.config.shard_socket(0)))
    sock.listen(8)
    shard = FakeShard(trio.SocketListener(sock))
    async with trio.open_nursery() as nursery:
        router.background = nursery
        nursery.start_soon(shard.run)
        nursery.start_soon(router.links[0].run)
        with trio.fail_after(5):
            await shard.linked.wait()
            while not router.links[0].connected:
                await trio.sleep(0.01)
        yield router, shard
        nursery.cancel_scope.cancel()
    await shard.listener.aclose()
    for link in shard.links:
        link.close()


async def goes_on(adopt: wire.Adopt, fd: int, client: socket.socket, nursery: trio.Nursery) -> None:
    """The connection the Adopt carries works: what the client sends arrives."""
    adopted = adopted_connection(adopt, fd, RULES, MAX_CHARS, MAX_OUTBOX, nursery)
    try:
        client.sendall(ONE_FRAME)
        with trio.fail_after(5):
            assert await adopted.socket.receive() == ONE
    finally:
        adopted.socket.hang_up()


async def test_router_move_sends_again_on_the_relinked_shard(router_and_shard: tuple[Router, FakeShard]) -> None:
    router, shard = router_and_shard
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        conn.owner = router.instance
        conn.address = "127.0.0.1"
        # The shard restarts: its end closes; the router has not read that yet.
        shard.links[0].close()
        started = trio.current_time()
        assert await router.move(conn) is None
        assert trio.current_time() - started < HOLD_S
        assert conn.id in router.handed
        adopt, fd = await adopted_on(shard.links[1])
        assert adopt.conn == conn.id
        await goes_on(adopt, fd, client, nursery)
        client.close()


async def test_router_forward_sends_again_on_the_relinked_shard(router_and_shard: tuple[Router, FakeShard]) -> None:
    router, shard = router_and_shard
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        # A member another shard passes on, from a router that is gone.
        moving = replace(adopt_now(conn), owner="gone:1")
        fd = socket.dup(conn.socket.socket.fileno())
        conn.socket.hang_up()
        shard.links[0].close()
        await router.forward(moving, fd)
        adopt, received = await adopted_on(shard.links[1])
        assert adopt.owner == router.instance and adopt.conn in router.handed
        await goes_on(adopt, received, client, nursery)
        client.close()


async def test_router_move_gives_up_at_the_hold_from_its_start(tmp_path: Path) -> None:
    # No shard at all: 1013 once the hold has passed, not before.
    router = Router(load_config({}, env(tmp_path)), "0")
    async with trio.open_nursery() as nursery:
        router.background = nursery
        nursery.start_soon(router.links[0].run)
        conn, client = await joined(nursery, after_join=b"")
        started = trio.current_time()
        assert await router.move(conn) == closes.SHARD_UNAVAILABLE
        assert HOLD_S <= trio.current_time() - started < HOLD_S + 1
        conn.socket.hang_up()
        client.close()
        nursery.cancel_scope.cancel()


def link_pair() -> tuple[Link, Link]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Link(trio.socket.from_stdlib_socket(a)), Link(trio.socket.from_stdlib_socket(b))


def moving_conn(conn: Connection, owner: str) -> Connection:
    conn.owner = owner
    conn.room = "elsewhere"
    return conn


async def test_shard_move_takes_another_router_when_the_owners_link_closed(tmp_path: Path) -> None:
    shard = Shard(load_config({}, env(tmp_path)), 0)
    (owner, owner_peer), (other, other_peer) = link_pair(), link_pair()
    shard.routers = {"owner:1": owner, "other:2": other}
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        owner_peer.close()  # the owner router died; our end does not know yet
        assert await shard.move(moving_conn(conn, "owner:1")) is None
        adopt, fd = await adopted_on(other_peer)
        await goes_on(adopt, fd, client, nursery)
        client.close()
    for link in (owner, other, other_peer):
        link.close()


async def test_shard_move_waits_for_a_router_to_link_within_the_hold(tmp_path: Path) -> None:
    shard = Shard(load_config({}, env(tmp_path)), 0)
    owner, owner_peer = link_pair()
    shard.routers = {"owner:1": owner}
    ours, router_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    later = Link(trio.socket.from_stdlib_socket(router_end))
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        owner_peer.close()

        async def relink() -> None:
            # A restarted router links (hello, welcome) while the move waits.
            await trio.sleep(0.3)
            nursery.start_soon(shard.handle_link, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            await later.send(wire.Hello(wire.PROTOCOL_VERSION, "owner:2", 0, 1, HASH_NAME))

        nursery.start_soon(relink)
        started = trio.current_time()
        assert await shard.move(moving_conn(conn, "owner:1")) is None
        assert 0.3 <= trio.current_time() - started < HOLD_S
        adopt, fd = await adopted_on(later)
        await goes_on(adopt, fd, client, nursery)
        client.close()
        later.close()  # ends handle_link
    owner.close()


async def test_shard_move_without_any_router_closes_1013_after_the_hold(tmp_path: Path) -> None:
    shard = Shard(load_config({}, env(tmp_path)), 0)
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        started = trio.current_time()
        assert await shard.move(moving_conn(conn, "owner:1")) == closes.SHARD_UNAVAILABLE
        assert HOLD_S <= trio.current_time() - started < HOLD_S + 1
        conn.socket.hang_up()
        client.close()


async def test_a_stopping_process_cuts_a_send_its_peer_does_not_read() -> None:
    ours, theirs = link_pair()  # `theirs` never reads
    try:
        # More than the socket buffers hold: the send waits for a reader,
        # shielded (up to SEND_TIMEOUT_S) from the cancellation of a stop.
        big = wire.Refuse("x" * (8 << 20))

        async def stop_soon() -> None:
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()  # the process stops: its tasks are cancelled ...
            ours.limit_sends(trio.current_time() + 0.3)  # ... and its link sends bounded

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_soon)
            with pytest.raises(LinkClosed, match="stopping"):
                await ours.send(big)
        assert trio.current_time() - started < 2.0
        assert ours.closed
    finally:
        ours.close()
        theirs.close()


async def test_a_link_made_while_stopping_has_its_sends_bounded_too() -> None:
    ours, theirs = link_pair()
    try:
        ours.limit_sends(trio.current_time() + 0.3)
        started = trio.current_time()
        with pytest.raises(LinkClosed, match="stopping"):
            await ours.send(wire.Refuse("x" * (8 << 20)))
        assert trio.current_time() - started < 2.0
    finally:
        ours.close()
        theirs.close()


async def test_a_hand_off_behind_a_stuck_send_still_hears_the_kick() -> None:
    """At SIGTERM every client waiting to be handed over gets its 1001, also
    one queued behind another send on a link whose peer stopped reading."""
    ours, theirs = link_pair()  # `theirs` never reads
    try:
        async with trio.open_nursery() as nursery:
            conn, client = await joined(nursery, b"")
            with client:

                async def stuck() -> None:
                    with pytest.raises(LinkClosed):  # cut by limit_sends below
                        await ours.send(wire.Refuse("x" * (8 << 20)))  # holds the link

                nursery.start_soon(stuck)
                await trio.sleep(0.1)
                assert ours.busy

                async def kick_soon() -> None:
                    await trio.sleep(0.2)
                    conn.socket.kick(closes.SHUTDOWN)

                nursery.start_soon(kick_soon)
                started = trio.current_time()

                async def link_now() -> Link:
                    return ours

                close = await hand_over(conn, link_now, HOLD_S, lambda: ours)
                conn.socket.hang_up()  # the caller's part
                assert close == closes.SHUTDOWN
                assert trio.current_time() - started < 1.0
                ours.limit_sends(trio.current_time())
                nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()


async def test_a_hand_off_flushing_to_a_client_that_does_not_read_hears_the_kick() -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, b"")
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            while not conn.socket.queued:
                conn.socket.send_bytes(b"\x81\x7e\x10\x00" + b"x" * 4096)  # the client reads nothing

            async def kick_soon() -> None:
                await trio.sleep(0.2)
                conn.socket.kick(closes.SHUTDOWN)

            nursery.start_soon(kick_soon)
            started = trio.current_time()

            async def no_link() -> Link | None:
                raise AssertionError("a kicked client is never sent")

            close = await hand_over(conn, no_link, 30.0)
            conn.socket.hang_up()  # the caller's part
            assert close == closes.SHUTDOWN
            assert trio.current_time() - started < 1.0
            nursery.cancel_scope.cancel()


async def test_no_link_is_given_for_a_retry_after_the_hold(router_and_shard: tuple[Router, FakeShard], tmp_path: Path) -> None:
    """A hand-off sent again after a link send that took long (up to the
    send timeout) gets no link once its hold has passed, even with a link
    up: the client is closed 1013, not handed over late."""
    router, _ = router_and_shard
    now = trio.current_time()
    assert await router.links[0].wait_up(now + HOLD_S) is router.links[0].serving()
    assert await router.links[0].wait_up(now) is None
    shard = Shard(load_config({}, env(tmp_path / "s")), 0)
    ours, theirs = link_pair()
    shard.routers = {"owner:1": ours}
    try:
        assert await shard._router_link("owner:1", now + HOLD_S) is ours
        assert await shard._router_link("owner:1", now) is None
    finally:
        ours.close()
        theirs.close()


async def test_a_hand_off_cut_at_the_shutdown_deadline_still_closes_its_client_1001() -> None:
    """A send cut by `limit_sends` ends at the shutdown deadline, when the
    process's own scope is cancelled too: the client, still ours (a cut send
    gave it to nobody), gets its 1001 before that cancellation ends its task."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours, theirs = Link(trio.socket.from_stdlib_socket(a)), Link(trio.socket.from_stdlib_socket(b))  # `theirs` never reads
    client: socket.socket | None = None
    try:
        async with trio.open_nursery() as nursery:
            # A message begun in the join's write travels with the hand-off:
            # more than the link takes, so its send waits for a reader.
            conn, client = await joined(nursery, masked(1, b"x" * 60_000)[:-100])

            async def next_link() -> Link | None:
                await trio.sleep(HOLD_S)  # the hold, were it waited for
                return None

            async def hand_over_until_stopped(grace: trio.CancelScope) -> None:
                # A connection task in the process's scope, as serve_connection runs it.
                with grace:
                    try:
                        close = await hand_over(conn, next_link, HOLD_S, lambda: ours)
                        assert close == closes.SHUTDOWN
                        await conn.socket.close(close)
                    finally:
                        conn.socket.hang_up()

            grace = trio.CancelScope()
            nursery.start_soon(hand_over_until_stopped, grace)
            await trio.sleep(0.1)
            assert ours.busy  # the send is under way, shielded
            # The process stops: close_all kicks; its grace and its sends end together.
            conn.socket.kick(closes.SHUTDOWN)
            grace.deadline = trio.current_time() + 0.3
            ours.limit_sends(grace.deadline)
        # `theirs` still holds the client's socket (it went with the first
        # bytes), so the client sees only what was written to it.
        assert b"".join(read_available(client)) == close_frame(1001, "server shutting down")
    finally:
        if client is not None:
            client.close()
        ours.close()
        theirs.close()


async def test_a_retry_after_a_send_that_timed_out_past_the_hold_closes_1013(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The owner router stopped reading: the member's move waits out the
    send timeout (30 s), far past its hold. Another router's link is up, but
    the retry is not sent on it: 1013, not a hand-over long after the hold."""
    shard = Shard(load_config({}, env(tmp_path)), 0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stuck, stuck_peer = Link(trio.socket.from_stdlib_socket(a)), Link(trio.socket.from_stdlib_socket(b))  # never reads
    other, other_peer = link_pair()
    shard.routers = {"owner:1": stuck, "other:2": other}
    try:
        async with trio.open_nursery() as nursery:
            # A message begun travels with the hand-off: more than `stuck` takes.
            conn, client = await joined(nursery, masked(1, b"x" * 60_000)[:-100])
            with client:
                started = trio.current_time()
                assert await shard.move(moving_conn(conn, "owner:1")) == closes.SHARD_UNAVAILABLE
                assert trio.current_time() - started >= SEND_TIMEOUT_S > HOLD_S
                assert stuck.closed
                with trio.move_on_after(1) as waited:
                    await other_peer.receive()
                assert waited.cancelled_caught  # nothing went to the other router
                conn.socket.hang_up()
    finally:
        for link in (stuck, stuck_peer, other, other_peer):
            link.close()

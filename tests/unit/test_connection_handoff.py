"""garin.handoff in one process: a connection authenticated and joined on one
side (a router) is handed with its socket over a real Link, and the adopted
connection goes on exactly where the first stopped."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from garin import closes, wire
from garin.connection import Connection
from garin.frames import text_frame
from garin.frames_in import Heard, unmask
from garin.handoff import adopt_message, adopted_connection
from garin.link import Link
from garin.session import CloseClient, JoinRoom, Publish, Session, SessionRules, State
from garin.websocket import ClientWebSocket
from .client_sockets import open_client, read_available

KEY = b"\x37\xfa\x21\x3d"
MAX_CHARS = 1 << 16
MAX_OUTBOX = 1 << 20
RULES = SessionRules(rate_limit_count=5)


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame: masked, as RFC 6455 requires of clients."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    else:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    return head + KEY + unmask(payload, KEY)


def client_text(obj: dict[str, str]) -> tuple[str, bytes]:
    text = json.dumps(obj)
    return text, masked(1, text.encode())


AUTH, AUTH_FRAME = client_text({"type": "auth", "body": "token"})
JOIN, JOIN_FRAME = client_text({"type": "join", "username": "alice", "room": "lobby"})
ONE, ONE_FRAME = client_text({"type": "message", "body": "one 🙂"})
TWO, TWO_FRAME = client_text({"type": "message", "body": "two"})


def accept_any(token: str) -> None:
    return None


@pytest.fixture
async def links() -> AsyncIterator[tuple[Link, Link]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    router, shard = Link(trio.socket.from_stdlib_socket(a)), Link(trio.socket.from_stdlib_socket(b))
    yield router, shard
    router.close()
    shard.close()


async def joined(nursery: trio.Nursery, after_join: bytes) -> tuple[Connection, socket.socket]:
    """A connection through auth and join, as a router runs it; the client
    sent `after_join` in the same write as its join."""
    ws, client = await open_client(nursery)
    session = Session(RULES, accept_any, trio.current_time())
    client.sendall(AUTH_FRAME)
    assert await ws.receive() == AUTH
    assert session.receive_text(AUTH, trio.current_time()) == []
    client.sendall(JOIN_FRAME + after_join)
    assert await ws.receive() == JOIN
    assert session.receive_text(JOIN, trio.current_time()) == [JoinRoom("lobby", "alice")]
    conn = Connection(41, "127.0.0.1:5555", ws, session, "router-3", "subject-9", None, "lobby", "alice")
    return conn, client


def adopt_now(conn: Connection) -> wire.Adopt:
    """The `Adopt` that hands `conn` over now (it can be: open, nothing queued)."""
    frames = conn.socket.handing_over()
    assert frames is not None
    return adopt_message(conn, frames)


async def hand_over(conn: Connection, links: tuple[Link, Link], nursery: trio.Nursery) -> Connection:
    """What the router does, then what the shard does."""
    router, shard = links
    await router.send(adopt_now(conn), conn.socket.socket.fileno())
    conn.socket.hang_up()  # the other side has its own copy now
    with trio.fail_after(5):
        ((message, fd),) = await shard.receive()
    assert isinstance(message, wire.Adopt) and fd is not None
    return adopted_connection(message, fd, RULES, MAX_CHARS, MAX_OUTBOX, nursery)


def still_open(client: socket.socket) -> bool:
    try:
        return client.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True


async def test_the_adopted_connection_goes_on_where_the_first_stopped(links: tuple[Link, Link]) -> None:
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=ONE_FRAME + TWO_FRAME)
        old_deadline = conn.session.deadline
        assert old_deadline is not None
        adopted = await hand_over(conn, links, nursery)
        try:
            # Who it is and where.
            assert (adopted.id, adopted.peer, adopted.owner) == (41, "127.0.0.1:5555", "router-3")
            assert (adopted.subject, adopted.claimed_name) == ("subject-9", None)
            assert (adopted.room, adopted.username) == ("lobby", "alice")
            session = adopted.session
            assert session.state is State.IN_ROOM
            assert (session.room, session.username) == ("lobby", "alice")
            # The keepalive deadline moved with it (same clock here, give or take the trip).
            assert session.deadline is not None and abs(session.deadline - old_deadline) < 1.0
            # The frames the client sent right after its join were not lost.
            ws = adopted.socket
            with trio.fail_after(5):
                assert await ws.receive() == ONE
                assert await ws.receive() == TWO
            now = trio.current_time()
            assert session.receive_text(ONE, now) == [Publish("one 🙂")]
            assert session.receive_text(TWO, now) == [Publish("two")]
            # The client never noticed: its socket is open, nothing was sent to it.
            assert still_open(client)
            assert read_available(client) == []
            # Frames written by the adopted socket reach the client.
            ws.send_bytes(text_frame(b'{"type":"message","username":"bob","body":"hi"}'))
            await trio.testing.wait_all_tasks_blocked()
            assert b"".join(read_available(client)) == text_frame(b'{"type":"message","username":"bob","body":"hi"}')
            # And what the client sends next arrives; a ping is answered.
            client.sendall(masked(0x9, b"are you there") + masked(1, b'{"type":"message","body":"three"}'))
            with trio.fail_after(5):
                assert isinstance(await ws.receive(), Heard)
                assert await ws.receive() == '{"type":"message","body":"three"}'
            assert b"".join(read_available(client)) == b"\x8a\x0dare you there"
            # The adopted session is past auth: a second auth is refused.
            auth_again = session.receive_text(AUTH, trio.current_time())
            assert auth_again == [CloseClient(closes.ALREADY_AUTHENTICATED)]
        finally:
            adopted.socket.hang_up()
            client.close()


async def test_a_message_partly_received_is_completed_after_the_move(links: tuple[Link, Link]) -> None:
    # After the join: the first fragment of a message, then half of the next
    # frame, cut inside a multi-byte character.
    body = "é🙂ü"
    head = masked(1, b'{"type":"message","body":"', fin=False)
    rest = masked(0, f'{body}"}}'.encode())
    cut = len(rest) - 6
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=head + rest[:cut])
        adopted = await hand_over(conn, links, nursery)
        try:
            ws = adopted.socket
            with trio.fail_after(5):
                # What was left: the fragment and part of the next frame (heard),
                # until the rest arrives.
                assert isinstance(await ws.receive(), Heard)
                assert isinstance(await ws.receive(), Heard)
                client.sendall(rest[cut:])
                assert await ws.receive() == f'{{"type":"message","body":"{body}"}}'
            assert adopted.session.receive_text(
                f'{{"type":"message","body":"{body}"}}', trio.current_time()
            ) == [Publish(body)]
        finally:
            adopted.socket.hang_up()
            client.close()


async def test_an_invalid_adopt_closes_the_socket_it_came_with(links: tuple[Link, Link]) -> None:
    router, shard = links
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        good = adopt_now(conn)
        bad = wire.Adopt(
            good.conn, good.owner, good.peer, good.subject, good.claimed_name, good.room, good.username,
            good.session, ("not", "a", "parser"), good.sent_at,
        )
        await router.send(bad, conn.socket.socket.fileno())
        conn.socket.hang_up()
        with trio.fail_after(5):
            ((message, fd),) = await shard.receive()
        assert isinstance(message, wire.Adopt) and fd is not None
        with pytest.raises(ValueError):
            adopted_connection(message, fd, RULES, MAX_CHARS, MAX_OUTBOX, nursery)
        # Both copies are closed: the client sees the end of the stream.
        assert not still_open(client)
        client.close()


async def test_a_closed_session_cannot_be_adopted(links: tuple[Link, Link]) -> None:
    router, shard = links
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        message = adopt_now(conn)
        conn.session.end(closes.SHUTDOWN)
        closed = wire.Adopt(
            message.conn, message.owner, message.peer, message.subject, message.claimed_name, message.room,
            message.username, conn.session.snapshot(trio.current_time()), message.frames, message.sent_at,
        )
        await router.send(closed, conn.socket.socket.fileno())
        conn.socket.hang_up()
        with trio.fail_after(5):
            ((received, fd),) = await shard.receive()
        assert isinstance(received, wire.Adopt) and fd is not None
        with pytest.raises(ValueError):
            adopted_connection(received, fd, RULES, MAX_CHARS, MAX_OUTBOX, nursery)
        assert not still_open(client)
        client.close()


async def test_time_in_transit_counts(links: tuple[Link, Link]) -> None:
    # An Adopt that says it was sent 5 s ago: the restored deadlines are 5 s nearer.
    router, shard = links
    async with trio.open_nursery() as nursery:
        conn, client = await joined(nursery, after_join=b"")
        fresh = adopt_now(conn)
        old_deadline = conn.session.deadline
        assert old_deadline is not None
        late = wire.Adopt(
            fresh.conn, fresh.owner, fresh.peer, fresh.subject, fresh.claimed_name, fresh.room, fresh.username,
            fresh.session, fresh.frames, fresh.sent_at - 5.0,
        )
        await router.send(late, conn.socket.socket.fileno())
        conn.socket.hang_up()
        with trio.fail_after(5):
            ((received, fd),) = await shard.receive()
        assert isinstance(received, wire.Adopt) and fd is not None
        adopted = adopted_connection(received, fd, RULES, MAX_CHARS, MAX_OUTBOX, nursery)
        try:
            assert adopted.session.deadline is not None
            assert abs(adopted.session.deadline - (old_deadline - 5.0)) < 1.0
        finally:
            adopted.socket.hang_up()
            client.close()


async def test_handing_over_is_refused_when_the_connection_cannot_move() -> None:
    async with trio.open_nursery() as nursery:
        kicked, kicked_client = await open_client(nursery)
        assert kicked.handing_over() is not None
        kicked.kick(closes.TOO_SLOW)
        assert kicked.handing_over() is None

        closed, closed_client = await open_client(nursery)
        closed_client.sendall(masked(8, struct.pack("!H", 1000)))
        with trio.fail_after(5):
            await closed.receive()  # the peer's close: answered, no longer open
        assert closed.handing_over() is None

        for ws, client in ((kicked, kicked_client), (closed, closed_client)):
            ws.hang_up()
            client.close()


def test_handing_over_before_accept_is_refused() -> None:
    a, b = socket.socketpair()
    try:
        ws = ClientWebSocket(trio.socket.from_stdlib_socket(a), None, 100, 100)  # type: ignore[arg-type]
        assert ws.handing_over() is None
    finally:
        a.close()
        b.close()

"""A connection changing process: what travels with its socket, and back.

The router hands each client, once it has joined, to the shard that owns
its room; a shard hands on a member that joins a room of another shard. The
receiving process must go on exactly where the sender stopped: the session
(its deadlines, rate and join limits), the frame parser (bytes read and not
parsed yet, a message only partly received) and who the client is. Times
travel relative to the sender's clock reading `sent_at` (CLOCK_MONOTONIC,
the same in every process of the host), so the time spent in transit counts.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import trio

from garin import closes, wire
from garin.closes import Close
from garin.connection import Connection
from garin.frames_in import FrameParser
from garin.link import Link, LinkClosed
from garin.session import Session, SessionRules
from garin.websocket import ClientWebSocket


def adopt_message(conn: Connection, frames: tuple[Any, ...]) -> wire.Adopt:
    """The `Adopt` for `conn` (whose room is the one it is joining)."""
    assert conn.room is not None and conn.username is not None
    return wire.Adopt(
        conn.id, conn.owner, conn.peer, conn.subject, conn.claimed_name, conn.room, conn.username,
        conn.session.snapshot(trio.current_time()), frames, time.monotonic(),
    )


async def hand_over(conn: Connection, link: Link, flush_timeout_s: float) -> Close | None:
    """Send `conn` (its socket and its state, joining conn.room) over `link`
    and close our copy of the socket: None once it has gone, else the close
    to send it. Returns with no checkpoint after the send, so the caller can
    record the hand-over before any answer to it is read."""
    sock = conn.socket
    # A hand-over takes an empty outbox (the kernel holds what we wrote).
    with trio.move_on_after(flush_timeout_s):
        await sock.flush()
    frames = sock.handing_over()
    if frames is None:
        return sock.kicked or closes.TOO_SLOW
    try:
        await link.send(adopt_message(conn, frames), sock.socket.fileno())
    except LinkClosed:
        return closes.SHARD_UNAVAILABLE
    sock.hang_up()  # the other process has its own copy now
    return None


def _no_second_auth(token: str) -> Close | None:
    # An adopted session is past auth: the session refuses a second one
    # before it would ever ask.
    return closes.ALREADY_AUTHENTICATED


def adopted_connection(
    message: wire.Adopt, fd: int, rules: SessionRules, max_message_chars: int, max_outbox_bytes: int,
    nursery: trio.Nursery,
) -> Connection:
    """The connection `message` describes, on socket `fd` (now owned by the
    result). ValueError if the message's state is not valid; `fd` is then
    closed."""
    try:
        frames = FrameParser.restore(max_message_chars, message.frames)
        elapsed = max(0.0, time.monotonic() - message.sent_at)
        session = Session.restore(rules, _no_second_auth, message.session, trio.current_time() - elapsed)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    except BaseException:
        socket.close(fd)
        raise
    ws = ClientWebSocket.adopted(sock, frames, nursery, max_outbox_bytes)
    return Connection(
        message.conn, message.peer, ws, session, message.owner, message.subject, message.claimed_name,
        message.room, message.username,
    )

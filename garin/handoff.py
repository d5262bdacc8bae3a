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

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from garin import closes, wire
from garin.closes import Close
from garin.connection import Connection
from garin.frames_in import FrameParser
from garin.link import Link, LinkClosed
from garin.session import Session, SessionRules
from garin.websocket import ClientWebSocket

log = logging.getLogger("garin.handoff")


def adopt_message(conn: Connection, frames: tuple[Any, ...]) -> wire.Adopt:
    """The `Adopt` for `conn` (whose room is the one it is joining)."""
    assert conn.room is not None and conn.username is not None
    return wire.Adopt(
        conn.id, conn.owner, conn.peer, conn.subject, conn.claimed_name, conn.room, conn.username,
        conn.session.snapshot(trio.current_time()), frames, time.monotonic(),
    )


# Waits for the link to send on until the hold deadline it was made with;
# None once that has passed. Called again after a send that found the link
# closed: it then gives a new link (relinked, or another router's).
NextLink = Callable[[], Awaitable[Link | None]]


async def hand_over(
    conn: Connection, next_link: NextLink, flush_timeout_s: float, link_now: Callable[[], Link | None] | None = None
) -> Close | None:
    """Send `conn` (its socket and its state, joining conn.room) over the
    link `next_link` gives and close our copy of the socket: None once it
    has gone, else the close to send it. Returns with no checkpoint after the
    send, so the caller can record the hand-over before any answer to it is
    read. `link_now`, if given, is the link when one is up already: the
    usual case then takes no cancel scope (one is ~5 us, per connection)."""
    sock = conn.socket
    # A hand-over takes an empty outbox (the kernel holds what we wrote).
    if sock.queued:
        with sock.kickable(trio.current_time() + flush_timeout_s):
            await sock.flush()
    frames = sock.handing_over()
    if frames is None:
        return sock.kicked or closes.TOO_SLOW
    # Nothing reads or writes the socket from here on, so `frames` stays true
    # however long the link takes (`sent_at` makes the wait count).
    return await send_socket(sock, adopt_message(conn, frames), next_link, link_now)


async def send_socket(
    sock: ClientWebSocket, message: wire.Adopt, next_link: NextLink, link_now: Callable[[], Link | None] | None = None
) -> Close | None:
    """Send `message` with `sock`'s descriptor over the link `next_link`
    gives, again over the next one if that link closed under the send, and
    close our copy: None once sent, else the close to send the client
    (1013 `room unavailable` when no link came in time, or the kick that
    stopped the wait). No checkpoint between the send and the return."""
    link = link_now() if link_now is not None and sock.kicked is None else None
    while True:
        if link is None:
            # The client waits here, not reading: a kick (the process
            # stopping) must still reach it with its own close.
            with sock.kickable():
                link = await next_link()
        if sock.kicked is not None:
            return sock.kicked
        if link is None:
            return closes.SHARD_UNAVAILABLE
        try:
            if link.busy:
                # Behind another send: waiting for its turn, the client must
                # still hear a kick. Cancelled, the send sent nothing (once
                # it begins it is shielded and ends without a checkpoint).
                sent = False
                with sock.kickable():
                    await link.send(message, sock.socket.fileno())
                    sent = True
                if not sent:
                    assert sock.kicked is not None
                    return sock.kicked
            else:
                await link.send(message, sock.socket.fileno())
        except LinkClosed as exc:
            # Safe to send again: the peer cannot have taken the client. A
            # failed sendmsg sends nothing; a send cut short left the peer
            # the first part of the message, with the descriptor, and then
            # the end of the stream, and a receiver hands a descriptor out
            # only with its whole `Adopt`: `Link.close` closes those left
            # (test_link.py: ..._of_an_adopt_not_fully_received). A dead
            # peer's are closed by the kernel. Our copy is intact.
            if sock.kicked is not None:
                # Stopping: a send cut at the shutdown deadline (`limit_sends`)
                # ends here at that deadline, when the process's own scope is
                # cancelled too. Return the kick with no checkpoint, so that
                # the caller's close frame is written before any (a wait for
                # the next link would end in that cancellation instead).
                log.info("conn %d (%s): hand-off not sent (%s)", message.conn, message.peer, exc)
                return sock.kicked
            link = None
            continue
        sock.hang_up()  # the other process has its own copy now
        return None


def _no_second_auth(token: str) -> Close | None:
    # An adopted session is past auth: the session refuses a second one
    # before it would ever ask.
    return closes.ALREADY_AUTHENTICATED


def adopted_connection(
    message: wire.Adopt, fd: int, rules: SessionRules, max_message_bytes: int, max_outbox_bytes: int,
    nursery: trio.Nursery,
) -> Connection:
    """The connection `message` describes, on socket `fd` (now owned by the
    result). ValueError if the message's state is not valid; `fd` is then
    closed."""
    try:
        frames = FrameParser.restore(max_message_bytes, message.frames)
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

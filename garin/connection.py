"""One client connection's session loop, the same in a router and a shard.

A router runs it from the WebSocket upgrade to the join; the shard that owns
the joined room runs it from there on (and hands a connection on to another
shard when its member joins a room there). Where the connection is, a
`Place` says what a join, a message and a leave do: the loop itself only
feeds the socket's events to the session core (garin/session.py) and applies
the actions it returns, in order.

A connection leaves its room at one call site, `_end`: every close goes
through it, so the room always hears `userleave`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from garin import closes, metrics
from garin.closes import Close
from garin.session import Action, CloseClient, JoinRoom, LeaveRoom, Publish, SendPing, Session
from garin.websocket import BinaryMessage, ClientWebSocket, Heard, PeerClosed

log = logging.getLogger("garin.connection")


@dataclass(eq=False, slots=True)
class Connection:
    # The owning router's id for it (logs, `Ended`) and that router's
    # instance name; `peer` is "address:port".
    id: int
    peer: str
    socket: ClientWebSocket
    session: Session
    owner: str = ""
    # From the token: whom its strikes count against (`sub`, or
    # bans.subject_of's fallback) and, with GARIN_USERNAME_CLAIM, the name
    # the client must chat under.
    subject: str | None = None
    claimed_name: str | None = None
    # The room it is in (or is joining, while it moves) and its name there.
    room: str | None = None
    username: str | None = None
    # The client's address, as connection limits count it (empty: take it
    # from `peer`).
    address: str = ""


class Moved:
    """The connection now lives in another process; its socket here is closed."""


MOVED: Final = Moved()


class Place(Protocol):
    def join(self, conn: Connection, room: str, username: str) -> bool:
        """Make `conn` a member of `room` here (conn.room and username are
        set); False if the room lives elsewhere: the loop calls `move`."""

    def publish(self, conn: Connection, body: str) -> None: ...

    def leave(self, conn: Connection) -> None:
        """`conn` leaves conn.room (the loop clears conn.room after)."""

    async def move(self, conn: Connection) -> Close | None:
        """Hand `conn` to the process that owns conn.room: None once it has
        gone, else the close to send it."""


async def serve_connection(conn: Connection, place: Place) -> Close | Moved | None:
    """Run `conn`'s session here until it closes or moves. Returns the close
    sent, MOVED, or None if the peer vanished. Never closes the socket
    unless it sent a close (the caller hangs up in its `finally`)."""
    sock = conn.socket
    session = conn.session
    while True:
        if sock.kicked is not None:
            actions = session.end(sock.kicked)
        else:
            deadline = session.deadline
            if deadline is None:
                deadline = math.inf
            item: str | BinaryMessage | Heard | PeerClosed | Close | None = None
            pending: list[Action] | None = None
            moving = False
            with trio.CancelScope(deadline=deadline) as scope:
                sock.receive_scope = scope
                # One cancel scope for all text frames (their actions never
                # wait) whose deadline moves with the session's, not a new
                # scope per message. Anything else leaves the loop.
                while True:
                    item = await sock.receive()
                    if not isinstance(item, str) or sock.dead or sock.kicked is not None:
                        break
                    actions = session.receive_text(item, trio.current_time())
                    # A session's close is always its last (and only) action.
                    if actions and isinstance(actions[-1], CloseClient):
                        pending = actions
                        break
                    if _apply(place, conn, actions):
                        moving = True
                        break
                    item = None
                    # Activity moves the idle and keepalive deadlines later:
                    # leave the scope's alone (firing early costs one no-op
                    # `timeout`), and only bring it forward when one came sooner.
                    sooner = session.deadline
                    if sooner is not None and sooner < deadline:
                        scope.deadline = deadline = sooner
            sock.receive_scope = None
            if moving:
                return await _move(place, conn)
            now = trio.current_time()
            if sock.dead:
                _leave(place, conn)
                return None
            if scope.cancelled_caught:
                if sock.kicked is not None:
                    continue
                actions = session.timeout(now)
            elif pending is not None:
                actions = pending
            elif isinstance(item, str):
                actions = session.receive_text(item, now)
            elif isinstance(item, Heard):
                actions = session.heard(now, item.frame)
            elif isinstance(item, PeerClosed):
                log.debug("conn %d: peer closed %d", conn.id, item.code)
                return await _end(place, conn, closes.BYE, quiet=True)
            elif isinstance(item, BinaryMessage):
                actions = session.receive_binary(now)
            else:
                assert item is not None  # only a timeout or a kick leaves the loop without one
                actions = session.end(item)
        if _apply(place, conn, actions):
            return await _move(place, conn)
        if session.close is not None:
            return await _end(place, conn, session.close)


def _apply(place: Place, conn: Connection, actions: list[Action]) -> bool:
    """Apply a session's actions in order (a close is left to the caller);
    True if a join must move the connection to another process."""
    for action in actions:
        if isinstance(action, Publish):
            metrics.MESSAGES_IN.inc()
            place.publish(conn, action.body)
        elif isinstance(action, JoinRoom):
            # With GARIN_USERNAME_CLAIM the token names the user, not the join.
            conn.room, conn.username = action.room, conn.claimed_name or action.username
            if not place.join(conn, conn.room, conn.username):
                return True
        elif isinstance(action, LeaveRoom):
            _leave(place, conn)
        elif isinstance(action, SendPing):
            conn.socket.ping()
    return False


async def _move(place: Place, conn: Connection) -> Close | Moved:
    close = await place.move(conn)
    if close is None:
        return MOVED
    conn.room = None  # it never got there
    return await _end(place, conn, close)


def _leave(place: Place, conn: Connection) -> None:
    if conn.room is not None:
        place.leave(conn)
        conn.room = None


async def _end(place: Place, conn: Connection, close: Close, quiet: bool = False) -> Close:
    """Leave the room, then send `close` (for a peer's close, our answer)."""
    _leave(place, conn)
    if not quiet:
        log.info("conn %d (%s): closing %d %s", conn.id, conn.peer, close.code, close.reason)
        count_close(close)
    await conn.socket.close(close)
    return close


_KNOWN_REASONS = {close.reason for close, _ in closes.ALL_CLOSES}


def count_close(close: Close) -> None:
    # Reasons with a variable part (the frame parser's, a field name) share one label.
    reason = close.reason if close.reason in _KNOWN_REASONS else "other"
    metrics.CLOSES.labels(code=str(close.code), reason=reason).inc()
    if close == closes.TOO_SLOW:
        metrics.SLOW_CONSUMER_DROPS.inc()

"""A server-side WebSocket with a bounded outbox (frames parsed by garin/frames_in.py).

A router runs the HTTP upgrade and the session up to the join on it; the
shard that adopts the connection builds a new one around the same socket,
with the router's frame parser state (`adopted`), and runs the rest.

Why not trio-websocket's connection object: it runs a reader task and a
message channel per connection (about 20 KiB each), writes through an
awaited lock (one slow client then stalls whoever is fanning out to it), and
has no way to send pre-encoded frames. Here one task per connection reads,
and writes are synchronous: `send_bytes` tries a non-blocking write first and
queues only what the kernel would not take. A drain task exists only while
something is queued. If the queue passes `max_outbox_bytes`, the client is not
reading: it is kicked with 1013 "too slow" and never delays anyone else.
"""

from __future__ import annotations

import errno
import logging
import os
import math
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from garin import closes
from garin.flusher import current_flusher
from garin.closes import Close
from garin.frames import PING_FRAME, close_frame, pong_frame
from garin.frames_in import HEARD, HEARD_FRAME, BinaryMessage, FrameParser, Heard, PeerClosed, Ping
from garin.handshake import (
    HEAD_END,
    MAX_HEAD_BYTES,
    TOO_BIG,
    BadRequest,
    Upgrade,
    accept_response,
    parse_upgrade,
    refusal,
    unavailable,
)

log = logging.getLogger("garin.router")

RECEIVE_BYTES = 64 * 1024
# Chunks handed to one writev(); far below IOV_MAX (1024).
WRITEV_CHUNKS = 64
# How long a closing connection waits for its close frame to be sent and for
# the peer to hang up, before the socket is dropped.
CLOSE_LINGER_S = 2.0


__all__ = ["HEARD", "BinaryMessage", "ClientWebSocket", "Heard", "PeerClosed", "fan_out"]

# The closing handshake (RFC 6455 7), as wsproto's ConnectionState named it.
# Before `accept` the state is None.
OPEN, REMOTE_CLOSING, LOCAL_CLOSING, CLOSED = 1, 2, 3, 4


class ClientWebSocket:
    # One per connection: slots instead of a dict, about 0.3 KiB less each.
    __slots__ = (
        "_sock", "_fd", "_nursery", "_frames", "_state", "_early", "_max_message_bytes", "_max_outbox_bytes",
        "_outbox", "_outbox_bytes", "_draining", "_drained", "_unparsed",
        "kicked", "dead", "receive_scope", "_fanout", "_pass", "_later", "_later_bytes",
    )

    def __init__(
        self,
        stream: trio.SocketStream | trio.socket.SocketType,
        nursery: trio.Nursery,
        max_message_bytes: int,
        max_outbox_bytes: int,
    ) -> None:
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else stream
        self._fd = self._sock.fileno()
        self._nursery = nursery
        # Made by `accept` (router/handshake.py did the HTTP): the incoming
        # frame parser, and where the closing handshake stands.
        self._frames: FrameParser | None = None
        self._state: int | None = None
        self._early = b""
        self._max_message_bytes = max_message_bytes
        self._max_outbox_bytes = max_outbox_bytes
        # Created when something first has to wait (most clients never do).
        self._outbox: deque[bytes | memoryview] | None = None
        self._outbox_bytes = 0
        self._draining = False
        self._drained: trio.Event | None = None
        # Bytes went into `_frames` that it has not run dry on: parse before
        # the next read.
        self._unparsed = True
        # Set by the writing side; the owner's receive scope is cancelled so
        # the session task notices at once.
        self.kicked: Close | None = None
        self.dead = False
        self.receive_scope: trio.CancelScope | None = None
        # Fan-out may write here: the handshake is accepted, no close frame was
        # sent or received, nobody kicked us and the socket is alive. One flag,
        # kept up to date where any of those change, so that `fan_out` (run
        # once per delivery) tests a single attribute.
        self._fanout = False
        # Fan-out coalescing: the scheduler pass of this socket's last fan-out
        # write, and frames fanned out to it later in that same pass, which
        # the flusher writes as one at the pass's end.
        self._pass = -1
        self._later: list[bytes] | None = None
        self._later_bytes = 0

    # -- handshake ----------------------------------------------------------

    async def handshake(self) -> Upgrade | None:
        """Read the HTTP upgrade. None if the peer left or sent garbage (answered 400)."""
        head = b""
        # In a burst the request is usually queued by the time we accept:
        # read it now, without a trip through epoll and the scheduler.
        data = self._read_now()
        while True:
            if data is None:
                data = await self._receive_some()
            if not data:
                return None
            # Search only the new bytes (and the three before them).
            start = max(0, len(head) - 3)
            head += data
            end = head.find(HEAD_END, start)
            if end < 0 and len(head) <= MAX_HEAD_BYTES:
                data = None
                continue
            request = parse_upgrade(head[:end]) if 0 <= end <= MAX_HEAD_BYTES else TOO_BIG
            if isinstance(request, BadRequest):
                self.send_bytes(request.response)
                await self.flush()
                return None
            # Frames a client sent without waiting for our answer.
            self._early = head[end + len(HEAD_END):]
            return request

    def accept(self, request: Upgrade) -> None:
        self.send_bytes(accept_response(request.key))
        self._frames = FrameParser(self._max_message_bytes, self._early)
        self._state = OPEN
        self._early = b""
        self._update_fanout()

    @classmethod
    def adopted(
        cls, sock: trio.socket.SocketType, frames: FrameParser, nursery: trio.Nursery, max_outbox_bytes: int
    ) -> ClientWebSocket:
        """An open WebSocket another process has read from so far (`frames`)."""
        ws = cls(sock, nursery, 0, max_outbox_bytes)
        ws._frames = frames
        ws._state = OPEN
        ws._update_fanout()
        return ws

    def handing_over(self) -> tuple[Any, ...] | None:
        """The frame parser's snapshot, if this connection can change process
        now: open, nothing left to write. The caller then sends the socket
        and calls `hang_up` (closing our copy; the other process has one)."""
        if self._frames is None or self._state != OPEN or self._outbox or self.dead or self.kicked is not None:
            return None
        self._flush()
        if self._outbox or self.dead:
            return None
        return self._frames.snapshot()

    @property
    def queued(self) -> bool:
        """Something waits to be written (`flush` would wait)."""
        return bool(self._outbox)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    def _update_fanout(self) -> None:
        self._fanout = self.kicked is None and not self.dead and self._state == OPEN

    async def reject(self, status: int, body: str) -> None:
        self.send_bytes(refusal(status, body))
        await self.flush()

    async def reject_unavailable(self, body: str) -> None:
        """Answer 503 to a client whose upgrade was not accepted (or not
        even read whole): the server is stopping."""
        self.send_bytes(unavailable(body))
        await self.flush()

    # -- receiving ----------------------------------------------------------

    async def _receive_some(self) -> bytes:
        """Wait until the socket is readable, then read once; b"" at end of
        stream, on a read error, or if our side closed it meanwhile.

        Not `SocketStream.receive_some`, which first tries a read (at chat
        rates nearly always EAGAIN: a wasted system call and a raised
        BlockingIOError) and wraps each call in a conflict detector, an
        error-translating context manager and more coroutine layers: this
        runs once per client message. Always a checkpoint (it always waits)."""
        while True:
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except trio.ClosedResourceError:
                return b""
            data = self._read_now()
            if data is not None:
                return data

    def _read_now(self) -> bytes | None:
        """What is already queued (b"" at end of stream), or None: nothing yet."""
        try:
            return os.read(self._fd, RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    async def receive(self) -> str | BinaryMessage | Heard | PeerClosed | Close:
        """The next complete client message, a sign of life, or why there will be none.

        A `Close` means the client broke a transport rule (too big, bad UTF-8):
        the session should end with it.
        """
        frames = self._frames
        assert frames is not None, "receive() before accept()"
        while True:
            event = frames.next_event() if self._unparsed else None
            if event is None:
                self._unparsed = False
                data = await self._receive_some()
                if not data:
                    return PeerClosed(1006, "")
                frames.feed(data)
                self._unparsed = True
                continue
            if type(event) is str or type(event) is Heard or type(event) is BinaryMessage:
                return event
            if type(event) is Ping:
                if self._state == OPEN:
                    self.send_bytes(pong_frame(event.payload))
                return HEARD_FRAME
            if type(event) is PeerClosed:
                if self._state == LOCAL_CLOSING:
                    self._state = CLOSED
                    self._update_fanout()
                    return Close(event.code, event.reason or "protocol error")
                # The peer closed: answer with its own code.
                self._state = REMOTE_CLOSING
                self._update_fanout()
                self.send_bytes(close_frame(event.code, event.reason))
                self._state = CLOSED
                return event
            # A frame that broke a rule (bad UTF-8, bad opcode): the parser
            # says which close to send, as wsproto did.
            assert isinstance(event, Close)
            return event

    # -- sending ------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Queue one pre-encoded frame (a keepalive ping); never blocks.
        Fan-out uses `fan_out` below, the same path for a whole room."""
        if self._fanout:
            self.send_bytes(frame)

    def ping(self) -> None:
        self.send_frame(PING_FRAME)

    def send_bytes(self, data: bytes | memoryview) -> None:
        if self.dead:
            return
        if not self._outbox:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._die()
                return
            if written == len(data):
                return
            data = memoryview(data)[written:]
        self._enqueue(data)

    def _enqueue(self, data: bytes | memoryview) -> None:
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._queued_more()

    def _queued_more(self) -> None:
        """Something was queued: past the bound the client is too slow, else
        a drain task (one at a time) writes it when the socket can take it."""
        if self._outbox_bytes > self._max_outbox_bytes:
            self._too_slow()
            return
        if not self._draining:
            self._draining = True
            self._nursery.start_soon(self._drain)

    def _write_queued(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        chunks = [outbox[i] for i in range(min(len(outbox), WRITEV_CHUNKS))]
        try:
            written = os.writev(self._fd, chunks)
        except BlockingIOError:
            return
        except OSError:
            self._die()
            return
        self._outbox_bytes -= written
        while written:
            head = outbox[0]
            if written >= len(head):
                written -= len(head)
                outbox.popleft()
            else:
                outbox[0] = memoryview(head)[written:]
                written = 0

    async def _drain(self) -> None:
        # Runs in the router-wide nursery, so nothing may escape from here.
        try:
            while self._outbox and not self.dead:
                await trio.lowlevel.wait_writable(self._sock)
                self._write_queued()
        except (trio.ClosedResourceError, OSError):
            self._die()  # closed under us (the session ended): nothing more to send
        except Exception:
            log.exception("drain failed")
            self._die()
        finally:
            self._draining = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    async def flush(self) -> None:
        """Wait until everything queued has reached the kernel (or the peer died)."""
        while self._outbox and not self.dead:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _too_slow(self) -> None:
        # Keep only a partly written head (its tail must still go out, or
        # the stream is corrupt); the rest will never be read anyway.
        assert self._outbox is not None
        head = self._outbox[0]
        partial = isinstance(head, memoryview)
        self._outbox.clear()
        self._outbox_bytes = 0
        if partial:
            self._outbox.append(head)
            self._outbox_bytes = len(head)
        self.kick(closes.TOO_SLOW)

    def _flush(self) -> bool:
        """The flusher's call at the end of a pass: the frames held back by
        `fan_out`, in one write. Dropped if the client was kicked, the peer
        closed or the socket died meanwhile (`close` flushes them before its
        close frame). True if a drain task was started or the session woken."""
        later, self._later = self._later, None
        if not later or not self._fanout:
            return False
        if len(later) == 1:
            self.send_bytes(later[0])
        else:
            self._send_frames(later)
        return bool(self._outbox) or self.dead or self.kicked is not None

    def _send_frames(self, frames: list[bytes]) -> None:
        """Write `frames` in order (one writev, as a drain does) and keep
        what the kernel does not take. The frames themselves are queued, not
        a joined copy: a room's frames are shared by all its members, so a
        burst to K members that do not read costs the frames once, not K
        copies (which let K senders of large messages make a shard's memory
        grow with K squared), and the outbox bound counts every byte."""
        if self.dead:
            return
        if self._outbox is None:
            self._outbox = deque()
        waiting = bool(self._outbox)
        self._outbox.extend(frames)
        self._outbox_bytes += sum(map(len, frames))
        if not waiting:
            self._write_queued()  # else a drain is under way: it writes them in turn
        if self._outbox:
            self._queued_more()

    def _fail(self, error: BaseException) -> None:
        log.error("fan-out flush failed: %r", error)
        self._die()

    def _die(self) -> None:
        self.dead = True
        self._fanout = False
        self._outbox = None
        self._outbox_bytes = 0
        if self.receive_scope is not None:
            self.receive_scope.cancel()

    def kick(self, close: Close) -> None:
        """Ask the session task to close this client with `close`."""
        if self.kicked is None:
            self.kicked = close
        self._fanout = False
        if self.receive_scope is not None:
            self.receive_scope.cancel()

    @contextmanager
    def kickable(self, deadline: float = math.inf) -> Iterator[trio.CancelScope]:
        """A scope (until `deadline`) for a wait of the connection's own task
        outside its receive loop (a handshake, a hand-off): a kick (the
        process stopping) ends the wait, one that came before it at its
        first checkpoint. The caller then looks at `kicked`."""
        with trio.CancelScope(deadline=deadline) as scope:
            if self.kicked is not None:
                scope.cancel()
            self.receive_scope = scope
            try:
                yield scope
            finally:
                self.receive_scope = None

    @property
    def outbox_bytes(self) -> int:
        return self._outbox_bytes

    # -- closing ------------------------------------------------------------

    async def close(self, close: Close) -> None:
        """Send a close frame, let it reach the peer, then hang up (bounded)."""
        with trio.move_on_after(CLOSE_LINGER_S):
            if self._state == OPEN:
                self._flush()  # frames fanned out earlier in this pass go first
                self.send_bytes(close_frame(close.code, close.reason))
                self._state = LOCAL_CLOSING
            self._update_fanout()
            await self.flush()
            if not self.dead:
                # Half-close and read until the peer hangs up: closing with
                # unread input would send RST, which can destroy our close
                # frame before the client reads it.
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
                while await self._receive_some():
                    pass
        self.hang_up()

    def hang_up(self) -> None:
        """Close the socket now. Synchronous (closing never blocks): no
        shielded scope or checkpoint, and a cancel cannot interrupt it; trio
        wakes any task waiting on the socket (a drain) with ClosedResourceError."""
        self.dead = True
        self._fanout = False
        self._outbox = None
        self._sock.close()


def fan_out(members: Iterable[tuple[int, ClientWebSocket]], frame: bytes, exclude: int) -> None:
    """Write one pre-encoded frame to every member but `exclude`; never blocks.

    `send_bytes`' write-first path for a whole room, inlined, with one flag
    test per member: this loop is where a router spends most of its time at
    high fan-out. A member whose kernel buffer is full queues the rest.

    A member written to earlier in this scheduler pass gets the frame at the
    pass's end instead, together with any others that follow it: a burst (a
    batch of joins into a big room, several messages read from a shard link
    at once) costs each member two writes, not one per frame.
    """
    write = os.write
    size = len(frame)
    flusher = current_flusher()
    pass_no = flusher.pass_no
    for member_id, ws in members:
        if member_id == exclude or not ws._fanout:
            continue
        if ws._outbox:
            ws._enqueue(frame)
            continue
        if ws._pass == pass_no:
            later = ws._later
            if later is None:
                ws._later = [frame]
                ws._later_bytes = size
                flusher.pending.append(ws)
            else:
                later.append(frame)
                ws._later_bytes += size
                if ws._later_bytes > ws._max_outbox_bytes:
                    # Held no longer than the outbox bound allows: written
                    # (or queued, and counted) now.
                    ws._later = []
                    ws._later_bytes = 0
                    ws._send_frames(later)
            continue
        ws._pass = pass_no
        try:
            written = write(ws._fd, frame)
        except BlockingIOError:
            written = 0
        except OSError:
            ws._die()
            continue
        if written != size:
            ws._enqueue(memoryview(frame)[written:])

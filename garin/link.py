"""One end of a router <-> shard link: wire messages, and client sockets with them.

A link carries connections, not chat: a few messages per client lifetime
(`Adopt` with the client's socket, `Ended`), so plain awaited writes do.
A socket travels as SCM_RIGHTS ancillary data on the `sendmsg` that sends its
`Adopt`'s first bytes. On a Unix stream socket the kernel hands a receiver the
descriptors together with the first byte they were sent with, and one
`recvmsg` never returns the descriptors of two sends, so the receiver keeps
them in arrival order and gives the next one to each `Adopt` it decodes.

A descriptor received is ours until given to an `Adopt`'s handler; a link
that closes closes those still waiting. One the kernel could not give us (this
process is at its open-files limit: MSG_CTRUNC with none received) is `LOST`:
its `Adopt` comes with LOST instead, and the link goes on.

A write that fails means the peer went (EPIPE): what it sent before it went
is still ours to read, and may be clients it handed over, so the link then
only stops sending (`can_send`) and is read to its end before it is closed.
"""

from __future__ import annotations

import array
import errno
import logging
import math
import os
import socket
from collections import deque
from typing import NoReturn

import trio

from garin import wire

log = logging.getLogger("garin.link")

RECEIVE_BYTES = 256 * 1024
# Descriptors one recvmsg may carry. One per send is what we send; room for
# more only so that a misbehaving peer is detected (MSG_CTRUNC), not silent.
MAX_FDS = 16
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# Reads one `receive` call makes at most before it returns what it has.
MAX_READS_PER_CALL = 64
# A send that cannot finish in this long means the peer stopped reading. A
# shard announcing a burst of joins into a huge room can be busy for many
# seconds (each join is written to every member), so this is generous; a
# stopped shard is found sooner by its unanswered pings (router/shard_link.py).
# A stopping process gives up sooner: at its shutdown deadline (`limit_sends`).
SEND_TIMEOUT_S = 30.0
# After a failed write, `run_posted` gives the reader this long to reach the
# end of the stream (a peer that went has closed it) before it gives up.
DRAIN_TIMEOUT_S = 5.0


# In place of the descriptor of an `Adopt` whose socket did not arrive.
LOST = -1


class LinkClosed(Exception):
    """The link is gone (peer closed, write failed, or it was closed here)."""


class Link:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        # The same descriptor as a plain socket, for reads that must not
        # checkpoint; detached (not closed) in `close`.
        self._raw = socket.socket(fileno=sock.fileno())
        self._raw.setblocking(False)
        # Why the next `receive` raises LinkClosed: the stream ended (or a
        # read failed) after messages that call returned first.
        self._ended: str | None = None
        self._decoder = wire.Decoder()
        self._fds: deque[int] = deque()
        self._lock = trio.StrictFIFOLock()
        self._posted: list[bytes] = []
        self._wake = trio.Event()
        # No send lasts past this (trio time): the shutdown deadline once the
        # process stops, which a shielded send would otherwise outlive.
        self._send_deadline = math.inf
        self._send_timer: trio.CancelScope | None = None
        # Why sends stopped (a write failed): the link is only read from now.
        self._send_failure: str | None = None
        self.closed = False

    # -- sending --------------------------------------------------------------

    async def send(self, message: wire.WireMessage, fd: int | None = None) -> None:
        """Send `message` (and the descriptor `fd` with it); LinkClosed if the
        link broke. A half-sent message would corrupt the link for good, so
        once begun a send is finished or the link closed, even if the caller
        is cancelled meanwhile. Once the last byte is sent it returns without
        another checkpoint: a caller can record what it sent before the
        peer's answer to it could be read, and a cancellation never hides
        that it was sent."""
        data = wire.encode(message)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._send_failure is not None:
            raise LinkClosed(self._send_failure)
        if not self._lock.locked() and not self.closed:
            # The usual case: the kernel takes it all at once, no waiting.
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
            try:
                sent = self._raw.sendmsg([data], ancillary)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise LinkClosed(self._sends_failed(exc)) from None
            if sent == len(data):
                return
            if sent:
                # Half a message is in the socket: the rest must follow before
                # anything else, and no checkpoint may come between.
                self._lock.acquire_nowait()
                try:
                    await self._send_locked(data[sent:], None)  # the descriptor went with the first bytes
                finally:
                    self._lock.release()
                return
        async with self._lock:
            await self._send_locked(data, fd)

    def _sends_failed(self, exc: OSError) -> str:
        """A write failed. The peer went (EPIPE, ECONNRESET): no more sends,
        the reader reads to the end. Anything else: the link is closed now."""
        self._send_failure = f"link write failed: {exc!r}"
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            self._posted.clear()
            self._wake.set()
        else:
            self.close()
        return self._send_failure

    @property
    def can_send(self) -> bool:
        """Open, and no write has failed: worth handing a client to."""
        return not self.closed and self._send_failure is None

    @property
    def busy(self) -> bool:
        """Another send is under way: `send` would wait for it first."""
        return self._lock.locked()

    def post(self, message: wire.WireMessage) -> None:
        """Queue `message` for `run_posted` to send; never blocks (for code
        that must not wait: a connection's last words in a `finally`)."""
        if self.can_send:
            self._posted.append(wire.encode(message))
            self._wake.set()

    @property
    def posting(self) -> bool:
        """Something posted is not written yet."""
        return bool(self._posted) or self._lock.locked()

    async def run_posted(self) -> None:
        """Send what `post` queued, until the link closes (then LinkClosed).
        After a failed write it waits up to DRAIN_TIMEOUT_S first: the task
        reading the link ends things at the end of the stream, once it has
        taken what the peer sent before it went."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self.closed:
                raise LinkClosed("link closed")
            batch, self._posted = b"".join(self._posted), []
            if batch and self._send_failure is None:
                try:
                    async with self._lock:
                        await self._send_locked(batch, None)
                except LinkClosed:
                    if self.closed:
                        raise
            if self._send_failure is not None:
                await self.wait_read_out()

    async def wait_read_out(self) -> NoReturn:
        """After a failed write: the task reading the link has DRAIN_TIMEOUT_S
        to reach the end of the stream (and end things); then LinkClosed."""
        assert self._send_failure is not None
        await trio.sleep(DRAIN_TIMEOUT_S)
        raise LinkClosed(self._send_failure)

    async def _send_locked(self, data: bytes, fd: int | None) -> None:
        if self.closed:
            raise LinkClosed("link closed")
        if self._send_failure is not None:
            raise LinkClosed(self._send_failure)
        view = memoryview(data)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
        with trio.CancelScope(shield=True):
            deadline = min(trio.current_time() + SEND_TIMEOUT_S, self._send_deadline)
            with trio.move_on_at(deadline) as timer:
                self._send_timer = timer
                try:
                    while view:
                        try:
                            sent = await self._sock.sendmsg([view], ancillary)
                        except trio.ClosedResourceError:
                            raise LinkClosed("link closed") from None
                        except OSError as exc:
                            raise LinkClosed(self._sends_failed(exc)) from None
                        # The descriptor went with the first bytes.
                        ancillary = []
                        view = view[sent:]
                finally:
                    self._send_timer = None
        if timer.cancelled_caught:
            self.close()
            if timer.deadline >= self._send_deadline:
                raise LinkClosed("stopping: gave up a send the peer is not reading")
            raise LinkClosed(f"peer has not read its link for {SEND_TIMEOUT_S:g} s")

    def limit_sends(self, deadline: float) -> None:
        """No send, under way or to come, lasts past `deadline` (trio time):
        a stopping process must exit within its grace, and a send is shielded
        from the cancellation that ends it. One cut short closes the link."""
        self._send_deadline = min(self._send_deadline, deadline)
        if self._send_timer is not None:
            self._send_timer.deadline = min(self._send_timer.deadline, deadline)

    # -- receiving ------------------------------------------------------------

    async def receive(self) -> list[tuple[wire.WireMessage, int | None]]:
        """Wait for data, then read what is there; the complete messages, each
        `Adopt` with its descriptor (now the caller's to close). LinkClosed at
        end of stream (or on a failed read), once what came before it is
        returned; WireError if the peer broke the protocol.

        The kernel returns one send's descriptors per recvmsg at most, so a
        burst of hand-offs takes one read each: they are read here in a loop,
        without a trip through the scheduler per read (trio's awaitable
        recvmsg is one), up to MAX_READS_PER_CALL."""
        if self._ended is not None:
            raise LinkClosed(self._ended)
        out: list[tuple[wire.WireMessage, int | None]] = []
        reads = 0
        while True:
            try:
                data, ancdata, flags, _ = self._raw.recvmsg(RECEIVE_BYTES, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                if out:
                    return out
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except trio.ClosedResourceError:
                    raise LinkClosed("link closed") from None
                continue
            except OSError as exc:
                # ECONNRESET: the peer closed with our messages unread. What
                # it sent before is still ours (clients it handed over).
                if out:
                    self._ended = f"link read failed: {exc}"
                    return out
                raise LinkClosed(f"link read failed: {exc}") from None
            received = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
                    received += len(fds)
            if flags & socket.MSG_CTRUNC:
                if received:
                    close_fds(out)
                    raise wire.WireError("too many descriptors in one read")
                # No room for it here (EMFILE): the one socket of this send is
                # gone, closed by the kernel; its client can get no close frame.
                self._fds.append(LOST)
            if not data:
                if out:
                    self._ended = "peer closed the link"  # theirs first; the next call says so
                    return out
                raise LinkClosed("peer closed the link")
            try:
                for message in self._decoder.feed(data):
                    fd: int | None = None
                    if type(message) is wire.Adopt:
                        if not self._fds:
                            raise wire.WireError("an Adopt came without its socket")
                        fd = self._fds.popleft()
                    out.append((message, fd))
            except wire.WireError:
                close_fds(out)  # handed out to nobody: the link is going down
                raise
            reads += 1
            if reads >= MAX_READS_PER_CALL and out:
                return out

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every descriptor not handed out yet."""
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        while self._fds:
            fd = self._fds.popleft()
            if fd != LOST:
                os.close(fd)
        self._raw.detach()
        self._sock.close()


def close_fds(messages: list[tuple[wire.WireMessage, int | None]]) -> None:
    """Close the descriptors that came with `messages` (nobody will take them)."""
    for _, fd in messages:
        if fd is not None and fd != LOST:
            os.close(fd)


async def receive_first(link: Link, timeout_s: float) -> wire.WireMessage:
    """The first message on a new link (hello or welcome), within `timeout_s`."""
    with trio.fail_after(timeout_s):
        messages = await link.receive()
    message, fd = messages[0]
    if len(messages) > 1 or fd is not None:
        close_fds(messages)
        raise wire.WireError("expected one message to start the link")
    return message


__all__ = ["Link", "LinkClosed", "close_fds", "receive_first"]

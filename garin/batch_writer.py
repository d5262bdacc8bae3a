"""Lean socket I/O for the hot paths: batched writes, one-read receives.

`BatchWriter` serves the router <-> shard links: one system call per link per
scheduler pass. `receive_into` is the links' receive.

Theory of operation (writes)
----------------------------
A link carries many small messages. Writing each at once costs a system call
per message; handing them to a writer task costs a task wake-up per batch
(tens of microseconds of trio machinery, at low load once per message). Here
`send` only appends to a queue and, the first time in a pass, puts the writer
on the flusher's list. trio runs every runnable task, then calls the
instruments' `before_io_wait` just before it asks the kernel for I/O events:
that is the end of a pass, and `Flusher.before_io_wait` joins each listed
writer's queue and writes it with one non-blocking `os.write`. So everything
the tasks of one pass produced for a link leaves in one write, with no task
switch.

Only when the kernel buffer is full (the peer is slow) does the rest go to
the writer's own task, which waits until the socket is writable; new messages
queue behind it in order. A write error is kept and raised by that task, so
the link's owner sees a broken link exactly as with a plain `send_all`.
"""

from __future__ import annotations

import os
from typing import Protocol

import trio


class Flushable(Protocol):
    def _flush(self) -> bool:
        """Write what is queued; True if that may have woken a task (a
        partial write handed to a writer task, a failure, a kick)."""
        ...

    def _fail(self, error: BaseException) -> None: ...


def _nothing() -> None:
    pass


class Flusher(trio.abc.Instrument):
    """Flushes the writers that have queued data, once per scheduler pass."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.pending: list[Flushable] = []
        # Counts scheduler passes, so that a writer can tell whether it
        # already wrote in this one (router fan-out coalesces on it).
        self.pass_no = 0
        self._token = token

    def before_io_wait(self, timeout: float) -> None:
        self.pass_no += 1
        if self.pending:
            pending, self.pending = self.pending, []
            woke = False
            for writer in pending:
                try:
                    woke = writer._flush() or woke
                except Exception as exc:
                    # trio drops an instrument that raises, and then no link
                    # would ever flush again: fail this one link instead.
                    writer._fail(exc)
                    woke = True
            if woke and timeout > 0:
                # trio chose how long to wait for I/O before calling us: a
                # task woken here would sleep until some unrelated event.
                # Writing trio's wakeup fd ends that wait at once.
                self._token.run_sync_soon(_nothing)


_FLUSHER: trio.lowlevel.RunVar[Flusher] = trio.lowlevel.RunVar("garin_flusher")


def current_flusher() -> Flusher:
    """This trio run's flusher, installed as an instrument on first use."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = Flusher(trio.lowlevel.current_trio_token())
        trio.lowlevel.add_instrument(flusher)
        _FLUSHER.set(flusher)
        return flusher


class LinkOverflow(trio.BrokenResourceError):
    """The peer stopped reading and the queue passed its limit."""


class BatchWriter:
    """Writes to one socket in batches; `run` must run while it is in use."""

    def __init__(
        self, sock: trio.socket.SocketType, max_queued_bytes: int | None = None, peer: str = "the peer"
    ) -> None:
        self._sock = sock
        self._peer = peer
        self._fd = sock.fileno()
        self._flusher = current_flusher()
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        # Bytes the kernel would not take yet; the writer task owns them.
        self._tail: memoryview | None = None
        self._listed = False
        self._wake = trio.Event()
        self._error: BaseException | None = None

    @property
    def queued(self) -> int:
        """Bytes not yet handed to the kernel."""
        return self._queued_bytes + (len(self._tail) if self._tail is not None else 0)

    def send(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self._max_queued_bytes is not None and self.queued > self._max_queued_bytes:
            self._fail(LinkOverflow(f"{self._peer} is not reading its link"))
            # `run` (and the link's reader) may be waiting on a socket that
            # will never be ready: make them give up now.
            trio.lowlevel.notify_closing(self._sock)
            return
        if not self._listed and self._tail is None:
            self._listed = True
            self._flusher.pending.append(self)

    def close(self) -> None:
        """The owner is closing the socket: never touch its fd again."""
        self._fail(trio.ClosedResourceError("link closed"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._queue.clear()
        self._queued_bytes = 0
        self._tail = None
        self._wake.set()

    def _flush(self) -> bool:
        """Called by the flusher: write the queue now, without blocking."""
        self._listed = False
        if self._tail is not None or self._error is not None or not self._queue:
            return False
        data = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._fail(exc)
            return True
        if written < len(data):
            self._tail = memoryview(data)[written:]
            self._wake.set()
            return True
        return False

    async def run(self) -> None:
        """Finish writes the kernel could not take at once; raise if the link broke."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._tail is not None and self._error is None:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except trio.ClosedResourceError:
                    if self._error is None:
                        raise
                    break  # our own overflow: raise that below
                if self._error is not None:
                    break
                try:
                    written = os.write(self._fd, self._tail)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(exc)
                    break
                self._tail = self._tail[written:] if written < len(self._tail) else None
                if self._tail is None and self._queue:
                    # What queued meanwhile goes next, in order.
                    data = b"".join(self._queue)
                    self._queue.clear()
                    self._queued_bytes = 0
                    self._tail = memoryview(data)
            if self._error is not None:
                error = self._error
                if isinstance(error, trio.BrokenResourceError):
                    raise error
                raise trio.BrokenResourceError(f"link write failed: {error}") from error


async def receive_into(sock: trio.socket.SocketType, buffer: bytearray) -> memoryview:
    """Wait until `sock` is readable, then read once into a reusable buffer.

    The link loops' replacement for `SocketStream.receive_some`, which first
    tries a read (usually a wasted system call and a raised BlockingIOError),
    wraps each call in a conflict detector and more coroutine layers, and
    returns a fresh bytes object (the links read up to 256 KiB at a time: an
    mmap + munmap per read). The view is valid until the next call; empty at
    end of stream. Errors are trio's: BrokenResourceError for a failed read,
    ClosedResourceError if our side closed the socket meanwhile."""
    fd = sock.fileno()
    view = memoryview(buffer)
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            n = os.readv(fd, (buffer,))
        except BlockingIOError:
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
        return view[:n]

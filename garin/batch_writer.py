"""Lean socket I/O for the hot paths: batched writes, one-read receives.

The router <-> shard links write through a `FlushedWriter`: one system call
per link per scheduler pass. `BatchWriter` is the shard's (a queue of
encoded messages); the router's `ShardLink` (router/shard_link.py) writes
what its outbox gives it. `receive_into` is the links' receive.

Theory of operation (writes)
----------------------------
A link carries many small messages. Writing each at once costs a system call
per message; handing them to a writer task costs a task wake-up per batch
(tens of microseconds of trio machinery, at low load once per message). Here
sending only queues (in the writer's queue, or the router's outbox) and, the
first time in a pass, puts the writer on the flusher's list. trio runs every
runnable task, then calls the instruments' `before_io_wait` just before it
asks the kernel for I/O events: that is the end of a pass, and
`Flusher.before_io_wait` has each listed writer take everything queued as one
batch and write it with one non-blocking `os.write`. So everything the tasks
of one pass produced for a link leaves in one write, with no task switch.

Only when the kernel buffer is full (the peer is slow) does the rest go to
the writer's own task, which waits until the socket is writable; new messages
queue behind it in order, and the task writes them once the rest is out. A
write error is kept and raised by that task, so the link's owner sees a
broken link exactly as with a plain `send_all`.
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


class FlushedWriter:
    """What both ends of a router <-> shard link write with: the flusher
    writes each pass's batch at the pass's end; what the kernel would not
    take goes to the owner's writer task (`_drain`), which finishes it and
    then takes the next batch itself, in order.

    A subclass says what the next batch is (`_take`; None or empty: nothing)
    and hears when one is in the socket whole (`_sent`). `partly_sent` tells
    whether part of the batch being written has gone out. The socket is
    `_sock` / `_fd` (None / -1 while there is none)."""

    def __init__(self) -> None:
        self._flusher = current_flusher()
        self._sock: trio.socket.SocketType | None = None
        self._fd = -1
        # Bytes the kernel would not take yet; the writer task owns them.
        self._tail: memoryview | None = None
        self.partly_sent = False
        self._listed = False
        self._wake = trio.Event()
        self._error: BaseException | None = None

    def _take(self) -> bytes | bytearray | None:
        raise NotImplementedError

    def _sent(self) -> None:
        pass

    def _schedule(self) -> None:
        """Have the flusher write at the end of this pass (unless the writer
        task is busy: it takes what is queued when it is done)."""
        if not self._listed and self._fd >= 0 and self._tail is None:
            self._listed = True
            self._flusher.pending.append(self)

    def _flush(self) -> bool:
        """The flusher's call: write the next batch now, without blocking;
        hand a remainder to the writer task (True: that task was woken)."""
        self._listed = False
        if self._fd < 0 or self._tail is not None or self._error is not None:
            return False
        batch = self._take()
        if not batch:
            return False
        try:
            written = os.write(self._fd, batch)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._fail(exc)  # nothing of the batch went
            return True
        if written == len(batch):
            self._sent()
            return False
        self.partly_sent = written > 0
        self._tail = memoryview(batch)[written:]
        self._wake.set()
        return True

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake.set()

    def _overflow(self, error: BaseException) -> None:
        """The peer stopped reading: fail, and wake the tasks waiting on its
        socket (the writer, the reader), which will never be ready."""
        self._fail(error)
        assert self._sock is not None
        trio.lowlevel.notify_closing(self._sock)

    async def _drain(self) -> None:
        """The writer task: finish writes the kernel could not take at once;
        raise BrokenResourceError when a write fails or the link overflowed."""
        sock = self._sock
        assert sock is not None
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # The flusher just found the socket full: wait before writing.
            writable = False
            while self._tail is not None and self._error is None:
                if not writable:
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except trio.ClosedResourceError:
                        if self._error is None:
                            raise
                        break  # our own overflow: raise that below
                    if self._error is not None:
                        break
                try:
                    written = os.write(self._fd, self._tail)
                except BlockingIOError:
                    writable = False
                    continue
                except OSError as exc:
                    self._fail(exc)
                    break
                self.partly_sent = True
                if written < len(self._tail):
                    self._tail = self._tail[written:]
                    writable = False
                    continue
                self._tail = None
                self.partly_sent = False
                self._sent()
                # What queued meanwhile goes next, in order, at once: the
                # kernel just took everything we gave it.
                batch = self._take()
                if batch:
                    self._tail = memoryview(batch)
                    writable = True
            if self._error is not None:
                error = self._error
                if isinstance(error, trio.BrokenResourceError):
                    raise error
                raise trio.BrokenResourceError(f"link write failed: {error}") from error


class BatchWriter(FlushedWriter):
    """Writes to one socket in batches; `run` must run while it is in use."""

    def __init__(
        self, sock: trio.socket.SocketType, max_queued_bytes: int | None = None, peer: str = "the peer"
    ) -> None:
        super().__init__()
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes

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
            self._overflow(LinkOverflow(f"{self._peer} is not reading its link"))
            return
        self._schedule()

    def close(self) -> None:
        """The owner is closing the socket: never touch its fd again."""
        self._fail(trio.ClosedResourceError("link closed"))

    def _take(self) -> bytes | None:
        queue = self._queue
        if not queue:
            return None
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._queued_bytes = 0
        return data

    def _fail(self, error: BaseException) -> None:
        super()._fail(error)
        self._queue.clear()
        self._queued_bytes = 0
        self._tail = None

    async def run(self) -> None:
        """Finish writes the kernel could not take at once; raise if the link broke."""
        await self._drain()


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

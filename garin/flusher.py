"""Writes held to the end of a trio scheduler pass, then made in one go.

Fan-out (garin/websocket.py) writes a room's first frame in a pass to each
member at once; further frames to the same member in that pass (a burst of
joins, several messages read at once) are held and written together when
the pass ends, so a burst costs a member two system calls, not one per frame.

Theory of operation
-------------------
trio runs every runnable task, then calls the instruments' `before_io_wait`
just before it asks the kernel for I/O events: that is the end of a pass.
A writer with something held puts itself on the flusher's list once;
`Flusher.before_io_wait` calls each listed writer's `_flush`. No task wakes
for it.
"""

from __future__ import annotations

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

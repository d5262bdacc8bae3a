"""What stops a router or a shard: SIGTERM or Ctrl-C, or (a child of `garin
run`) the supervisor being gone.

The supervisor keeps the write end of a pipe and gives each child the read
end; nobody ever writes, so the read end turns readable (EOF) exactly when the
supervisor has died, however it died. (prctl's PDEATHSIG would be simpler,
but it fires when the *thread* that forked exits, and trio forks from a
worker thread.)
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

log = logging.getLogger("garin")


async def watch_lifeline(fd: int, stop: Callable[[], None]) -> None:
    await trio.lowlevel.wait_readable(fd)
    log.warning("the supervisor is gone; stopping")
    stop()


async def stop_on_signal(stopping: trio.Event) -> None:
    """Set `stopping` at the first SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stopping.set()
            return

"""Children of `garin run` stop when the supervisor is gone.

The supervisor keeps the write end of a pipe and gives each child the read
end; nobody ever writes, so the read end turns readable (EOF) exactly when the
supervisor has died, however it died. (prctl's PDEATHSIG would be simpler,
but it fires when the *thread* that forked exits, and trio forks from a
worker thread.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger("garin")


async def watch_lifeline(fd: int, stop: Callable[[], None]) -> None:
    await trio.lowlevel.wait_readable(fd)
    log.warning("the supervisor is gone; stopping")
    stop()

"""The router's side of the ban list: an in-memory copy, kept fresh off the loop.

Auth checks read the in-memory `BanList` (no I/O on the event loop). A task
refreshes it from the shared SQLite store every REFRESH_S, so `garin ban`
and other routers' bans arrive within seconds; bans made here are written
through a channel by the same task, in a worker thread.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from garin.bans import BanList, BanPolicy
from garin.banstore import BanStore

log = logging.getLogger("garin.router")

REFRESH_S = 2.0


class RouterBans:
    def __init__(self, path: str, policy: BanPolicy) -> None:
        self.path = path
        self.list = BanList(policy)
        self._writes_in, self._writes_out = trio.open_memory_channel[tuple[str, float, float]](math.inf)
        self._store: BanStore | None = None

    def is_banned(self, subject: str) -> bool:
        return self.list.is_banned(subject, time.time())

    def rate_limited(self, subject: str) -> None:
        """A rate-limit close of `subject`: a strike, maybe a ban."""
        now = time.time()
        until = self.list.strike(subject, now)
        if until is not None:
            log.info("banning subject %r for %.0f s after repeated rate-limit closes", subject, until - now)
            self._writes_in.send_nowait((subject, until, now))

    async def run(self) -> None:
        while self._store is None:
            try:
                self._store = await trio.to_thread.run_sync(BanStore, self.path)
            except Exception as exc:  # unwritable path, locked file: keep serving without bans
                log.error("cannot open the ban list %s: %s; retrying", self.path, exc)
                await trio.sleep(REFRESH_S * 5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_forever)
            while True:
                try:
                    active = await trio.to_thread.run_sync(self._store.active, time.time())
                    self.list.replace(active, time.time())
                except Exception as exc:  # a locked or broken file: keep the copy we have
                    log.warning("cannot read the ban list %s: %s", self.path, exc)
                await trio.sleep(REFRESH_S)

    async def _write_forever(self) -> None:
        assert self._store is not None
        store = self._store
        async for subject, until, now in self._writes_out:
            try:
                await trio.to_thread.run_sync(store.add, subject, until, "rate limit", now)
                self.list.written(subject)
            except Exception as exc:
                log.error("cannot write a ban to %s: %s", self.path, exc)

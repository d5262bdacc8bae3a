"""A process's side of the ban list: an in-memory copy, kept fresh off the loop.

Auth checks read the in-memory `BanList` (no I/O on the event loop). One task,
`run`, owns the shared SQLite store: every REFRESH_S it reloads the active
bans, so `garin ban` and other processes' bans arrive within seconds, and in
between it records the strikes that `rate_limited` queued, one worker-thread
call each. The store counts every process's strikes together and decides the
ban (garin/bans.py, garin/banstore.py); a ban decided here is applied to the
copy at once. Refreshes and strikes run one after the other in that task, so
a refresh read before a ban was stored can never undo it.

Any process that closes clients for the rate limit runs one of these
(`await bans.run()` in its nursery) and calls `rate_limited`.

With GARIN_REDIS_URL the store is Redis (garin/redisbans.py), shared by every
host: the same loop, the same rules, the store's calls awaited directly
instead of in a worker thread.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

from garin.bans import Ban, BanList, BanPolicy, Verdict
from garin.banstore import BanStore

log = logging.getLogger("garin.router")

REFRESH_S = 2.0
# Strikes waiting for the store (each is one rate-limit close). A store that
# stays unreachable must not cost unbounded memory; past this, strikes are
# dropped with a warning, which can only delay a ban.
MAX_QUEUED_STRIKES = 1024


class Store(Protocol):
    async def active(self, now: float) -> dict[str, float]: ...

    async def strike(self, subject: str, now: float, policy: BanPolicy) -> Verdict: ...


class SqliteStore:
    """BanStore's blocking calls, each in a worker thread."""

    def __init__(self, store: BanStore) -> None:
        self._store = store

    async def active(self, now: float) -> dict[str, float]:
        return await trio.to_thread.run_sync(self._store.active, now)

    async def strike(self, subject: str, now: float, policy: BanPolicy) -> Verdict:
        return await trio.to_thread.run_sync(self._store.strike, subject, now, policy)


class RouterBans:
    def __init__(self, path: str, policy: BanPolicy, redis_url: str = "", redis_password_file: str = "") -> None:
        # `path` names the list in logs: the SQLite file, or "Redis".
        self.path = "Redis" if redis_url else path
        self._sqlite_path = path
        self._redis = (redis_url, redis_password_file)
        self.policy = policy
        self.list = BanList()
        self._strikes_in, self._strikes_out = trio.open_memory_channel[tuple[str, float]](MAX_QUEUED_STRIKES)
        self._dropped = 0

    def is_banned(self, subject: str) -> bool:
        return self.list.is_banned(subject, time.time())

    def rate_limited(self, subject: str) -> None:
        """A rate-limit close of `subject`: a strike, maybe a ban. Never blocks."""
        now = time.time()
        if self.policy.strikes <= 0 or self.list.is_banned(subject, now):
            return
        try:
            self._strikes_in.send_nowait((subject, now))
        except trio.WouldBlock:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % MAX_QUEUED_STRIKES == 0:
                log.warning("ban list %s: %d strikes dropped, the store is not keeping up", self.path, self._dropped)

    async def run(self) -> None:
        url, password_file = self._redis
        if url:
            from garin.redisbans import RedisBanStore

            async with RedisBanStore.open(url, password_file) as redis_store:
                await self._serve(redis_store)
        else:
            await self._serve(SqliteStore(await self._open()))

    async def _serve(self, store: Store) -> None:
        next_refresh = trio.current_time()
        while True:
            item: tuple[str, float] | None = None
            with trio.move_on_at(next_refresh):
                item = await self._strikes_out.receive()
            if item is None:
                await self._refresh(store)
                next_refresh = trio.current_time() + REFRESH_S
            else:
                await self._strike(store, *item)

    async def _open(self) -> BanStore:
        while True:
            try:
                return await trio.to_thread.run_sync(BanStore, self._sqlite_path)
            except Exception as exc:  # unwritable path, locked file: keep serving without bans
                log.error("cannot open the ban list %s: %s; retrying", self.path, exc)
                await trio.sleep(REFRESH_S * 5)

    async def _refresh(self, store: Store) -> None:
        try:
            active = await store.active(time.time())
        except Exception as exc:  # a locked or broken file: keep the copy we have
            log.warning("cannot read the ban list %s: %s", self.path, exc)
            return
        self.list.replace(active, time.time())

    async def _strike(self, store: Store, subject: str, now: float) -> None:
        if self.list.is_banned(subject, time.time()):
            return  # banned by an earlier strike in the queue: the store would ignore it too
        try:
            verdict = await store.strike(subject, now, self.policy)
        except Exception as exc:
            log.error("cannot record a strike in the ban list %s: %s", self.path, exc)
            return
        if isinstance(verdict, Ban):
            self.list.extend(subject, verdict.until)
            log.info("banned subject %r until %s after repeated rate-limit closes", subject, _when(verdict.until))


def _when(until: float) -> str:
    if until == float("inf"):
        return "removed"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))

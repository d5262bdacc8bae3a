"""Connections per client, as the other routers of this host count them.

With `--routers N` every router accepts from one listening socket, so one
client's connections spread over all of them; GARIN_MAX_CONNECTIONS_PER_IP
is a limit for the host, so each router must see the others' counts.

Theory of operation
-------------------
A file in the socket directory (`client-counts`, memory-mapped by every
router) has SLOTS rows. A router claims a free row when it starts (under
an flock: no other router claims at the same time), writes its identity
(pid and start time, so a reused pid is not mistaken for it) and from then
on keeps, per bucket (a CRC-32 of the client's key), how many connections
it holds of the clients in that bucket. Only the owner writes a row, so
no locks: a 4-byte aligned store is atomic. To ask how many connections a
client holds elsewhere, a router adds that bucket over the other routers'
rows, those whose owner is alive (looked up at most once a second). A row
whose owner died is skipped, and free for the next router that starts.

What it is not: exact. Two clients in one bucket count together on the
other routers (65,536 buckets: a bucket rarely holds two busy clients),
and two routers admitting one client at the same moment can each see the
other's count from before: a client can go over its limit by one per
extra router, for as long as those connections last. More than SLOTS
routers: the rest count alone (a warning says so). Cost: about 1.3 us
of a router's CPU per connection (a look-up and two counts), against the
~230 us it spends on one.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import time
import zlib
from pathlib import Path

log = logging.getLogger("garin.router")

FILE_NAME = "client-counts"
SLOTS = 16
BUCKETS = 1 << 16
# A row: its owner's pid and start time, padding, then a uint32 per bucket.
_HEADER = 4
_ROW = _HEADER + BUCKETS
# How long the list of live rows is trusted.
REFRESH_S = 1.0


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: fields
    # count from after its closing parenthesis; start time is field 22.
    return int(stat[stat.rindex(b")") + 2 :].split()[19]) & 0xFFFFFFFF


def bucket_of(key: str) -> int:
    # Not hash(): it differs between processes.
    return zlib.crc32(key.encode()) & (BUCKETS - 1)


class ClientCounts:
    """This router's row, and the other routers' counts."""

    def __init__(self, socket_dir: str | Path, pid: int | None = None) -> None:
        """Claim a row of `socket_dir`'s table, or count alone (`claimed`
        False) if every row is taken. `pid`: for tests, the process that
        owns the row (it must be alive)."""
        self.pid = os.getpid() if pid is None else pid
        self._identity = (self.pid, _start_time(self.pid))
        path = Path(socket_dir) / FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = SLOTS * _ROW * 4
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._path = path
        self._cells = memoryview(self._map).cast("I")
        self._row: int | None = None
        self._others: list[int] = []
        self._checked = -REFRESH_S
        self._claim()

    @property
    def claimed(self) -> bool:
        return self._row is not None

    def _alive(self, row: int) -> bool:
        base = row * _ROW
        pid, start = self._cells[base], self._cells[base + 1]
        return pid != 0 and _start_time(pid) == start and start != 0

    def _claim(self) -> None:
        with open(self._path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for row in range(SLOTS):
                if self._alive(row):
                    continue
                base = row * _ROW
                self._cells[base] = 0
                self._map[(base + _HEADER) * 4 : (base + _ROW) * 4] = bytes(BUCKETS * 4)
                self._cells[base + 1] = self._identity[1]
                self._cells[base] = self._identity[0]
                self._row = row
                return
        log.warning(
            "%s: all %d rows are taken by live routers: this one counts connections per client alone", self._path, SLOTS
        )

    def add(self, key: str, delta: int) -> None:
        """This router now holds `delta` more (or fewer) of `key`'s connections."""
        if self._row is not None:
            cell = self._row * _ROW + _HEADER + bucket_of(key)
            self._cells[cell] = min(max(self._cells[cell] + delta, 0), 0xFFFFFFFF)

    def elsewhere(self, key: str) -> int:
        """Connections the other live routers hold in `key`'s bucket."""
        now = time.monotonic()
        if now - self._checked >= REFRESH_S:
            self._checked = now
            self._others = [row for row in range(SLOTS) if row != self._row and self._alive(row)]
        if not self._others:
            return 0
        cell = _HEADER + bucket_of(key)
        cells = self._cells
        return sum(cells[row * _ROW + cell] for row in self._others)

    def close(self) -> None:
        """Give the row back (its counts with it)."""
        if self._row is not None:
            self._cells[self._row * _ROW] = 0
            self._row = None
        self._cells.release()
        self._map.close()

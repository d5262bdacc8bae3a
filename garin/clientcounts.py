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
extra router, for as long as those connections last. A router's row counts
from the moment it is claimed (the others read the rows' owners at every
question), and a dead router's row stops counting within REFRESH_S.
A trusted proxy's connections are not shared (limits.py): they are many
clients, and would count against whoever shares their bucket.

Where the table cannot work, a router counts alone, with a warning: all
rows taken by live routers, no way to tell processes apart (no
/proc/PID/stat: another OS, or routers in separate PID namespaces), or no
room on the socket directory's filesystem for its row (the row is
allocated before it is written through the map, where a full filesystem
would kill the process with SIGBUS). Cost: a few microseconds of a
router's CPU per connection, against the ~230 us it spends on one.
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
# As many as GARIN_ROUTERS allows. The file is sparse: a router allocates
# its own row only (256 KiB).
SLOTS = 64
BUCKETS = 1 << 16
# The file: a page of owners (4 uint32 per row: pid, start time, padding),
# then the rows, a uint32 per bucket. Only allocated pages are ever read (a
# read of a hole in a tmpfs file allocates it, and on a full one is SIGBUS).
_OWNER = 4
_COUNTS = 1024
_SIZE = (_COUNTS + SLOTS * BUCKETS) * 4
# How long a row's owner, once looked up in /proc, is taken to be alive.
REFRESH_S = 1.0


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (low 32 bits, at
    least 1); 0 if there is no such process; None if it cannot be told."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return 0
    except OSError:
        return None  # out of descriptors, no /proc, ...
    # The command name (field 2) may hold spaces and parentheses: fields
    # count from after its closing parenthesis; start time is field 22.
    try:
        return (int(stat[stat.rindex(b")") + 2 :].split()[19]) & 0xFFFFFFFF) or 1
    except (ValueError, IndexError):
        return None


def bucket_of(key: str) -> int:
    # Not hash(): it differs between processes.
    return zlib.crc32(key.encode()) & (BUCKETS - 1)


class ClientCounts:
    """This router's row, and the other routers' counts."""

    def __init__(self, socket_dir: str | Path, pid: int | None = None) -> None:
        """Claim a row of `socket_dir`'s table, or count alone (`claimed`
        False, a warning logged). `pid`: for tests, the process that owns
        the row (it must be alive)."""
        self.pid = os.getpid() if pid is None else pid
        self._path = Path(socket_dir) / FILE_NAME
        self._row: int | None = None
        self._map: mmap.mmap | None = None
        self._others: list[int] = []
        self._owners: tuple[list[int], list[int]] = ([], [])
        self._checked = -REFRESH_S
        start = _start_time(self.pid)
        if not start:
            log.warning("cannot tell processes apart (no /proc/%d/stat): this router counts connections per client alone", self.pid)
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one router claims at a time
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            try:
                os.posix_fallocate(fd, 0, _COUNTS * 4)
            except OSError as exc:
                log.warning("%s: %s: this router counts connections per client alone", self._path, exc.strerror)
                return
            self._map = mmap.mmap(fd, _SIZE)
            self._cells = memoryview(self._map).cast("I")
            self._claim(fd, start)
        finally:
            # Unlocked explicitly: the map holds a duplicate of `fd`, which
            # would keep the lock until the map is closed.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def claimed(self) -> bool:
        return self._row is not None

    def _alive(self, pid: int, start: int) -> bool:
        """Is the owner (pid, start) of a row alive? Unknown counts as alive."""
        if pid == 0:
            return False
        now = _start_time(pid)
        return now is None or now == start

    def _claim(self, fd: int, start: int) -> None:
        cells = self._cells
        for row in range(SLOTS):
            owner = row * _OWNER
            if self._alive(cells[owner], cells[owner + 1]):
                continue
            offset = (_COUNTS + row * BUCKETS) * 4
            try:
                # Allocated before the map touches it (no SIGBUS on a full
                # filesystem), and emptied of a dead owner's counts.
                os.posix_fallocate(fd, offset, BUCKETS * 4)
                os.pwrite(fd, bytes(BUCKETS * 4), offset)
            except OSError as exc:
                log.warning("%s: no room for this router's row (%s): it counts connections per client alone", self._path, exc.strerror)
                return
            cells[owner + 1] = start
            cells[owner] = self.pid
            self._row = row
            return
        log.warning(
            "%s: all %d rows are taken by live routers: this one counts connections per client alone", self._path, SLOTS
        )

    def add(self, key: str, delta: int) -> None:
        """This router now holds `delta` more (or fewer) of `key`'s connections."""
        if self._row is not None:
            cell = _COUNTS + self._row * BUCKETS + bucket_of(key)
            self._cells[cell] = min(max(self._cells[cell] + delta, 0), 0xFFFFFFFF)

    def elsewhere(self, key: str) -> int:
        """Connections the other live routers hold in `key`'s bucket."""
        if self._map is None:
            return 0
        cells = self._cells
        # Every row's owner, read at each question (two strided copies): a
        # router that just started counts at once. /proc is read again only
        # when an owner changed or REFRESH_S has passed (one may have died).
        owners = (cells[0 : SLOTS * _OWNER : _OWNER].tolist(), cells[1 : SLOTS * _OWNER : _OWNER].tolist())
        now = time.monotonic()
        if owners != self._owners or now - self._checked >= REFRESH_S:
            self._owners, self._checked = owners, now
            pids, starts = owners
            self._others = [
                row for row in range(SLOTS) if row != self._row and self._alive(pids[row], starts[row])
            ]
        cell = _COUNTS + bucket_of(key)
        return sum(cells[cell + row * BUCKETS] for row in self._others)

    def close(self) -> None:
        """Give the row back (its counts with it)."""
        if self._map is None:
            return
        if self._row is not None:
            self._cells[self._row * _OWNER] = 0
            self._row = None
        self._cells.release()
        self._map.close()
        self._map = None

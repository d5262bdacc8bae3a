"""The ban list on disk: one SQLite file shared by every router and `garin ban`.

All calls here block; routers run them with `trio.to_thread.run_sync`, never on
the event loop. WAL mode lets several routers and the CLI use the file at once.

Two tables: `bans` (one row per subject, NULL `until` = until removed) and
`strikes` (one row per rate-limit close still inside the ban window). A strike
is recorded and judged in one write transaction (BEGIN IMMEDIATE), so strikes
from several processes at once are counted one after the other, each seeing
the others'; what a strike does is `BanPolicy.judge`'s decision, and an
automatic ban's end is `later` of the old and the new (garin/bans.py). Each
strike first deletes the strikes that fell out of the window, so the table
holds at most one window's strikes.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from garin.bans import FOREVER, Ban, BanPolicy, Count, Verdict, later
from garin.config import Config, ConfigError

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS bans (
        subject TEXT PRIMARY KEY,
        until REAL,            -- unix time the ban ends; NULL = until removed
        reason TEXT NOT NULL,
        created REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS strikes (
        subject TEXT NOT NULL,
        at REAL NOT NULL       -- unix time of the rate-limit close
    )
    """,
    "CREATE INDEX IF NOT EXISTS strikes_by_subject ON strikes (subject, at)",
)


def where(config: Config) -> str:
    """The line a server logs once at start, so that an operator knows which
    file `garin ban` must use (it prints the same absolute path)."""
    if config.redis_url:
        return "ban list: Redis (GARIN_REDIS_URL; GARIN_BAN_DB is not used)"
    if not config.ban_db:
        return "ban list off (GARIN_BAN_DB is empty)"
    return f"ban list: {os.path.abspath(config.ban_db)}"


def open_at_start(config: Config) -> None:
    """A server's check before it serves: the ban list file opens (it is
    created if missing), or ConfigError names GARIN_BAN_DB. A server that
    started without one would serve with no bans at all, logging an error
    every few seconds. Nothing to check with bans off or in Redis."""
    if not config.ban_db or config.redis_url:
        return
    path = os.path.abspath(config.ban_db)
    if os.path.isdir(path):
        raise ConfigError(f"GARIN_BAN_DB: {path} is a directory; name a file, e.g. {os.path.join(path, 'bans.sqlite3')}")
    try:
        BanStore(path)
    except OSError as exc:  # its directory cannot be created
        raise ConfigError(f"GARIN_BAN_DB: cannot create {exc.filename} for {path}: {exc.strerror}") from None
    except sqlite3.Error as exc:
        raise ConfigError(f"GARIN_BAN_DB: cannot use {path}: {exc}") from None


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700, as the XDG
    Base Directory spec asks of $XDG_STATE_HOME (the default ban list is
    $XDG_STATE_HOME/garin/bans.sqlite3): the list names users."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def _end(until: float | None) -> float:
    """A stored `until` as a ban end (NULL: FOREVER)."""
    return FOREVER if until is None else until


def _stored(until: float | None) -> float | None:
    return None if until in (None, FOREVER) else until


class BanStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        make_private_dirs(Path(path).parent)
        # Two routers creating a new file at once: switching to WAL fails at
        # once with "database is locked" (the busy timeout does not apply), so
        # retry briefly; the other process's switch will have succeeded.
        for attempt in range(50):
            try:
                with closing(self._connect()) as db, db:
                    db.execute("PRAGMA journal_mode=WAL")
                    for statement in SCHEMA:
                        db.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.02 + random.random() * 0.05)

    def _connect(self, autocommit: bool = False) -> sqlite3.Connection:
        """`autocommit`: no implicit transactions (the caller sends BEGIN and COMMIT)."""
        if autocommit:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=5.0)
        # WAL: a commit need not wait for the disk; a power cut may lose the
        # last strikes, never corrupt the file.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its first read."""
        with closing(self._connect(autocommit=True)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def add(self, subject: str, until: float | None, reason: str, now: float) -> None:
        """Set a ban as given (`garin ban add`): it may shorten one."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO bans (subject, until, reason, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET until = excluded.until, reason = excluded.reason, "
                "created = excluded.created",
                (subject, _stored(until), reason, now),
            )

    def extend(self, subject: str, until: float, reason: str, now: float) -> float:
        """An automatic ban: the ban ends at the later of its stored end and `until`;
        that end is returned."""
        with self._writing() as db:
            return self._extend(db, subject, until, reason, now)

    def _extend(self, db: sqlite3.Connection, subject: str, until: float, reason: str, now: float) -> float:
        row = db.execute("SELECT until FROM bans WHERE subject = ?", (subject,)).fetchone()
        current = None if row is None else _end(row[0])
        end = later(current, until)
        assert end is not None
        if end != current:
            db.execute(
                "INSERT INTO bans (subject, until, reason, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET until = excluded.until, reason = excluded.reason, "
                "created = excluded.created",
                (subject, _stored(end), reason, now),
            )
        return end

    def strike(self, subject: str, now: float, policy: BanPolicy) -> Verdict:
        """Record a rate-limit close of `subject` at `now`, counted with every
        process's strikes; what it did (a Ban carries the ban's stored end)."""
        since = policy.window_start(now)
        with self._writing() as db:
            db.execute("DELETE FROM strikes WHERE at < ?", (since,))
            row = db.execute("SELECT until FROM bans WHERE subject = ?", (subject,)).fetchone()
            banned_until = None if row is None else _end(row[0])
            (earlier,) = db.execute(
                "SELECT count(*) FROM strikes WHERE subject = ? AND at >= ?", (subject, since)
            ).fetchone()
            verdict = policy.judge(banned_until, earlier, now)
            if isinstance(verdict, Count):
                db.execute("INSERT INTO strikes (subject, at) VALUES (?, ?)", (subject, now))
            elif isinstance(verdict, Ban):
                db.execute("DELETE FROM strikes WHERE subject = ?", (subject,))
                verdict = Ban(self._extend(db, subject, verdict.until, "rate limit", now))
            return verdict

    def remove(self, subject: str) -> bool:
        with closing(self._connect()) as db, db:
            return db.execute("DELETE FROM bans WHERE subject = ?", (subject,)).rowcount > 0

    def active(self, now: float) -> dict[str, float]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT subject, until FROM bans WHERE until IS NULL OR until > ?", (now,))
            return {subject: _end(until) for subject, until in rows}

    def listing(self, now: float) -> list[tuple[str, float | None, str, float]]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT subject, until, reason, created FROM bans WHERE until IS NULL OR until > ? ORDER BY created",
                (now,),
            )
            return list(rows)

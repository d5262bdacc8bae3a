"""The ban list on disk: one SQLite file shared by every router and `garin ban`.

All calls here block; routers run them with `trio.to_thread.run_sync`, never on
the event loop. WAL mode lets several routers and the CLI use the file at once.
"""

from __future__ import annotations

import random
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from garin.bans import FOREVER

SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    subject TEXT PRIMARY KEY,
    until REAL,            -- unix time the ban ends; NULL = until removed
    reason TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class BanStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # Two routers creating a new file at once: switching to WAL fails at
        # once with "database is locked" (the busy timeout does not apply), so
        # retry briefly; the other process's switch will have succeeded.
        for attempt in range(50):
            try:
                with closing(self._connect()) as db, db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.02 + random.random() * 0.05)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5.0)

    def add(self, subject: str, until: float | None, reason: str, now: float) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO bans (subject, until, reason, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET until = excluded.until, reason = excluded.reason, "
                "created = excluded.created",
                (subject, None if until in (None, FOREVER) else until, reason, now),
            )

    def remove(self, subject: str) -> bool:
        with closing(self._connect()) as db, db:
            return db.execute("DELETE FROM bans WHERE subject = ?", (subject,)).rowcount > 0

    def active(self, now: float) -> dict[str, float]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT subject, until FROM bans WHERE until IS NULL OR until > ?", (now,))
            return {subject: FOREVER if until is None else until for subject, until in rows}

    def listing(self, now: float) -> list[tuple[str, float | None, str, float]]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT subject, until, reason, created FROM bans WHERE until IS NULL OR until > ? ORDER BY created",
                (now,),
            )
            return list(rows)

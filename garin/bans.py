"""The ban list's rules, as pure objects: strikes, windows, ban expiry.

A strike is one close by the rate limiter ("rate limit exceeded"). A subject
(the token's `sub`) with `strikes` strikes inside `window_s` is banned for
`ban_s`. Bans may also be set by hand (`garin ban add`), with or without an
end. Times are wall-clock seconds passed in by the caller.

Every process that closes clients (routers, and whatever else runs a
`router.bans.RouterBans`) records its strikes in one shared store
(`garin/banstore.py`), which asks `BanPolicy.judge` what each strike does,
knowing the subject's current ban and its earlier strikes in the window, all
processes' together. So three strikes ban a subject whether they came through
one router or three. The rules:

- A subject that is banned gets no strikes: closes of connections it opened
  before its ban do not add up to another ban.
- An automatic ban never shortens a ban: the stored end becomes the later of
  the two (`later`), and a ban without an end (FOREVER) stays one. Only
  `garin ban add` and `garin ban remove`, the operator's word, set an end
  outright.
- A ban clears the subject's strikes: after it ends, counting starts afresh.

`BanList` is a process's in-memory copy of the active bans, refreshed from the
store, so that checking a token at auth costs no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FOREVER = float("inf")


def later(a: float | None, b: float | None) -> float | None:
    """The later of two ban ends (None: no ban, FOREVER: until removed)."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass(frozen=True, slots=True)
class Ignore:
    """Not a strike: automatic bans are off, or the subject is banned already."""


@dataclass(frozen=True, slots=True)
class Count:
    """A strike, below the number that bans."""


@dataclass(frozen=True, slots=True)
class Ban:
    """The strike that bans: the subject's ban now ends at `until`."""

    until: float


Verdict = Ignore | Count | Ban


@dataclass(frozen=True, slots=True)
class BanPolicy:
    strikes: int = 3  # 0: automatic bans off
    window_s: float = 600.0
    ban_s: float = 3600.0

    def window_start(self, now: float) -> float:
        """Strikes at or after this time count at `now`; earlier ones may be forgotten."""
        return now - self.window_s

    def judge(self, banned_until: float | None, earlier_strikes: int, now: float) -> Verdict:
        """What a rate-limit close at `now` does, given the subject's stored ban end
        (None: none) and its strikes since `window_start(now)`, this one not included."""
        if self.strikes <= 0:
            return Ignore()
        if banned_until is not None and banned_until > now:
            return Ignore()
        if earlier_strikes + 1 < self.strikes:
            return Count()
        return Ban(now + self.ban_s)


@dataclass(slots=True)
class BanList:
    # subject -> unix time the ban ends (FOREVER for a ban until removed)
    bans: dict[str, float] = field(default_factory=dict)

    def is_banned(self, subject: str, now: float) -> bool:
        until = self.bans.get(subject)
        if until is None:
            return False
        if now >= until:
            del self.bans[subject]
            return False
        return True

    def extend(self, subject: str, until: float) -> None:
        """An automatic ban, already stored: never shortens the one we know of."""
        self.bans[subject] = max(until, self.bans.get(subject, until))

    def replace(self, bans: dict[str, float], now: float) -> None:
        """Take the stored ban list (another process or `garin ban` changed it)."""
        self.bans = {subject: until for subject, until in bans.items() if until > now}

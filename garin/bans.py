"""The ban list's rules, as a pure object: strikes, windows, ban expiry.

A strike is one close by the rate limiter. A subject (the token's `sub`) with
`strikes` strikes inside `window_s` is banned for `ban_s`. Bans may also be
set by hand (`garin ban add`), with or without an end. Times are wall-clock
seconds passed in by the caller; storage lives in `garin/banstore.py`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

FOREVER = float("inf")


@dataclass(frozen=True, slots=True)
class BanPolicy:
    strikes: int = 3  # 0: automatic bans off
    window_s: float = 600.0
    ban_s: float = 3600.0


@dataclass(slots=True)
class BanList:
    policy: BanPolicy
    # subject -> unix time the ban ends (FOREVER for a manual permanent ban)
    bans: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, deque[float]] = field(default_factory=dict)
    # Bans made here and not yet confirmed written to the store: a refresh
    # from the store must not forget them in the meantime.
    pending: set[str] = field(default_factory=set)

    def is_banned(self, subject: str, now: float) -> bool:
        until = self.bans.get(subject)
        if until is None:
            return False
        if now >= until:
            del self.bans[subject]
            return False
        return True

    def strike(self, subject: str, now: float) -> float | None:
        """Record a rate-limit close; the ban's end if this strike bans them."""
        if self.policy.strikes <= 0:
            return None
        recent = self._strikes.setdefault(subject, deque(maxlen=self.policy.strikes))
        recent.append(now)
        while recent and now - recent[0] > self.policy.window_s:
            recent.popleft()
        if len(recent) < self.policy.strikes:
            return None
        recent.clear()
        until = now + self.policy.ban_s
        self.bans[subject] = max(until, self.bans.get(subject, 0.0))
        self.pending.add(subject)
        return until

    def written(self, subject: str) -> None:
        self.pending.discard(subject)

    def replace(self, bans: dict[str, float], now: float) -> None:
        """Take the stored ban list (another router or `garin ban` changed it)."""
        fresh = {subject: until for subject, until in bans.items() if until > now}
        for subject in self.pending:
            if subject in self.bans:
                fresh[subject] = max(fresh.get(subject, 0.0), self.bans[subject])
        self.bans = fresh

"""The ban list's rules, as pure objects: strikes, windows, ban expiry.

A strike is one close by the rate limiter ("rate limit exceeded"). A subject
(the token's `sub`, or for a token without one the fallback of `subject_of`)
with `strikes` strikes inside `window_s` is banned for `ban_s`. Bans may also be set by hand (`garin ban add`), with or without an
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

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FOREVER = float("inf")

# Claims that differ between two tokens of one user (RFC 7519 §4.1): left
# out of the fallback subject, so that a fresh token does not escape a ban.
PER_TOKEN_CLAIMS = frozenset(("exp", "nbf", "iat", "jti"))
NO_SUB_PREFIX = "nosub:"


def subject_of(claims: Mapping[str, Any]) -> str:
    """Who a valid token's strikes and bans count against: its `sub`, or for
    a token without a string `sub` (some GarinChat deployments mint those),
    `nosub:` and the first 32 hex digits of the SHA-256 of its other claims
    (all but exp, nbf, iat, jti) as sorted, compact JSON: the same for every
    token the issuer mints for that user. A token with no other claims at
    all is hashed whole (it identifies only itself)."""
    sub = claims.get("sub")
    if isinstance(sub, str):
        return sub
    identity = {k: v for k, v in claims.items() if k not in PER_TOKEN_CLAIMS} or dict(claims)
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return NO_SUB_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:32]


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

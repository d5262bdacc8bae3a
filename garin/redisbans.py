"""The ban list in Redis (GARIN_REDIS_URL set): shared by every host's routers
and `garin ban`, instead of one host's SQLite file (garin/banstore.py).

Keys: `garin:bans`, a hash subject -> "until<TAB>reason<TAB>created" (until
`inf` for a ban until removed, unix times), and `garin:strikes:<subject>`, a
sorted set of rate-limit closes by time (expiring with the window).

A strike is recorded and judged in one Lua script, so strikes from several
hosts at once are counted one after the other. The script applies
`BanPolicy.judge` (garin/bans.py) to the stored ban and the strikes in the
window; tests/e2e/test_redis.py checks that both give the same verdicts.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

from garin.bans import FOREVER, Ban, BanPolicy, Count, Ignore, Verdict

BANS = "garin:bans"
REPLY_TIMEOUT_S = 5.0

# ARGV: subject, now, window start, strikes that ban (0: never), ban seconds.
# Returns "ignore", "count" or the new ban's end. As BanPolicy.judge: no
# strike while automatic bans are off or the subject is banned; the strike
# that reaches the count bans from now (an earlier ban has ended by then).
STRIKE = """
local subject, now = ARGV[1], tonumber(ARGV[2])
local limit, ban_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local strikes = 'garin:strikes:' .. subject
redis.call('ZREMRANGEBYSCORE', strikes, '-inf', '(' .. ARGV[3])
if limit <= 0 then return 'ignore' end
local row = redis.call('HGET', KEYS[1], subject)
if row then
  local stored = string.match(row, '^([^\\t]*)')
  if stored == 'inf' or tonumber(stored) > now then return 'ignore' end
end
local earlier = redis.call('ZCARD', strikes)
if earlier + 1 < limit then
  redis.call('ZADD', strikes, ARGV[2], ARGV[2] .. ':' .. redis.call('INCR', 'garin:strikeno'))
  redis.call('EXPIRE', strikes, math.ceil(now - tonumber(ARGV[3])) + 1)
  return 'count'
end
redis.call('DEL', strikes)
local ends = string.format('%.3f', now + ban_s)
redis.call('HSET', KEYS[1], subject, ends .. '\\trate limit\\t' .. string.format('%.3f', now))
return ends
"""


def _row(until: float | None, reason: str, now: float) -> str:
    return f"{'inf' if until is None or until == FOREVER else f'{until:.3f}'}\t{reason}\t{now:.3f}"


def _parse(row: bytes) -> tuple[float, str, float]:
    until, reason, created = row.decode().split("\t", 2)
    return (FOREVER if until == "inf" else float(until)), reason, float(created)


class RedisBanStore:
    """The same operations as BanStore, async, against Redis."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, password_file: str = "") -> AsyncIterator[RedisBanStore]:
        extra: dict[str, Any] = {}
        if password_file:
            extra["password"] = Path(password_file).read_text().strip()
        client = coredis.Redis.from_url(
            url, decode_responses=False, connect_timeout=REPLY_TIMEOUT_S, stream_timeout=REPLY_TIMEOUT_S,
            retry_policy=NoRetryPolicy(), verify_version=False, **extra,
        )
        async with client:
            yield cls(client)

    async def strike(self, subject: str, now: float, policy: BanPolicy) -> Verdict:
        with trio.fail_after(REPLY_TIMEOUT_S):
            answer = await self._client.eval(
                STRIKE, keys=[BANS],
                args=[subject, repr(now), repr(policy.window_start(now)), policy.strikes, repr(policy.ban_s)],
            )
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if text == "ignore":
            return Ignore()
        if text == "count":
            return Count()
        return Ban(float(text))

    async def active(self, now: float) -> dict[str, float]:
        with trio.fail_after(REPLY_TIMEOUT_S):
            rows = await self._client.hgetall(BANS)
        bans = {}
        for subject, row in rows.items():
            until = _parse(row)[0]
            if until > now:
                bans[subject.decode()] = until
        return bans

    async def add(self, subject: str, until: float | None, reason: str, now: float) -> None:
        with trio.fail_after(REPLY_TIMEOUT_S):
            await self._client.hset(BANS, {subject: _row(until, reason, now)})

    async def remove(self, subject: str) -> bool:
        with trio.fail_after(REPLY_TIMEOUT_S):
            return bool(await self._client.hdel(BANS, [subject]))

    async def listing(self, now: float) -> list[tuple[str, float | None, str, float]]:
        with trio.fail_after(REPLY_TIMEOUT_S):
            rows = await self._client.hgetall(BANS)
        listed = []
        for subject, row in rows.items():
            until, reason, created = _parse(row)
            if until > now:
                listed.append((subject.decode(), None if math.isinf(until) else until, reason, created))
        return sorted(listed, key=lambda r: r[3])

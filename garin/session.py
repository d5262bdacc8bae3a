"""One client connection's rules, as a pure state machine.

Theory of operation
-------------------
A connection moves through AWAIT_AUTH -> AWAIT_JOIN -> IN_ROOM and ends in
CLOSED. `userleave` takes it from IN_ROOM back to AWAIT_JOIN (it may join
again, on any shard, within the join timeout).

Time is a set of deadlines; `deadline` is the earliest one pending, and the
shell sleeps until then and calls `timeout(now)`:
- the state's own: auth (AWAIT_AUTH) and join (AWAIT_JOIN) timeouts;
- keepalive, in every state: `ping_interval_s` after the last frame of any
  kind (a pong or a ping too) the session asks for a ping (`SendPing`); if
  nothing at all arrives within `ping_timeout_s` of it, the peer is gone;
- idle, in IN_ROOM: a member whose last data frame (a text frame: message,
  join, userleave) is `idle_timeout_s` old is closed. Pings and pongs only
  prove the peer is alive, not that its user is there, so they do not count.
When several deadlines have passed, the one that passed first decides the
close. A frame that arrives after a deadline is too late, even if the shell
has not woken up for it yet.

Every input returns a list of actions for the shell to apply in order:
`JoinRoom`, `Publish`, `LeaveRoom`, `SendPing`, and finally at most one
`CloseClient`. A `CloseClient` while in a room implies leaving it: the shell
tells the shard, so the room always hears `userleave`. Nothing here reads a
clock or does I/O: `now` is passed in (seconds, any monotonic origin), and the
token check is a callable given at construction, so thousands of sessions run
in a unit test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from enum import Enum

from garin import closes
from garin.closes import Close
from garin.protocol import Auth, Join, Message, NameLimits, UserLeave, parse_client_text


# How early a message may arrive, as a share of the rate limit's spacing
# (window / count), without counting as too fast: see Session._message.
RATE_JITTER = 0.25

# The frame budget: pings, pongs and fragments that carry no whole message.
# Keepalive pings come every tens of seconds and browsers never fragment, so
# 100 at once, then 20 a second, is far above any honest client; a flood of
# empty frames costs garin a parser pass each and is closed instead.
FRAME_BURST = 100
FRAMES_PER_S = 20.0


def _offset(value: Any) -> float:
    """A time in a snapshot: a finite number of seconds."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"not a time offset: {value!r:.40}")
    return float(value)


class State(Enum):
    AWAIT_AUTH = "await_auth"
    AWAIT_JOIN = "await_join"
    IN_ROOM = "in_room"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionRules:
    auth_timeout_s: float = 2.0
    join_timeout_s: float = 2.0
    # At most rate_limit_count messages in any rate_limit_window_s; 0 = no limit.
    rate_limit_count: int = 1
    rate_limit_window_s: float = 1.0
    names: NameLimits = NameLimits()
    # Longest message body, in characters; 0 = only the frame size limits it.
    # 4096 is Telegram's limit for one message: room for a long paragraph,
    # not for pasting a file into everyone's window.
    max_body_chars: int = 4096
    # Keepalive; 0 = never ping. 20 s / 20 s are the websockets library's
    # defaults: well inside the 60 s idle cut of common proxies (nginx
    # proxy_read_timeout, AWS ALB), and a dead peer is noticed within 40 s.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # A member that sends nothing for this long is closed; 0 = never, the
    # default GarinChat planned.
    idle_timeout_s: float = 0.0
    # Joins, per connection: a burst of join_limit_count, then one every
    # join_limit_window_s / join_limit_count seconds (a token bucket); 0 = no
    # limit. Each join and userleave is announced to the whole room, so
    # without it one client alternating the two keeps every member of a big
    # room busy. A frontend joins once, or switches rooms at a person's pace:
    # the defaults allow 10 quick switches, then one every 2 s.
    join_limit_count: int = 10
    join_limit_window_s: float = 20.0


@dataclass(frozen=True, slots=True)
class JoinRoom:
    room: str
    username: str


@dataclass(frozen=True, slots=True)
class Publish:
    body: str


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    pass


@dataclass(frozen=True, slots=True)
class SendPing:
    pass


@dataclass(frozen=True, slots=True)
class CloseClient:
    close: Close


Action = JoinRoom | Publish | LeaveRoom | SendPing | CloseClient

# Returns None if the token is acceptable, else the close to send.
TokenCheck = Callable[[str], Close | None]


class Session:
    # One per connection: slots keep it small (README, Performance: memory).
    __slots__ = (
        "rules", "_check_token", "state", "_state_deadline", "_heard_at", "_sent_at",
        "_ping_sent_at", "room", "username", "close", "_messages_due", "_joins_due", "_frames_due",
    )

    def __init__(self, rules: SessionRules, check_token: TokenCheck, now: float):
        self.rules = rules
        self._check_token = check_token
        self.state = State.AWAIT_AUTH
        # The auth or join deadline; None in a room.
        self._state_deadline: float | None = now + rules.auth_timeout_s
        # Connecting counts as the first sign of life and the first data.
        self._heard_at = now
        self._sent_at = now
        self._ping_sent_at: float | None = None
        self.room: str | None = None
        self.username: str | None = None
        self.close: Close | None = None
        # The rate limit's bucket as one time (GCRA, see `_message`).
        self._messages_due = now
        # The join limit's bucket as one time (GCRA): when the joins so far
        # will have drained, at one per window / count. One float, not a
        # queue of times: every member joins.
        self._joins_due = now
        # The frame budget's bucket, the same way (see `heard`).
        self._frames_due = now

    # -- moving to another process ----------------------------------------------

    def snapshot(self, now: float) -> tuple[Any, ...]:
        """Everything but the rules and the token check, as plain values, with
        times relative to `now`: another process's clock has another origin."""

        def rel(t: float | None) -> float | None:
            return None if t is None else t - now

        return (
            self.state.value, rel(self._state_deadline), self._heard_at - now, self._sent_at - now,
            rel(self._ping_sent_at), self.room, self.username,
            self._messages_due - now, self._joins_due - now, self._frames_due - now,
        )

    @classmethod
    def restore(
        cls, rules: SessionRules, check_token: TokenCheck, snapshot: tuple[Any, ...], now: float
    ) -> Session:
        """The session `snapshot` describes, its times made relative to `now`.
        ValueError if `snapshot` is not one `snapshot()` could have made."""
        try:
            state, deadline, heard, sent, pinged, room, username, messages_due, joins_due, frames_due = snapshot
            session = cls(rules, check_token, now)
            session.state = State(state)
            if session.state is State.CLOSED:
                raise ValueError("a closed session does not move")
            if (deadline is None) != (session.state is State.IN_ROOM):
                raise ValueError(f"a {session.state.value} session with deadline {deadline!r}")
            for value in (room, username):
                if value is not None and type(value) is not str:
                    raise ValueError(f"room and username must be strings, not {value!r:.40}")
            if session.state is State.IN_ROOM and (room is None or username is None):
                raise ValueError("a session in a room needs its room and username")
            session._state_deadline = None if deadline is None else now + _offset(deadline)
            session._heard_at = now + _offset(heard)
            session._sent_at = now + _offset(sent)
            session._ping_sent_at = None if pinged is None else now + _offset(pinged)
            session.room, session.username = room, username
            session._messages_due = now + _offset(messages_due)
            session._joins_due = now + _offset(joins_due)
            session._frames_due = now + _offset(frames_due)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a session snapshot: {exc}") from None
        return session

    # -- deadlines ------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When the shell must call `timeout` next; None: only input can change anything.

        The soonest of the state's, the keepalive's and the idle deadline,
        worked out inline: the shell asks after every message."""
        if self.state is State.CLOSED:
            return None
        rules = self.rules
        soonest = self._state_deadline
        if self._ping_sent_at is not None:
            keepalive: float | None = self._ping_sent_at + rules.ping_timeout_s
        elif rules.ping_interval_s > 0:
            keepalive = self._heard_at + rules.ping_interval_s
        else:
            keepalive = None
        if keepalive is not None and (soonest is None or keepalive < soonest):
            soonest = keepalive
        idle = self._idle_deadline()
        if idle is not None and (soonest is None or idle < soonest):
            soonest = idle
        return soonest

    def _idle_deadline(self) -> float | None:
        if self.state is State.IN_ROOM and self.rules.idle_timeout_s > 0:
            return self._sent_at + self.rules.idle_timeout_s
        return None

    def _overdue(self, now: float) -> Close | None:
        """The close for the deadline that passed first, if any has.

        On equal times the state's deadline wins, then the keepalive's, then
        the idle one (strict `<` below). No list: this runs for every frame."""
        first: float | None = None
        close: Close | None = None
        if self._state_deadline is not None and now >= self._state_deadline:
            first = self._state_deadline
            close = closes.AUTH_TIMEOUT if self.state is State.AWAIT_AUTH else closes.JOIN_TIMEOUT
        if self._ping_sent_at is not None:
            unanswered = self._ping_sent_at + self.rules.ping_timeout_s
            if now >= unanswered and (first is None or unanswered < first):
                first, close = unanswered, closes.PING_TIMEOUT
        idle = self._idle_deadline()
        if idle is not None and now >= idle and (first is None or idle < first):
            first, close = idle, closes.IDLE_TIMEOUT
        return close

    def _alive(self, now: float) -> None:
        self._heard_at = now
        self._ping_sent_at = None

    # -- inputs -----------------------------------------------------------------

    def _end(self, close: Close) -> list[Action]:
        self.state = State.CLOSED
        self._state_deadline = None
        self.close = close
        return [CloseClient(close)]

    def end(self, close: Close) -> list[Action]:
        """The shell closes the client for its own reasons (shutdown, too slow)."""
        if self.state is State.CLOSED:
            return []
        return self._end(close)

    def _closed_or_late(self, now: float) -> list[Action] | None:
        """What an input gets instead, if the session is closed or a deadline has passed."""
        if self.state is State.CLOSED:
            return []
        late = self._overdue(now)
        return None if late is None else self._end(late)

    def timeout(self, now: float) -> list[Action]:
        refused = self._closed_or_late(now)
        if refused is not None:
            return refused
        if (
            self._ping_sent_at is None
            and self.rules.ping_interval_s > 0
            and now >= self._heard_at + self.rules.ping_interval_s
        ):
            self._ping_sent_at = now
            return [SendPing()]
        return []

    def heard(self, now: float, frame: bool = False) -> list[Action]:
        """A ping, a pong or part of a message arrived: the peer is alive (not
        active). `frame`: a whole frame that carried no message, which costs
        from the frame budget: FRAME_BURST at once, then FRAMES_PER_S."""
        refused = self._closed_or_late(now)
        if refused is not None:
            return refused
        if frame:
            due = max(self._frames_due, now)
            if due - now > (FRAME_BURST - 1) / FRAMES_PER_S + max(1e-9, 1e-12 * abs(now)):
                return self._end(closes.TOO_MANY_FRAMES)
            self._frames_due = due + 1 / FRAMES_PER_S
        self._alive(now)
        return []

    def receive_binary(self, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._end(closes.BINARY_FRAME)

    def receive_text(self, text: str, now: float) -> list[Action]:
        refused = self._closed_or_late(now)
        if refused is not None:
            return refused
        self._alive(now)
        self._sent_at = now
        event = parse_client_text(text, self.rules.names)
        if type(event) is Message and self.state is State.IN_ROOM:
            return self._message(event, now)  # the common case, first
        if isinstance(event, Close):
            return self._end(event)
        if isinstance(event, Auth):
            return self._auth(event, now)
        if self.state is State.AWAIT_AUTH:
            return self._end(closes.NOT_AUTHENTICATED)
        if isinstance(event, Join):
            return self._join(event, now)
        if self.state is not State.IN_ROOM:
            return self._end(closes.NOT_IN_ROOM)
        if isinstance(event, Message):
            return self._message(event, now)
        assert isinstance(event, UserLeave)
        self.state = State.AWAIT_JOIN
        self.room = None
        self._state_deadline = now + self.rules.join_timeout_s
        return [LeaveRoom()]

    def _auth(self, event: Auth, now: float) -> list[Action]:
        if self.state is not State.AWAIT_AUTH:
            return self._end(closes.ALREADY_AUTHENTICATED)
        refusal = self._check_token(event.token)
        if refusal is not None:
            return self._end(refusal)
        self.state = State.AWAIT_JOIN
        self._state_deadline = now + self.rules.join_timeout_s
        return []

    def _join(self, event: Join, now: float) -> list[Action]:
        if self.state is State.IN_ROOM:
            return self._end(closes.ALREADY_JOINED)
        count = self.rules.join_limit_count
        if count > 0:
            spacing = self.rules.join_limit_window_s / count
            due = max(self._joins_due, now)
            # Full when the count's worth of spacing is still to drain. The
            # slack keeps a join exactly on time from being refused by
            # rounding: a nanosecond, or 1e-12 of `now` where that is more
            # (floats round in proportion to their size).
            slack = max(1e-9, 1e-12 * abs(now))
            if due - now > self.rules.join_limit_window_s - spacing + slack:
                return self._end(closes.JOIN_LIMITED)
            self._joins_due = due + spacing
        self.state = State.IN_ROOM
        self._state_deadline = None
        self.room = event.room
        self.username = event.username
        return [JoinRoom(event.room, event.username)]

    def _message(self, event: Message, now: float) -> list[Action]:
        if event.body == "":
            return self._end(closes.BYE)
        if 0 < self.rules.max_body_chars < len(event.body):
            return self._end(closes.BODY_TOO_LONG)
        count = self.rules.rate_limit_count
        if count > 0:
            # GCRA: `count` messages at once, then one every window / count
            # on average. A message may come up to a quarter of that spacing
            # early: what a sender spaced right sends can arrive bunched
            # (the network, or garin busy reading), and that must not make
            # it an offender. Its average rate is held to the limit all the same.
            spacing = self.rules.rate_limit_window_s / count
            due = max(self._messages_due, now)
            slack = max(1e-9, 1e-12 * abs(now))
            if due - now > self.rules.rate_limit_window_s - spacing + spacing * RATE_JITTER + slack:
                return self._end(closes.RATE_LIMITED)
            self._messages_due = due + spacing
        return [Publish(event.body)]

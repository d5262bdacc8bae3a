"""One client connection's rules, as a pure state machine.

Theory of operation
-------------------
A connection moves through AWAIT_AUTH -> AWAIT_JOIN -> IN_ROOM and ends in
CLOSED. `userleave` takes it from IN_ROOM back to AWAIT_JOIN (it may join
again, on any shard, within the join timeout). Each waiting state has a
deadline; the shell sleeps until `deadline` and then calls `timeout(now)`.

Every input returns a list of actions for the shell to apply in order:
`JoinRoom`, `Publish`, `LeaveRoom`, and finally at most one `CloseClient`.
A `CloseClient` while in a room implies leaving it: the shell tells the shard,
so the room always hears `userleave`. Nothing here reads a clock or does I/O:
`now` is passed in (seconds, any monotonic origin), and the token check is a
callable given at construction, so thousands of sessions run in a unit test.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from garin import closes
from garin.closes import Close
from garin.protocol import Auth, Join, Message, NameLimits, UserLeave, parse_client_text


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
class CloseClient:
    close: Close


Action = JoinRoom | Publish | LeaveRoom | CloseClient

# Returns None if the token is acceptable, else the close to send.
TokenCheck = Callable[[str], Close | None]


class Session:
    def __init__(self, rules: SessionRules, check_token: TokenCheck, now: float):
        self.rules = rules
        self._check_token = check_token
        self.state = State.AWAIT_AUTH
        self.deadline: float | None = now + rules.auth_timeout_s
        self.room: str | None = None
        self.username: str | None = None
        self.close: Close | None = None
        # Times of the last rate_limit_count messages; made at the first
        # message (a deque is ~0.7 KiB, and many members never speak).
        self._recent: deque[float] | None = None

    def _end(self, close: Close) -> list[Action]:
        self.state = State.CLOSED
        self.deadline = None
        self.close = close
        return [CloseClient(close)]

    def end(self, close: Close) -> list[Action]:
        """The shell closes the client for its own reasons (shutdown, too slow)."""
        if self.state is State.CLOSED:
            return []
        return self._end(close)

    def timeout(self, now: float) -> list[Action]:
        if self.deadline is None or now < self.deadline:
            return []
        if self.state is State.AWAIT_AUTH:
            return self._end(closes.AUTH_TIMEOUT)
        return self._end(closes.JOIN_TIMEOUT)

    def receive_binary(self, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._end(closes.BINARY_FRAME)

    def receive_text(self, text: str, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        # A frame that arrives after its deadline is too late, even if the
        # shell has not woken up for the timeout yet.
        late = self.timeout(now)
        if late:
            return late
        event = parse_client_text(text, self.rules.names)
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
        self.deadline = now + self.rules.join_timeout_s
        return [LeaveRoom()]

    def _auth(self, event: Auth, now: float) -> list[Action]:
        if self.state is not State.AWAIT_AUTH:
            return self._end(closes.ALREADY_AUTHENTICATED)
        refusal = self._check_token(event.token)
        if refusal is not None:
            return self._end(refusal)
        self.state = State.AWAIT_JOIN
        self.deadline = now + self.rules.join_timeout_s
        return []

    def _join(self, event: Join, now: float) -> list[Action]:
        if self.state is State.IN_ROOM:
            return self._end(closes.ALREADY_JOINED)
        self.state = State.IN_ROOM
        self.deadline = None
        self.room = event.room
        self.username = event.username
        return [JoinRoom(event.room, event.username)]

    def _message(self, event: Message, now: float) -> list[Action]:
        if event.body == "":
            return self._end(closes.BYE)
        if self.rules.rate_limit_count > 0:
            recent = self._recent
            if recent is None:
                recent = self._recent = deque(maxlen=self.rules.rate_limit_count)
            if (
                len(recent) == recent.maxlen
                and now - recent[0] < self.rules.rate_limit_window_s
            ):
                return self._end(closes.RATE_LIMITED)
            recent.append(now)
        return [Publish(event.body)]

"""One shard process's side of rooms shared through Redis, as a pure object.

Theory of operation
-------------------
With GARIN_REDIS_URL set, a room's members may live on several hosts (and
in one shard process per host). Every event of a room, a join, a message or
a leave, is sent to Redis and comes back on the room's channel
(`garin:room:<name>`), and every shard process applies a room's events in
the order the channel delivers them. Redis orders them once for everyone,
so every member everywhere sees the same joins and leaves in the same
order, and each sender's messages in the order sent (one process sends its
commands over one connection, in order).

This object holds what one shard process knows, and never does I/O:

- its local members, each `QUEUED` (its join waits to be sent), `SENT`
  (sent, not back yet), `ACTIVE` (its join came back: it hears the room) or
  `GONE` (closed by the shell, 1013: it hears nothing more and is never
  registered again; its leave still goes out). A joiner hears nothing
  before its own join, and every event after it;
- `rooms`: per room, the sockets of its ACTIVE local members (what fan-out
  walks);
- the commands waiting for Redis (`queue`), in the order the members'
  sessions made them, each with the time it was made: none may wait longer
  than the hold timeout (`held_too_long`), so a client is never left
  hanging while Redis is away.

A leave takes the member out of the local fan-out at once (it hears
nothing more, as on one host) and queues the leave; the announcement to
the others comes back from Redis like any event.

Events on a channel are byte strings, decoded here once per process:
`m <instance> <key> <message text>` (the client protocol's JSON, sent to
local members as it is), `j`/`l <instance> <key> <totalUsers> <username>`
(built by the Lua scripts that count members, garin/shard/redis_lua.py).
`<instance>` names a shard process (no spaces), `<key>` its member.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from garin import protocol

S = TypeVar("S")

CHANNEL_PREFIX = "garin:room:"


class State(enum.Enum):
    QUEUED = 1
    SENT = 2
    ACTIVE = 3
    GONE = 4


@dataclass(slots=True)
class Member(Generic[S]):
    room: str
    username: str
    sock: S
    state: State = State.QUEUED


@dataclass(frozen=True, slots=True)
class JoinCommand:
    key: int
    room: str
    username: str
    since: float


@dataclass(frozen=True, slots=True)
class MessageCommand:
    key: int
    room: str
    payload: bytes  # the channel event, as published
    since: float


@dataclass(frozen=True, slots=True)
class LeaveCommand:
    key: int
    room: str
    username: str
    since: float


Command = JoinCommand | MessageCommand | LeaveCommand


@dataclass(frozen=True, slots=True)
class Delivery(Generic[S]):
    """Write `text` (a client protocol frame's payload) to `to`, except `exclude`."""

    text: bytes
    to: dict[int, S]
    exclude: int = -1


def channel(room: str) -> str:
    return CHANNEL_PREFIX + room


def message_event(instance: str, key: int, text: bytes) -> bytes:
    return b"m %s %d %s" % (instance.encode(), key, text)


@dataclass(slots=True)
class ClusterRooms(Generic[S]):
    instance: str
    # Commands waiting for Redis; past this many, or this many bytes of
    # messages, a member's message is refused (its client is closed 1013)
    # rather than memory growing while Redis is slow or away.
    max_queue: int = 100_000
    max_queue_bytes: int = 64 * 1024 * 1024
    queued_bytes: int = 0
    members: dict[int, Member[S]] = field(default_factory=dict)
    rooms: dict[str, dict[int, S]] = field(default_factory=dict)
    queue: deque[Command] = field(default_factory=deque)
    # Local members per room, whatever their state: the channels to be
    # subscribed to.
    local: dict[str, int] = field(default_factory=dict)
    # SENT joins -> when they were queued: one that does not come back within
    # the hold timeout is given up like a join that could not be sent.
    sent: dict[int, float] = field(default_factory=dict)
    # A room got its first local member or lost its last: subscriptions to check.
    rooms_changed: bool = False
    # Members Redis no longer has (see `apply`): the shell closes them.
    evicted: list[S] = field(default_factory=list)

    @property
    def member_count(self) -> int:
        return len(self.members)

    # -- what local sessions do ---------------------------------------------------

    def join(self, key: int, room: str, username: str, sock: S, now: float) -> None:
        """`key` joins `room`; it will hear the room from its own join on."""
        if key in self.members:
            raise ValueError(f"member {key} is already in room {self.members[key].room!r}")
        self.members[key] = Member(room, username, sock)
        self.local[room] = self.local.get(room, 0) + 1
        self.rooms_changed = True
        self.queue.append(JoinCommand(key, room, username, now))

    def publish(self, key: int, text: bytes, now: float) -> bool:
        """`key` sends `text` (protocol.message_text) to its room. False if
        too much is waiting already."""
        member = self.members[key]
        if member.state is State.GONE:
            return True  # being closed (maybe announced gone already): never heard again
        event = message_event(self.instance, key, text)
        if len(self.queue) >= self.max_queue or self.queued_bytes + len(event) > self.max_queue_bytes:
            return False
        self.queue.append(MessageCommand(key, member.room, event, now))
        self.queued_bytes += len(event)
        return True

    def leave(self, key: int, now: float) -> None:
        """`key` leaves its room: out of the local fan-out now, announced when
        Redis has counted it."""
        member = self.members.pop(key)
        self.sent.pop(key, None)
        left = self.local[member.room] - 1
        if left:
            self.local[member.room] = left
        else:
            del self.local[member.room]
            self.rooms_changed = True
        sockets = self.rooms.get(member.room)
        if sockets is not None and sockets.pop(key, None) is not None and not sockets:
            del self.rooms[member.room]
        # Always sent, even if the join never was: the script removes only a
        # member Redis has, so a leave never announces a join nobody saw.
        self.queue.append(LeaveCommand(key, member.room, member.username, now))

    # -- the link's side ------------------------------------------------------------

    def wanted_rooms(self) -> set[str]:
        """Rooms with local members: their channels must be subscribed to
        before any of their commands is sent, so that joins come back, and
        only those (the shell unsubscribes from the others)."""
        return set(self.local)

    def take(self, limit: int) -> list[Command]:
        """Up to `limit` commands to send now, in order; their joins are SENT."""
        batch: list[Command] = []
        while self.queue and len(batch) < limit:
            command = self.queue.popleft()
            if isinstance(command, MessageCommand):
                self.queued_bytes -= len(command.payload)
            elif isinstance(command, JoinCommand):
                member = self.members.get(command.key)
                if member is not None and member.room == command.room:
                    member.state = State.SENT
                    self.sent[command.key] = command.since
            batch.append(command)
        return batch

    def link_lost(self) -> list[S]:
        """The link to Redis broke: joins that were sent may or may not have
        been counted, and their echo is lost. Their members must go (the
        shell closes them 1013 and their leaves clean up after them)."""
        self.sent.clear()
        return self._gone([key for key, m in self.members.items() if m.state is State.SENT])

    def registered(self) -> list[tuple[int, str, str]]:
        """(key, room, username) of every member Redis has counted: what a
        reconnected link registers again (Redis may have restarted empty)."""
        return [(key, m.room, m.username) for key, m in self.members.items() if m.state is State.ACTIVE]

    def held_too_long(self, now: float, hold_s: float) -> list[S]:
        """Members whose join or message has waited for Redis longer than
        `hold_s`: their commands are dropped (never sent later), and the
        shell closes them 1013 `room unavailable`. A join sent but not back
        within `hold_s` counts too."""
        late = {key for key, since in self.sent.items() if now - since > hold_s}
        for command in self.queue:
            if now - command.since <= hold_s:
                break  # the queue is in time order
            if not isinstance(command, LeaveCommand):
                late.add(command.key)
        if late:
            self.queue = deque(
                c for c in self.queue if isinstance(c, LeaveCommand) or c.key not in late
            )
            self.queued_bytes = sum(len(c.payload) for c in self.queue if isinstance(c, MessageCommand))
        return self._gone([key for key in late if key in self.members])

    def drop_all(self) -> list[S]:
        """Forget every command and return every member's socket: this
        process was taken for dead by the others (its members were announced
        gone), so its members must reconnect."""
        self.queue.clear()
        self.queued_bytes = 0
        return self._gone([key for key, m in self.members.items() if m.state is not State.GONE])

    def _gone(self, keys: list[int]) -> list[S]:
        """`keys` are being closed: out of the fan-out, never registered
        again (a reconnected link must not count them silently, nor announce
        them twice). Their sockets, for the shell to close."""
        socks = []
        for key in keys:
            member = self.members[key]
            member.state = State.GONE
            self.sent.pop(key, None)
            sockets = self.rooms.get(member.room)
            if sockets is not None and sockets.pop(key, None) is not None and not sockets:
                del self.rooms[member.room]
            socks.append(member.sock)
        return socks

    # -- events from Redis ---------------------------------------------------------------

    def apply(self, room: str, event: bytes) -> Delivery[S] | None:
        """Apply one event from `room`'s channel; what to write to whom, or None
        (no local member hears it, or it is not an event garin sends)."""
        kind = event[:2]
        if kind == b"m ":
            parts = event.split(b" ", 3)
            if len(parts) != 4:
                return None
            sockets = self.rooms.get(room)
            if not sockets:
                return None
            exclude = int(parts[2]) if parts[1] == self.instance.encode() else -1
            return Delivery(parts[3], sockets, exclude)
        if kind not in (b"j ", b"l "):
            return None
        parts = event.split(b" ", 4)
        if len(parts) != 5:
            return None
        try:
            instance, key, total, username = parts[1].decode(), int(parts[2]), int(parts[3]), parts[4].decode()
        except ValueError:
            return None
        if kind == b"j ":
            if instance == self.instance:
                self._activate(key, room)
            sockets = self.rooms.get(room)
            return Delivery(protocol.join_text(username, total), sockets) if sockets else None
        member = self.members.get(key) if instance == self.instance else None
        if member is not None and member.room == room and member.state is not State.GONE:
            # Redis removed a member this process still has: the others took
            # the process for dead (it was paused). The member hears nothing
            # more and must go (`evicted`); the rest hear the leave.
            self.evicted += self._gone([key])
        sockets = self.rooms.get(room)
        if not sockets:
            return None
        return Delivery(protocol.userleave_text(username, total), sockets)

    def _activate(self, key: int, room: str) -> None:
        member = self.members.get(key)
        if member is None or member.room != room or member.state in (State.ACTIVE, State.GONE):
            return  # gone already (its leave follows), or an echo of a re-registration
        member.state = State.ACTIVE
        self.sent.pop(key, None)
        self.rooms.setdefault(room, {})[key] = member.sock


def room_of(channel_name: str | bytes) -> str | None:
    name = channel_name.decode() if isinstance(channel_name, bytes) else channel_name
    return name[len(CHANNEL_PREFIX):] if name.startswith(CHANNEL_PREFIX) else None


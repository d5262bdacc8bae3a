"""Room membership for one shard, as a pure object.

Theory of operation
-------------------
A shard owns the rooms that hash to it and, since a connection lives in the
shard of its room, every member's socket too. A room maps each member's key
(unique within the shard) to what fan-out writes to, and to its username;
`join` and `leave` return the text to announce and who hears it, so the
shell encodes one frame and writes it to each. A room with no members is
dropped. Nothing here does I/O: the socket type is opaque (`S`), and the
texts are the client protocol's (garin/protocol.py).

Order: the shell applies joins, messages and leaves in the order it reads
them, one at a time, so every member sees one room's events in one order,
and one sender's messages in the order sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from garin import protocol

S = TypeVar("S")


@dataclass(slots=True)
class Room(Generic[S]):
    name: str
    # key -> socket: what fan-out walks, one look-up less per delivery.
    sockets: dict[int, S] = field(default_factory=dict)
    usernames: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Announce(Generic[S]):
    """Send `text` to `to` (key -> socket pairs)."""

    text: bytes
    to: dict[int, S]


class Rooms(Generic[S]):
    def __init__(self) -> None:
        self.rooms: dict[str, Room[S]] = {}
        self.member_count = 0

    def __len__(self) -> int:
        return len(self.rooms)

    def members(self, room: str) -> dict[int, S]:
        """key -> socket of `room`'s members (empty if there is no such room)."""
        found = self.rooms.get(room)
        return found.sockets if found is not None else {}

    def join(self, room: str, key: int, username: str, sock: S) -> Announce[S]:
        """`key` joins `room`: everyone in it, the joiner included, hears it."""
        found = self.rooms.get(room)
        if found is None:
            found = self.rooms[room] = Room(room)
        if key in found.sockets:
            raise ValueError(f"member {key} is already in room {room!r}")
        found.sockets[key] = sock
        found.usernames[key] = username
        self.member_count += 1
        return Announce(protocol.join_text(username, len(found.sockets)), found.sockets)

    def leave(self, room: str, key: int) -> Announce[S] | None:
        """`key` leaves `room`; the members left hear it. None if it was not there."""
        found = self.rooms.get(room)
        if found is None or key not in found.sockets:
            return None
        del found.sockets[key]
        username = found.usernames.pop(key)
        self.member_count -= 1
        if not found.sockets:
            del self.rooms[room]
        return Announce(protocol.userleave_text(username, len(found.sockets)), found.sockets)

"""Room membership and fan-out decisions for one shard, as a pure object.

Theory of operation
-------------------
Members are keyed by (link, member): the link is the shard's handle for one
router connection, the member id is the router's own. A room knows its members'
usernames and how many members each link has, so an event goes once to each
link with members there; the router fans it out to its own sockets.

Every method returns `Outgoing` pairs (link, message) in the order they must be
sent. Texts are built once per event and shared by all links. Per-room order is
the order of calls, and a link's messages are sent in order, so every recipient
sees one sender's messages in the order they were sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from garin import protocol, wire

Outgoing = tuple[int, wire.WireMessage]
MemberKey = tuple[int, int]


@dataclass(slots=True)
class Room:
    name: str
    usernames: dict[MemberKey, str] = field(default_factory=dict)
    per_link: dict[int, int] = field(default_factory=dict)


class Rooms:
    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}
        self._room_of: dict[MemberKey, Room] = {}

    def __len__(self) -> int:
        return len(self.rooms)

    def members(self) -> int:
        return len(self._room_of)

    def room_of(self, link: int, member: int) -> str | None:
        room = self._room_of.get((link, member))
        return room.name if room else None

    def join(self, link: int, member: int, room_name: str, username: str) -> list[Outgoing]:
        key = (link, member)
        current = self._room_of.get(key)
        if current is not None and current.name == room_name:
            return []  # a replayed join the shard already applied
        out = self.leave(link, member) if current is not None else []
        room = self._add(key, room_name, username)
        text = protocol.join_text(username, len(room.usernames))
        for other in room.per_link:
            if other == link:
                out.append((link, wire.Joined(room_name, member, text)))
            else:
                out.append((other, wire.Deliver(room_name, -1, text)))
        return out

    def rejoin(self, link: int, member: int, room_name: str, username: str) -> list[Outgoing]:
        key = (link, member)
        if key not in self._room_of:
            self._add(key, room_name, username)
        return []

    def _add(self, key: MemberKey, room_name: str, username: str) -> Room:
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name)
        room.usernames[key] = username
        room.per_link[key[0]] = room.per_link.get(key[0], 0) + 1
        self._room_of[key] = room
        return room

    def publish(self, link: int, member: int, body: str) -> list[Outgoing]:
        room = self._room_of.get((link, member))
        if room is None:
            return []  # left already; the message raced its own leave
        text = protocol.message_text(room.usernames[(link, member)], body)
        return [
            (other, wire.Deliver(room.name, member if other == link else -1, text))
            for other in room.per_link
        ]

    def leave(self, link: int, member: int) -> list[Outgoing]:
        key = (link, member)
        room = self._room_of.pop(key, None)
        if room is None:
            return []
        username = room.usernames.pop(key)
        left = room.per_link[link] - 1
        if left:
            room.per_link[link] = left
        else:
            del room.per_link[link]
        if not room.usernames:
            del self.rooms[room.name]
            return []
        text = protocol.userleave_text(username, len(room.usernames))
        return [(other, wire.Deliver(room.name, -1, text)) for other in room.per_link]

    def drop_link(self, link: int) -> list[Outgoing]:
        """A router went away: all its members leave, and the rooms are told."""
        out: list[Outgoing] = []
        for key in [key for key in self._room_of if key[0] == link]:
            out.extend(self.leave(*key))
        return out

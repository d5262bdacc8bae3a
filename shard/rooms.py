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

Solo rooms
----------
Relaying a chat message through the shard costs a router a system call, an
encode and a decode, and a wake-up for the answer, and the shard as much
again: about 40% of garin's CPU per message. When every member of a room is
on one router, the shard has nothing to add, so a room that a join creates is
granted "solo" to the joiner's link (`Joined.solo`): its router fans its
members' messages out itself and sends no `Publish`. Joins and leaves still
come here, so the shard always knows the members.

A join from another link to a solo room must not become visible while the
solo router may still fan out without it (its member would miss messages sent
after its join was announced). So `handle()` sends `Revoke` to the solo link
and holds the join, and any later event of that member, until the router
answers `Released` (its later messages arrive as `Publish`, after the answer)
or its link goes away; then the held events apply in order. A router that
does not answer is unlinked by the shell (`overdue()`).

A room whose members come to be on one link again (the others left, or a
restarted shard rebuilt it from one router's replay) is offered to that link
(`Offer`). The router answers `Accept`; if nothing changed meanwhile the room
becomes solo, and `SoloFrom` says so. The router switches only on `SoloFrom`,
which follows everything the shard sent for the messages the router had sent
before `Accept`, so no new local message can overtake one still in flight
through here. Any other link's join or replay before the `Accept` cancels the
offer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from garin import protocol, wire

Outgoing = tuple[int, wire.WireMessage]
MemberKey = tuple[int, int]
RouterEvent = wire.Join | wire.Rejoin | wire.Publish | wire.Leave


@dataclass(slots=True)
class Room:
    name: str
    usernames: dict[MemberKey, str] = field(default_factory=dict)
    per_link: dict[int, int] = field(default_factory=dict)
    # The link whose router fans this room out itself; None: this shard does.
    solo: int | None = None
    # While `solo` is being revoked: other links' events held until it is
    # released, in arrival order (an empty room lives on for them), and since when.
    held: list[tuple[int, RouterEvent]] | None = None
    revoked_at: float = 0.0
    # Which Revoke: only the answer to this one ends the wait.
    revoke_no: int = 0
    # The link offered solo (and the Offer's number), until it accepts or a
    # change cancels the offer.
    offered_to: int | None = None
    offer_no: int = 0

    def solo_for(self, link: int) -> bool:
        return self.solo == link and self.held is None


class Rooms:
    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}
        self._room_of: dict[MemberKey, Room] = {}
        # Members whose events wait for a revocation, and the room it is for.
        self._held: dict[MemberKey, Room] = {}
        self._revoke_nos = itertools.count(1)
        # Rooms with a revocation under way, by name.
        self._revoking: dict[str, Room] = {}
        self.revokes = 0  # how many were started, for the metrics

    def __len__(self) -> int:
        return len(self.rooms)

    def members(self) -> int:
        return len(self._room_of)

    def solo_rooms(self) -> int:
        return sum(1 for room in self.rooms.values() if room.solo is not None and room.held is None)

    def room_of(self, link: int, member: int) -> str | None:
        room = self._room_of.get((link, member))
        return room.name if room else None

    # -- the entry point: one event from a router ------------------------------

    def handle(self, link: int, event: wire.WireMessage, now: float) -> list[Outgoing]:
        """Apply (or hold) one event `link` sent; what to send, in order."""
        if isinstance(event, wire.Publish):
            if self._held and (link, event.member) in self._held:
                return self._hold(link, event, now, self._held[(link, event.member)])
            return self.publish(link, event.member, event.body)
        if isinstance(event, wire.Released):
            return self.released(link, event.room, event.no, now)
        if isinstance(event, wire.Accept):
            return self.accepted(link, event.room, event.no)
        if not isinstance(event, (wire.Join, wire.Rejoin, wire.Leave)):
            raise wire.WireError(f"unexpected {type(event).__name__} from a router")
        held_in = self._held.get((link, event.member)) if self._held else None
        if held_in is not None:
            return self._hold(link, event, now, held_in)
        if isinstance(event, wire.Leave):
            return self.leave(link, event.member)
        room = self.rooms.get(event.room)
        if room is not None and room.solo is not None and room.solo != link:
            if isinstance(event, wire.Join):
                return self._hold(link, event, now, room)
            # A member replayed after an outage, never announced: it is
            # applied at once (it also misses what the solo router fans out
            # until it reads the Revoke: part of the outage's loss), and the
            # room is no longer one router's.
            return self._revoke(room, now) + self.rejoin(link, event.member, event.room, event.username)
        if isinstance(event, wire.Join):
            return self.join(link, event.member, event.room, event.username)
        return self.rejoin(link, event.member, event.room, event.username)

    def _hold(self, link: int, event: RouterEvent, now: float, room: Room) -> list[Outgoing]:
        out = self._revoke(room, now)
        assert room.held is not None
        room.held.append((link, event))
        self._held[(link, event.member)] = room
        return out

    def _revoke(self, room: Room, now: float) -> list[Outgoing]:
        if room.held is not None or room.solo is None:
            return []  # asked already
        room.held = []
        room.revoked_at = now
        room.revoke_no = next(self._revoke_nos)
        self._revoking[room.name] = room
        self.revokes += 1
        return [(room.solo, wire.Revoke(room.name, room.revoke_no))]

    def released(self, link: int, room_name: str, no: int, now: float) -> list[Outgoing]:
        """The solo router has stopped fanning `room_name` out: apply what waited."""
        room = self.rooms.get(room_name)
        if room is None or room.solo != link or room.held is None or room.revoke_no != no:
            return []  # not this revocation's answer (one replayed after a relink)
        return self._end_revocation(room, now)

    def _end_revocation(self, room: Room, now: float) -> list[Outgoing]:
        held = room.held or []
        room.solo, room.held = None, None
        del self._revoking[room.name]
        for link, event in held:
            self._held.pop((link, event.member), None)
        if not room.usernames:
            del self.rooms[room.name]  # kept only for the held events
        out: list[Outgoing] = []
        for link, event in held:
            out.extend(self.handle(link, event, now))
        if self.rooms.get(room.name) is room:
            out.extend(self._offer(room))  # left to one link by what waited
        return out

    def accepted(self, link: int, room_name: str, no: int) -> list[Outgoing]:
        """The router takes the room offered to it, if the offer still stands."""
        room = self.rooms.get(room_name)
        if room is None or room.offered_to != link or room.offer_no != no:
            return []  # cancelled meanwhile
        room.offered_to = None
        room.solo = link
        return [(link, wire.SoloFrom(room_name, no))]

    def _offer(self, room: Room) -> list[Outgoing]:
        """Cancel an offer the room no longer fits; offer it if it fits."""
        if room.offered_to is not None and (len(room.per_link) != 1 or room.offered_to not in room.per_link):
            room.offered_to = None
        if room.offered_to is not None or room.solo is not None or room.held is not None or len(room.per_link) != 1:
            return []
        (link,) = room.per_link
        room.offered_to = link
        room.offer_no = next(self._revoke_nos)
        return [(link, wire.Offer(room.name, room.offer_no))]

    def overdue(self, now: float, timeout: float) -> list[int]:
        """Links asked to release a room more than `timeout` ago."""
        return sorted({
            room.solo for room in self._revoking.values()
            if room.solo is not None and now - room.revoked_at > timeout
        })

    # -- the steps ----------------------------------------------------------------

    def join(self, link: int, member: int, room_name: str, username: str) -> list[Outgoing]:
        key = (link, member)
        current = self._room_of.get(key)
        if current is not None and current.name == room_name:
            return []  # a replayed join the shard already applied
        out = self.leave(link, member) if current is not None else []
        room = self._add(key, room_name, username)
        if len(room.usernames) == 1 and room.held is None:
            room.solo = link  # a new room: all its members are on this link
        text = protocol.join_text(username, len(room.usernames))
        for other in room.per_link:
            if other == link:
                out.append((link, wire.Joined(room_name, member, text, room.solo_for(link))))
            else:
                out.append((other, wire.Deliver(room_name, -1, text)))
        return out + self._offer(room)

    def rejoin(self, link: int, member: int, room_name: str, username: str) -> list[Outgoing]:
        key = (link, member)
        if key in self._room_of:
            return []
        return self._offer(self._add(key, room_name, username))

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

    def leave(self, link: int, member: int, offer: bool = True) -> list[Outgoing]:
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
            if room.held is None:
                del self.rooms[room.name]
            return []
        text = protocol.userleave_text(username, len(room.usernames))
        out: list[Outgoing] = [(other, wire.Deliver(room.name, -1, text)) for other in room.per_link]
        return out + self._offer(room) if offer else out

    def drop_link(self, link: int, now: float) -> list[Outgoing]:
        """A router went away: all its members leave, and the rooms are told;
        its held events never happen, and what it was asked to release is free."""
        out: list[Outgoing] = []
        for key in [key for key in self._room_of if key[0] == link]:
            # Not offered to the links that remain: the router that went away
            # is probably relinking, and its replayed members would have to
            # take the room back (missing what was fanned out meanwhile).
            out.extend(self.leave(*key, offer=False))
        if self._held:
            for key in [key for key in self._held if key[0] == link]:
                room = self._held.pop(key)
                assert room.held is not None
                room.held = [(other, event) for other, event in room.held if other != link]
        for room in [room for room in self._revoking.values() if room.solo == link]:
            out.extend(self._end_revocation(room, now))
        return out

"""The router's state: its clients, which room each is in, and its shard links.

The router keeps only its own sockets' room index; the shards own the truth.
A member enters the index when its shard confirms the join (`Joined`), so it
receives exactly the room's events from its own join announcement on. Every
event from a shard becomes one frame, written to each local member.

A room whose members are all here is "solo" (shard/rooms.py explains): the
shard says so in `Joined`, and until it sends `Revoke` the router fans its
members' messages out itself, without the round trip; a room that comes to
be all here again is offered (`Offer`, `Accept`, then `SoloFrom`). A member
with a message on its way through the shard (sent before its join was
confirmed, or before the room became solo) goes on sending through the shard
until that message is back, so its messages cannot overtake each other. When
a link drops, its rooms stop being solo: the restarted shard, or another
router, may not agree any more.

When a shard is unreachable for longer than its link's hold allows, every
client in that shard's rooms (and every client waiting for a join there) is
closed with 1013 "room unavailable"; joins to its rooms are refused the same
way until the link is back. What a link replays after a shard restart is the
link's business (router/outbox.py).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import trio

from garin import closes, metrics, protocol, wire
from garin.config import Config
from garin.limits import ConnectionLimits
from garin.routing import shard_for
from garin.session import Session
from router.bans import RouterBans
from router.frames import text_frame
from router.shard_link import ShardLink
from router.websocket import ClientWebSocket, fan_out

log = logging.getLogger("garin.router")


@dataclass(eq=False, slots=True)
class Client:
    id: int
    peer: str
    # This membership's id in Join/Publish/Leave, new for every join (0: not
    # in a room), so a `Joined` is matched to the join it answers, not an
    # earlier one of the same client.
    member: int = 0
    socket: ClientWebSocket | None = None
    session: Session | None = None
    room: str | None = None
    username: str | None = None
    # The shard has announced our join: we are in the local index.
    confirmed: bool = False
    # From the token: `sub` (for the ban list) and, with GARIN_USERNAME_CLAIM,
    # the name the client must chat under.
    subject: str | None = None
    claimed_name: str | None = None
    # Messages sent through the shard whose Deliver (excluding this member)
    # has not come back yet; fanned out locally only at 0.
    in_flight: int = 0


@dataclass(slots=True)
class RoomIndex:
    """room -> {member id: socket} for this router's confirmed members.

    Sockets, not clients: fan-out needs nothing else, one look-up less per
    delivery."""

    rooms: dict[str, dict[int, ClientWebSocket]] = field(default_factory=dict)
    # Rooms whose every member is here (the shard said so in `Joined`).
    solo: set[str] = field(default_factory=set)

    def add(self, room: str, client: Client, solo: bool) -> None:
        assert client.socket is not None  # set before the client can join
        self.rooms.setdefault(room, {})[client.member] = client.socket
        if solo:
            self.solo.add(room)
        else:
            self.solo.discard(room)

    def remove(self, room: str, client: Client) -> None:
        members = self.rooms.get(room)
        if members is not None and members.pop(client.member, None) is not None and not members:
            del self.rooms[room]
            # The next join's `Joined` says whether it still is.
            self.solo.discard(room)

    def members(self, room: str) -> dict[int, ClientWebSocket]:
        return self.rooms.get(room, {})


class Router:
    def __init__(self, config: Config, router_id: str) -> None:
        self.config = config
        self.router_id = router_id
        self.clients: dict[int, Client] = {}
        # Clients in a room (confirmed or not) by member id.
        self.members: dict[int, Client] = {}
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_ip)
        # Built once: every connection's session and token check read it.
        self.session_rules = config.session_rules
        self.index = RoomIndex()
        self.stopping = trio.Event()
        self.bans = RouterBans(config.ban_db, config.ban_policy) if config.ban_db else None
        # Where connections start their short-lived helper tasks; set by
        # serve_router before the first connection is accepted.
        self.background: trio.Nursery
        self._ids = itertools.count(1)
        self._member_ids = itertools.count(1)
        self.links = [
            ShardLink(
                i, config.shard_socket(i), router_id, config.shards, self._on_shard_message,
                self._shard_unavailable, config.shard_hold_bytes, config.shard_hold_timeout_s,
                on_down=self._link_down,
            )
            for i in range(config.shards)
        ]

    def shard_health(self) -> dict[str, bool]:
        return {str(link.index): link.connected for link in self.links}

    def new_client(self, peer: str) -> Client:
        client = Client(next(self._ids), peer)
        self.clients[client.id] = client
        return client

    def forget(self, client: Client) -> None:
        if client.room is not None:
            self.leave(client)
        self.clients.pop(client.id, None)

    # -- client -> shard ----------------------------------------------------

    def _link(self, room: str) -> ShardLink:
        return self.links[shard_for(room, self.config.shards)]

    def join(self, client: Client, room: str, username: str) -> None:
        client.room, client.username, client.confirmed, client.in_flight = room, username, False, 0
        client.member = next(self._member_ids)
        self.members[client.member] = client
        if not self._link(room).send(wire.Join(client.member, room, username)) and client.socket is not None:
            client.socket.kick(closes.SHARD_UNAVAILABLE)

    def publish(self, client: Client, body: str) -> None:
        room = client.room
        assert room is not None
        if client.confirmed and not client.in_flight and room in self.index.solo:
            assert client.username is not None
            self._fan_out(room, protocol.message_text(client.username, body), client.member)
            return
        client.in_flight += 1
        self._link(room).send(wire.Publish(client.member, body))

    def leave(self, client: Client) -> None:
        room = client.room
        assert room is not None
        if client.confirmed:
            self.index.remove(room, client)
        member = client.member
        del self.members[member]
        client.room, client.confirmed, client.member = None, False, 0
        self._link(room).send(wire.Leave(member))

    def _shard_unavailable(self, shard: int) -> int:
        """The hold for `shard` ran out: close every client in its rooms; how many."""
        closing = 0
        for client in self.clients.values():
            room = client.room
            if room is not None and shard_for(room, self.config.shards) == shard and client.socket is not None:
                client.socket.kick(closes.SHARD_UNAVAILABLE)
                closing += 1
        return closing

    def _link_down(self, shard: int) -> None:
        count = self.config.shards
        self.index.solo = {room for room in self.index.solo if shard_for(room, count) != shard}
        # What a member had handed to the lost link will never come back
        # (the shard never applied it, or its Deliver went down with the
        # link): count only what is still queued, to be sent again. Else the
        # member would send through the shard for the rest of its membership.
        outbox = self.links[shard].outbox
        for client in self.members.values():
            if client.in_flight and client.room is not None and shard_for(client.room, count) == shard:
                client.in_flight = outbox.queued_publishes(client.member)

    # -- shard -> clients ---------------------------------------------------

    def _on_shard_message(self, message: wire.WireMessage) -> None:
        if isinstance(message, wire.Deliver):
            if message.exclude >= 0:
                # One of our members' messages is back: it reached the room.
                sender = self.members.get(message.exclude)
                if sender is not None and sender.in_flight:
                    sender.in_flight -= 1
            self._fan_out(message.room, message.text, message.exclude)
        elif isinstance(message, wire.Joined):
            self._link(message.room).outbox.confirm(message.member, message.room)
            client = self.members.get(message.member)
            if client is not None and not client.confirmed:
                client.confirmed = True
                self.index.add(message.room, client, message.solo)
            self._fan_out(message.room, message.text, -1)
        elif isinstance(message, wire.Revoke):
            self.index.solo.discard(message.room)
            self._link(message.room).send(wire.Released(message.room, message.no))
        elif isinstance(message, wire.Offer):
            self._link(message.room).send(wire.Accept(message.room, message.no))
        elif isinstance(message, wire.SoloFrom):
            if message.room in self.index.rooms:
                self.index.solo.add(message.room)
        else:
            log.warning("unexpected message from a shard: %s", type(message).__name__)

    def _fan_out(self, room: str, text: bytes, exclude: int) -> None:
        members = self.index.rooms.get(room)
        if members:
            fan_out(members.items(), text_frame(text), exclude)
            metrics.DELIVERIES.inc(len(members) - (exclude in members))

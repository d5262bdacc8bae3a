"""The router's state: its clients, which room each is in, and its shard links.

The router keeps only its own sockets' room index; the shards own the truth.
A member enters the index when its shard confirms the join (`Joined`), so it
receives exactly the room's events from its own join announcement on. Every
event from a shard becomes one frame, written to each local member.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from garin import wire
from garin.config import Config
from garin.routing import shard_for
from garin.session import Session
from router.frames import text_frame
from router.shard_link import ShardLink
from router.websocket import ClientWebSocket, fan_out

log = logging.getLogger("garin.router")


@dataclass(eq=False, slots=True)
class Client:
    id: int
    peer: str
    socket: ClientWebSocket | None = None
    session: Session | None = None
    room: str | None = None
    username: str | None = None
    # The shard has announced our join: we are in the local index.
    confirmed: bool = False


@dataclass(slots=True)
class RoomIndex:
    """room -> {member id: socket} for this router's confirmed members.

    Sockets, not clients: fan-out needs nothing else, one look-up less per
    delivery."""

    rooms: dict[str, dict[int, ClientWebSocket]] = field(default_factory=dict)

    def add(self, room: str, client: Client) -> None:
        assert client.socket is not None  # set before the client can join
        self.rooms.setdefault(room, {})[client.id] = client.socket

    def remove(self, room: str, client: Client) -> None:
        members = self.rooms.get(room)
        if members is not None and members.pop(client.id, None) is not None and not members:
            del self.rooms[room]

    def members(self, room: str) -> dict[int, ClientWebSocket]:
        return self.rooms.get(room, {})


class Router:
    def __init__(self, config: Config, router_id: str) -> None:
        self.config = config
        self.router_id = router_id
        self.clients: dict[int, Client] = {}
        self.index = RoomIndex()
        self.stopping = trio.Event()
        # Where connections start their short-lived helper tasks; set by
        # serve_router before the first connection is accepted.
        self.background: trio.Nursery
        self._ids = itertools.count(1)
        self.links = [
            ShardLink(i, config.shard_socket(i), router_id, config.shards, self._on_shard_message, self._replay)
            for i in range(config.shards)
        ]

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
        client.room, client.username, client.confirmed = room, username, False
        self._link(room).send(wire.Join(client.id, room, username))

    def publish(self, client: Client, body: str) -> None:
        assert client.room is not None
        self._link(client.room).send(wire.Publish(client.id, body))

    def leave(self, client: Client) -> None:
        room = client.room
        assert room is not None
        if client.confirmed:
            self.index.remove(room, client)
        client.room, client.confirmed = None, False
        self._link(room).send(wire.Leave(client.id))

    def _replay(self, shard: int) -> Iterator[wire.WireMessage]:
        """What a reconnected shard must learn again about our members."""
        for client in self.clients.values():
            room = client.room
            if room is None or shard_for(room, self.config.shards) != shard:
                continue
            assert client.username is not None
            if client.confirmed:
                yield wire.Rejoin(client.id, room, client.username)
            else:
                yield wire.Join(client.id, room, client.username)

    # -- shard -> clients ---------------------------------------------------

    def _on_shard_message(self, message: wire.WireMessage) -> None:
        if isinstance(message, wire.Deliver):
            self._fan_out(message.room, message.text, message.exclude)
        elif isinstance(message, wire.Joined):
            client = self.clients.get(message.member)
            if client is not None and client.room == message.room and not client.confirmed:
                client.confirmed = True
                self.index.add(message.room, client)
            self._fan_out(message.room, message.text, -1)
        else:
            log.warning("unexpected message from a shard: %s", type(message).__name__)

    def _fan_out(self, room: str, text: bytes, exclude: int) -> None:
        members = self.index.rooms.get(room)
        if members:
            fan_out(members.items(), text_frame(text), exclude)

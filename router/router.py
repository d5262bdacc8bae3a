"""The router's state: connections before their join, and what it handed over.

The router is the front door. It runs each connection's session up to the
join (garin/connection.py does the loop; this is its `Place`), then hands the
connection to the shard that owns the room (`move`): the socket and the
session's state go over the shard's link and the router closes its copy. It
keeps only what its connection limits need (`Handed`), until the shard says
the connection ended (`Ended`), or relinks without it, or stays unreachable
(its connections died with it). A member that joins a room of another shard comes back
through a router (`forward`), which passes it on like a new one.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from garin import closes, wire
from garin.closes import Close
from garin.config import Config
from garin.connection import Connection, count_close
from garin.frames_in import FrameParser
from garin.handoff import hand_over, send_socket
from garin.link import LOST
from garin.clientcounts import ClientCounts
from garin.socketdir import prepare_socket_dir
from garin.limits import ConnectionLimits
from garin.proxies import address_of
from garin.routing import shard_for
from garin.websocket import ClientWebSocket
from garin.router.bans import RouterBans
from garin.router.shard_link import ShardLink

log = logging.getLogger("garin.router")


@dataclass(slots=True)
class Handed:
    """A connection this router counts that lives in shard `shard`."""

    address: str
    subject: str | None
    shard: int


class Router:
    def __init__(self, config: Config, router_id: str) -> None:
        self.config = config
        self.router_id = router_id
        # Unique per process: a restarted router is not told about the
        # connections its predecessor counted.
        self.instance = f"{router_id}:{os.getpid()}"
        self.clients: dict[int, Connection] = {}
        self.handed: dict[int, Handed] = {}
        # With several routers, one client's connections spread over them:
        # its limit counts them all (garin/clientcounts.py).
        self.client_counts: ClientCounts | None = None
        if config.routers > 1 and config.max_connections_per_ip:
            prepare_socket_dir(Path(config.socket_dir))
            self.client_counts = ClientCounts(config.socket_dir)
        self.limits = ConnectionLimits(
            config.max_connections, config.max_connections_per_ip, others=self.client_counts
        )
        # Whether a peer is a trusted proxy, asked at every accept: parsing
        # an address costs more than the look-up, and peers repeat.
        self.trusts_proxy = functools.lru_cache(maxsize=4096)(config.trusted_proxies.trusts)
        self.trusted_proxies = config.trusted_proxies
        # Built once: every connection's session and token check read it.
        self.session_rules = config.session_rules
        self.stopping = trio.Event()
        # Members being passed on to another shard (`forward`), still ours;
        # connections whose HTTP upgrade is not read yet.
        self.moving: set[ClientWebSocket] = set()
        self.handshaking: set[ClientWebSocket] = set()
        self.bans = (
            RouterBans(config.ban_db, config.ban_policy, config.redis_url, config.redis_password_file)
            if config.ban_db else None
        )
        # Where connections start their helper tasks (drains, forwards); set
        # by serve_router before the first connection is accepted.
        self.background: trio.Nursery
        self._ids = itertools.count(1)
        self.links = [
            ShardLink(
                i, config.shard_socket(i), self.instance, config.shards,
                self._ended, self._forward_soon, self._shard_linked, self._shard_gone,
            )
            for i in range(config.shards)
        ]

    def health(self) -> dict[str, dict[str, bool]]:
        """/health's parts: each shard reachable; with Redis, each shard's link to it."""
        parts = {"shards": {str(link.index): link.connected for link in self.links}}
        if self.config.redis_url:
            parts["redis"] = {str(link.index): link.connected and link.redis_up for link in self.links}
        return parts

    def new_id(self) -> int:
        return next(self._ids)

    # -- Place: a router holds no rooms, it hands every join on ---------------

    def join(self, conn: Connection, room: str, username: str) -> bool:
        return False

    def publish(self, conn: Connection, body: str) -> None:
        raise AssertionError("a router has no members")

    def leave(self, conn: Connection) -> None:
        pass  # never in a room here (a join moves the connection first)

    async def move(self, conn: Connection) -> Close | None:
        """Hand `conn` (joining conn.room) to its room's shard."""
        assert conn.room is not None
        index = shard_for(conn.room, self.config.shards)
        # While its shard is down the client waits (in hand_over), up to the
        # hold from now, however many times the link drops meanwhile.
        shard = self.links[index]
        deadline = trio.current_time() + self.config.shard_hold_timeout_s
        address = conn.address or address_of(conn.peer)
        close = await hand_over(
            conn, functools.partial(shard.wait_up, deadline), self.config.shard_hold_timeout_s, shard.serving
        )
        if close is None:
            # Sent, and no checkpoint since: the shard's `Ended` cannot have
            # been read yet. The count moves from this task to `handed`.
            self.handed[conn.id] = Handed(address, conn.subject, index)
        return close

    # -- what shards tell us ----------------------------------------------------

    def _ended(self, message: wire.Ended) -> None:
        handed = self.handed.pop(message.conn, None)
        if handed is None:
            return  # counted by this router's predecessor, or moved away
        self._release(handed.address)
        if message.rate_limited and handed.subject is not None and self.bans is not None:
            self.bans.rate_limited(handed.subject)

    def _release(self, address: str) -> None:
        try:
            self.limits.release(address)
        except ValueError:
            # A bug in the accounting must not take the router down.
            log.exception("connection count for %s was released twice", address)

    def _shard_linked(self, index: int, live: frozenset[int]) -> None:
        """Shard `index` (re)linked, holding `live` of our connections: the
        others it had ended while we were unlinked (or it is a new process)."""
        self._forget(index, live)

    def _shard_gone(self, index: int) -> None:
        """Shard `index` stayed unreachable: its connections died with it (or
        will never tell us they ended), so they count no more."""
        self._forget(index, frozenset())

    def _forget(self, index: int, live: frozenset[int]) -> None:
        gone = [conn for conn, handed in self.handed.items() if handed.shard == index and conn not in live]
        for conn in gone:
            self._release(self.handed.pop(conn).address)

    def _take_own(self, message: wire.Adopt) -> Handed | None:
        """The record of a moving connection if it is one of ours (this
        router counts it), no longer kept as handed to its old shard."""
        return self.handed.pop(message.conn, None) if message.owner == self.instance else None

    def _forward_soon(self, message: wire.Adopt, fd: int) -> None:
        if fd == LOST:
            log.warning(
                "conn %d (%s): its socket could not be received (open-files limit, ulimit -n); dropped",
                message.conn, message.peer,
            )
            handed = self._take_own(message)
            if handed is not None:
                self._release(handed.address)
            return
        try:
            self.background.start_soon(self.forward, message, fd)
        except RuntimeError:  # the nursery is closing: we are stopping
            os.close(fd)

    async def forward(self, message: wire.Adopt, fd: int) -> None:
        """A member moves to a room of another shard: pass it on, or close
        it 1013 if that shard stays unreachable (1001 if we stop first).
        Owns `fd` (closes it whatever happens)."""
        try:
            sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        except BaseException:
            os.close(fd)
            raise
        try:
            await self._forward(message, sock)
        except Exception:
            log.exception("conn %d (%s): passing it on failed", message.conn, message.peer)
        finally:
            sock.close()  # closed already, unless something failed

    async def _forward(self, message: wire.Adopt, sock: trio.socket.SocketType) -> None:
        index = shard_for(message.room, self.config.shards)
        address = address_of(message.peer)
        # Our own connection keeps its id and count; another router's (it
        # is gone, or the shard would have used it) gets an id of ours, so
        # it can never be mistaken for one of our own connections.
        handed = self._take_own(message)
        conn_id = message.conn if handed is not None else self.new_id()
        if handed is None and self.limits.admit(address) is None:
            handed = Handed(address, message.subject, index)
        try:
            frames = FrameParser.restore(self.config.max_message_bytes, message.frames)
        except ValueError:
            log.warning("conn %d (%s): moved with a bad parser state; dropped", message.conn, message.peer)
            if handed is not None:
                self._release(handed.address)
            return
        # A client socket while it waits here, so that a stop can close it
        # (`moving`). Nothing reads it, so `message.frames` stays true.
        ws = ClientWebSocket.adopted(sock, frames, self.background, self.config.max_outbox_bytes)
        shard = self.links[index]
        deadline = trio.current_time() + self.config.shard_hold_timeout_s
        self.moving.add(ws)
        try:
            if self.stopping.is_set():
                ws.kick(closes.SHUTDOWN)
            passed = replace(message, owner=self.instance, conn=conn_id)
            close = await send_socket(ws, passed, functools.partial(shard.wait_up, deadline))
        except BaseException:
            if handed is not None:  # not handed on: its count must not stay taken
                self._release(handed.address)
            raise
        finally:
            self.moving.discard(ws)
        if close is None:
            # Sent, and no checkpoint since (as in `move`).
            if handed is not None:
                handed.shard = index
                self.handed[conn_id] = handed
            return
        if handed is not None:
            self._release(handed.address)
        # A close frame, as to any client whose room is unavailable.
        log.info("conn %d (%s): closing %d %s", message.conn, message.peer, close.code, close.reason)
        count_close(close)
        await ws.close(close)

    def close_all(self, close: Close) -> None:
        """The router stops: every client it still holds gets `close` (or,
        still in its handshake, HTTP 503)."""
        for conn in list(self.clients.values()):
            conn.socket.kick(close)
        for ws in [*self.moving, *self.handshaking]:
            ws.kick(close)

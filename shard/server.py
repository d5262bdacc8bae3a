"""The shard's trio shell: adopt connections from routers, serve their rooms.

A shard listens on a Unix socket; every router links to it (hello, welcome)
and hands it the clients that joined one of its rooms (`Adopt`, the socket
with it). From then on the connection lives here: one task per connection
runs its session (garin/connection.py), and this module is the `Place` it
runs in: a join announces in the room, a message is encoded once and
written to every member (garin/websocket.py `fan_out`), a leave announces.
A member that joins a room of another shard is passed back through a router
(`move`), after its userleave was announced here. When the connection ends
its owning router hears `Ended`, to release what it counted.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from garin import closes, metrics, protocol, wire
from garin.closes import Close
from garin.config import Config
from garin.connection import MOVED, Connection, Moved, serve_connection
from garin.frames import text_frame
from garin.handoff import adopted_connection, hand_over
from garin.fdlimit import raise_file_limit
from garin.lifeline import stop_on_signal, watch_lifeline
from garin.profiling import tune_gc
from garin.link import LOST, Link, LinkClosed, close_fds, receive_first
from garin.routing import HASH_NAME, shard_for
from garin.socketdir import prepare_socket_dir
from garin.websocket import ClientWebSocket, fan_out
from garin.shard.rooms import Announce, Rooms

if TYPE_CHECKING:
    from garin.shard.cluster import RedisRooms

log = logging.getLogger("garin.shard")

HELLO_TIMEOUT_S = 5.0
METRICS_SAMPLE_S = 1.0


class Shard:
    def __init__(self, config: Config, index: int) -> None:
        self.config = config
        self.index = index
        self.rules = config.session_rules
        self.rooms: Rooms[ClientWebSocket] = Rooms()
        # With GARIN_REDIS_URL, rooms are shared with other hosts and live
        # there instead of in `rooms` (imported only then).
        self.cluster: RedisRooms | None = None
        if config.redis_url:
            from garin.shard import cluster

            self.cluster = cluster.RedisRooms(config, index)
        # Router instance -> its link, for `Ended` and for moves.
        self.routers: dict[str, Link] = {}
        # Set (and replaced) whenever a router links: moves waiting for one.
        self._router_linked = trio.Event()
        # The shutdown deadline, once stopping: no link send lasts past it.
        self._send_deadline = math.inf
        self.conns: dict[int, Connection] = {}
        # Shard-local member keys (connection ids are per router) and the
        # room each member is in here.
        self._keys: dict[int, tuple[int, str]] = {}
        self._next_key = itertools.count(1)
        self.stopping = trio.Event()
        # Where connection tasks and their drains run; set by serve_shard.
        self.nursery: trio.Nursery

    # -- links ------------------------------------------------------------------

    def refusal(self, hello: wire.Hello) -> str | None:
        if hello.version != wire.PROTOCOL_VERSION:
            return f"protocol version {hello.version} != {wire.PROTOCOL_VERSION}"
        if hello.shard_index != self.index:
            return f"this is shard {self.index}, not {hello.shard_index}"
        if hello.shard_count != self.config.shards:
            return f"router has {hello.shard_count} shards, this shard has {self.config.shards} (GARIN_SHARDS must match)"
        if hello.hash_name != HASH_NAME:
            return f"router routes by {hello.hash_name!r}, this shard by {HASH_NAME!r}"
        return None

    async def handle_link(self, stream: trio.SocketStream) -> None:
        link = Link(stream.socket)
        router = "?"
        try:
            hello = await receive_first(link, HELLO_TIMEOUT_S)
            if not isinstance(hello, wire.Hello):
                raise wire.WireError(f"expected hello, got {type(hello).__name__}")
            router = hello.router_id
            refusal = self.refusal(hello)
            if refusal is not None:
                log.error("shard %d: refusing router %s: %s", self.index, router, refusal)
                await link.send(wire.Refuse(refusal))
                return
            live = tuple(conn.id for conn in self.conns.values() if conn.owner == router)
            await link.send(wire.Welcome(wire.PROTOCOL_VERSION, self.index, live))
            self.routers[router] = link
            link.limit_sends(self._send_deadline)  # stopping already?
            self._router_linked.set()
            self._router_linked = trio.Event()
            log.info("shard %d: router %s linked", self.index, router)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_posted)
                while True:
                    batch = await link.receive()
                    taken = 0  # messages of the batch handled so far
                    try:
                        for message, fd in batch:
                            if taken:
                                # Each adopted join is written to the whole room:
                                # let other tasks (members, pongs) run between them.
                                await trio.lowlevel.checkpoint()
                            taken += 1
                            if isinstance(message, wire.Adopt) and fd == LOST:
                                self._lost(message)
                            elif isinstance(message, wire.Adopt) and fd is not None:
                                self._adopt(message, fd)
                            elif isinstance(message, wire.Ping):
                                link.post(wire.Pong(message.no, self.cluster is None or self.cluster.up))
                            else:
                                raise wire.WireError(f"unexpected {type(message).__name__} from router {router}")
                    except BaseException:
                        close_fds(batch[taken:])  # nobody takes them now
                        raise
        except* (LinkClosed, wire.WireError, trio.TooSlowError) as group:
            exc = group.exceptions[0]
            log.info("shard %d: router %s unlinked (%s)", self.index, router, str(exc) or type(exc).__name__)
        except* Exception:
            log.exception("shard %d: link to router %s crashed", self.index, router)
        finally:
            link.close()
            if self.routers.get(router) is link:
                del self.routers[router]

    def _lost(self, message: wire.Adopt) -> None:
        """A connection handed over whose socket this process could not take
        (at its open-files limit): gone, and its router's count with it."""
        log.warning(
            "shard %d: conn %d (%s): its socket could not be received (open-files limit, ulimit -n); dropped",
            self.index, message.conn, message.peer,
        )
        owner = self.routers.get(message.owner)
        if owner is not None:
            owner.post(wire.Ended(message.conn, False))

    def _adopt(self, message: wire.Adopt, fd: int) -> None:
        """Take a connection in and announce its join at once, so joins are
        applied in the order the link brought them."""
        try:
            conn = adopted_connection(
                message, fd, self.rules, self.config.max_message_bytes, self.config.max_outbox_bytes, self.nursery
            )
        except ValueError as exc:
            raise wire.WireError(f"bad Adopt: {exc}") from None
        self.conns[id(conn)] = conn
        metrics.CONNECTIONS.inc()
        if self.stopping.is_set():
            conn.socket.kick(closes.SHUTDOWN)
        assert conn.room is not None and conn.username is not None
        room, conn.room = conn.room, None
        if self.join(conn, room, conn.username):
            self.nursery.start_soon(self._serve, conn)
        else:
            conn.room = room  # not ours (the router's shard count differs?): pass it on
            self.nursery.start_soon(self._pass_on, conn)

    async def _pass_on(self, conn: Connection) -> None:
        async def moved() -> Close | Moved | None:
            close = await self.move(conn)
            if close is None:
                return MOVED
            conn.room = None
            await conn.socket.close(close)
            return close

        await self._serve(conn, moved)

    async def _serve(self, conn: Connection, run: Callable[[], Awaitable[Close | Moved | None]] | None = None) -> None:
        """Run an adopted connection here (or `run` instead) and clean up after it."""
        outcome: Close | Moved | None = None
        try:
            outcome = await (run() if run is not None else serve_connection(conn, self))
        except Exception:
            log.exception("conn %d (%s): internal error", conn.id, conn.peer)
            if id(conn) in self._keys:
                self.leave(conn)
            conn.room = None
            with trio.move_on_after(1):
                await conn.socket.close(closes.INTERNAL)
        finally:
            if id(conn) in self._keys:
                # Still a member (cancelled, or a bug above): the room must
                # hear it leave. `conn.room` may name the room it was moving
                # to, so look where it is by its key.
                self.leave(conn)
            conn.socket.hang_up()
            metrics.CONNECTIONS.dec()
            del self.conns[id(conn)]
            if outcome is not MOVED:
                owner = self.routers.get(conn.owner)
                if owner is not None:
                    owner.post(wire.Ended(conn.id, outcome == closes.RATE_LIMITED))

    # -- Place --------------------------------------------------------------------

    def join(self, conn: Connection, room: str, username: str) -> bool:
        if shard_for(room, self.config.shards) != self.index:
            return False
        key = next(self._next_key)
        self._keys[id(conn)] = (key, room)
        conn.room = room
        metrics.JOINS.inc()
        if self.cluster is not None:
            self.cluster.join(key, room, username, conn.socket)
        else:
            self._announce(self.rooms.join(room, key, username, conn.socket), -1)
        return True

    def publish(self, conn: Connection, body: str) -> None:
        assert conn.room is not None and conn.username is not None
        key, room = self._keys[id(conn)]
        if self.cluster is not None:
            refused = self.cluster.publish(key, conn.username, body)
            if refused is not None:
                conn.socket.kick(refused)
            return
        members = self.rooms.members(room)
        if len(members) > 1:
            fan_out(members.items(), text_frame(protocol.message_text(conn.username, body)), key)
            metrics.DELIVERIES.inc(len(members) - 1)

    def leave(self, conn: Connection) -> None:
        # The room it joined here (while it moves, conn.room names the next).
        key, room = self._keys.pop(id(conn))
        metrics.LEAVES.inc()
        if self.cluster is not None:
            self.cluster.leave(key)
            return
        announce = self.rooms.leave(room, key)
        if announce is not None:
            self._announce(announce, key)

    def _announce(self, announce: Announce[ClientWebSocket], exclude: int) -> None:
        if announce.to:
            fan_out(announce.to.items(), text_frame(announce.text), exclude)
            metrics.DELIVERIES.inc(len(announce.to) - (exclude in announce.to))

    async def move(self, conn: Connection) -> Close | None:
        """Pass `conn` (joining conn.room, of another shard) to a router, which
        passes it on: its owner if still linked, else any; if none is, the
        first to link within GARIN_SHARD_HOLD_TIMEOUT."""
        deadline = trio.current_time() + self.config.shard_hold_timeout_s
        next_link = functools.partial(self._router_link, conn.owner, deadline)
        return await hand_over(conn, next_link, self.config.shard_hold_timeout_s)

    async def _router_link(self, owner: str, deadline: float) -> Link | None:
        """A router's open link (`owner`'s if it has one), waiting for one
        to link until `deadline`; None if none did. A link closed by a send
        that failed is skipped: its task reads it to its end, then drops it."""
        while True:
            link = self.routers.get(owner)
            if link is None or not link.can_send:
                link = next((other for other in self.routers.values() if other.can_send), None)
            if link is not None:
                # A retry after a send that took long must not outlast the hold.
                return link if trio.current_time() < deadline else None
            with trio.move_on_at(deadline):
                await self._router_linked.wait()
            if trio.current_time() >= deadline:
                return None

    # -- stopping -------------------------------------------------------------------

    def close_all(self, close: Close) -> None:
        for conn in list(self.conns.values()):
            conn.socket.kick(close)

    def limit_sends(self, deadline: float) -> None:
        """No link send (now or on a link made later) lasts past `deadline`."""
        self._send_deadline = deadline
        for link in self.routers.values():
            link.limit_sends(deadline)


async def serve_shard(
    config: Config,
    index: int,
    lifeline_fd: int | None = None,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Every member's socket lives here: as many as all routers may hand over.
    raise_file_limit(config.max_connections * config.routers, config.routers, "shard")
    shard = Shard(config, index)
    path = config.shard_socket(index)
    prepare_socket_dir(path.parent)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    if path.exists():
        if await _is_alive(path):
            raise RuntimeError(f"shard {index} is already running at {path}")
        path.unlink()  # a stale socket from a killed shard
    await sock.bind(str(path))
    try:
        os.chmod(path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as outer:
            outer.start_soon(stop_on_signal, shard.stopping)
            outer.start_soon(_sample_rooms, shard)
            if shard.cluster is not None:
                outer.start_soon(shard.cluster.run)
            if lifeline_fd is not None:
                outer.start_soon(watch_lifeline, lifeline_fd, shard.stopping.set)
            with trio.CancelScope() as grace:
                async with trio.open_nursery() as conns:
                    shard.nursery = conns
                    accepting = trio.CancelScope()

                    async def accept() -> None:
                        with accepting:
                            await trio.serve_listeners(shard.handle_link, [listener])

                    conns.start_soon(accept)
                    tune_gc()
                    log.info("shard %d of %d listening on %s", index, config.shards, path)
                    task_status.started(path)
                    await shard.stopping.wait()
                    log.info("shard %d stopping: closing %d clients", index, len(shard.conns))
                    shard.close_all(closes.SHUTDOWN)
                    grace.deadline = trio.current_time() + config.shutdown_timeout_s
                    # Link sends are shielded: bounded by the grace too.
                    shard.limit_sends(grace.deadline)
                    # Links stay up while the clients close (their Ended
                    # reach the routers); then everything stops.
                    while shard.conns:
                        await trio.sleep(0.01)
                    if shard.cluster is not None:
                        # The members' leaves reach the other hosts.
                        with trio.move_on_after(2):
                            await shard.cluster.say_farewell()
                    # Let the last `Ended` reach the routers, briefly.
                    with trio.move_on_after(0.2):
                        while any(link.posting for link in shard.routers.values()):
                            await trio.sleep(0.01)
                    accepting.cancel()
            outer.cancel_scope.cancel()
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _sample_rooms(shard: Shard) -> None:
    label = str(shard.index)
    while True:
        if shard.cluster is not None:
            metrics.ROOMS.labels(shard=label).set(shard.cluster.room_count)
            metrics.MEMBERS.labels(shard=label).set(shard.cluster.member_count)
        else:
            metrics.ROOMS.labels(shard=label).set(len(shard.rooms))
            metrics.MEMBERS.labels(shard=label).set(shard.rooms.member_count)
        await trio.sleep(METRICS_SAMPLE_S)


async def _is_alive(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await stream.aclose()
    return True

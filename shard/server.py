"""The shard's trio shell: a Unix socket, one task per router link.

Each link writes through a `BatchWriter` (garin/batch_writer.py): everything
the shard produced for a link in one scheduler pass leaves in one system call
at the end of the pass, without waking a writer task. A message for several links is encoded once.
The rooms core decides everything, and the replay gate (shard/gate.py) when a
newly started shard may apply new events; this module only moves bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path

import trio

from garin import metrics, wire
from garin.batch_writer import BatchWriter, LinkOverflow, receive_into
from garin.config import Config
from garin.lifeline import watch_lifeline
from garin.routing import HASH_NAME
from shard.gate import REPLAY_GRACE_S, ReplayGate
from shard.rooms import Outgoing, Rooms

log = logging.getLogger("garin.shard")

HELLO_TIMEOUT_S = 5.0
RECEIVE_BYTES = 256 * 1024
# A router that stops reading its link is dropped past this (it reconnects and
# replays), so one stuck router cannot grow a shard's memory without bound.
MAX_LINK_QUEUE_BYTES = 64 * 1024 * 1024
# A router answers a Revoke as soon as it reads it. One that has not, although
# for this long everything sent to it (the Revoke included) has been in its
# socket, is stuck while a join waits on it: unlink it (it relinks and replays).
REVOKE_TIMEOUT_S = 5.0


class Link:
    def __init__(self, link_id: int, router_id: str, stream: trio.SocketStream) -> None:
        self.id = link_id
        self.router_id = router_id
        self.stream = stream
        self.writer = BatchWriter(stream.socket, MAX_LINK_QUEUE_BYTES, f"router {router_id}")
        # Cancelled to unlink a router that does not answer a Revoke.
        self.scope = trio.CancelScope()
        # When the shard last saw data queued for it that its socket would not take.
        self.backlog_seen = trio.current_time()

    def send(self, data: bytes) -> None:
        self.writer.send(data)


class Shard:
    def __init__(self, config: Config, index: int) -> None:
        self.config = config
        self.index = index
        self.rooms = Rooms()
        self.links: dict[int, Link] = {}
        self._ids = itertools.count(1)
        self.gate = ReplayGate(config.routers, trio.current_time())
        self.ready = trio.Event()

    def dispatch(self, outgoing: list[Outgoing]) -> None:
        encoded: dict[int, bytes] = {}
        for link_id, message in outgoing:
            link = self.links.get(link_id)
            if link is None:
                continue
            data = encoded.get(id(message))
            if data is None:
                data = encoded[id(message)] = wire.encode(message)
            link.send(data)

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
        try:
            async with stream:
                await self._serve_link(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, wire.WireError, trio.TooSlowError) as group:
            # Our own overflow wakes the reader too: name the cause, not the echo.
            overflow, _ = group.split(LinkOverflow)
            exc = (overflow or group).exceptions[0]
            log.warning("shard %d: link dropped: %s", self.index, str(exc) or type(exc).__name__)
        except* Exception:
            log.exception("shard %d: link crashed", self.index)

    async def _serve_link(self, stream: trio.SocketStream) -> None:
        decoder = wire.Decoder()
        pending: list[wire.WireMessage] = []
        with trio.fail_after(HELLO_TIMEOUT_S):
            while not pending:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                pending.extend(decoder.feed(data))
        hello = pending.pop(0)
        if not isinstance(hello, wire.Hello):
            raise wire.WireError(f"expected hello, got {type(hello).__name__}")
        refusal = self.refusal(hello)
        if refusal is not None:
            log.error("shard %d: refusing router %s: %s", self.index, hello.router_id, refusal)
            await stream.send_all(wire.encode(wire.Refuse(refusal)))
            return
        link = Link(next(self._ids), hello.router_id, stream)
        self.links[link.id] = link
        log.info("shard %d: router %s linked", self.index, hello.router_id)
        try:
            await stream.send_all(wire.encode(wire.Welcome(wire.PROTOCOL_VERSION, self.index)))
            with link.scope:
                await self._pump(link, decoder, pending)
        finally:
            link.writer.close()
            del self.links[link.id]
            self.dispatch(self.rooms.drop_link(link.id, trio.current_time()))
            log.info("shard %d: router %s unlinked", self.index, hello.router_id)

    async def _pump(self, link: Link, decoder: wire.Decoder, pending: list[wire.WireMessage]) -> None:
        stream = link.stream
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.writer.run)
            await self._apply_gated(link, pending)
            sock = stream.socket
            buffer = bytearray(RECEIVE_BYTES)
            while True:
                chunk = await receive_into(sock, buffer)
                if not chunk:
                    break
                if self.ready.is_set():
                    self._apply(link.id, decoder.feed(chunk))
                else:
                    await self._apply_gated(link, decoder.feed(chunk))
            nursery.cancel_scope.cancel()

    async def _apply_gated(self, link: Link, messages: Iterable[wire.WireMessage]) -> None:
        """Apply `messages` in order while the replay gate may still be shut:
        replays go through, anything else waits for the gate."""
        for message in messages:
            if not self.ready.is_set():
                if type(message) is wire.Replayed:
                    if self.gate.replayed(link.router_id):
                        log.debug("shard %d: %d routers replayed; applying events", self.index, self.gate.expected)
                        self.ready.set()
                    continue
                if type(message) is not wire.Rejoin:
                    await self.ready.wait()
            self._apply(link.id, (message,))

    async def open_gate_after_grace(self) -> None:
        await trio.sleep_until(self.gate.deadline)
        if self.gate.timeout(trio.current_time()) and not self.ready.is_set():
            log.info(
                "shard %d: only %d of %d routers (GARIN_ROUTERS) replayed their members within %g s; "
                "applying events without the rest",
                self.index, len(self.gate.replayed_by), self.gate.expected, REPLAY_GRACE_S,
            )
            self.ready.set()

    def _apply(self, link_id: int, messages: Iterable[wire.WireMessage]) -> None:
        handle = self.rooms.handle
        now = trio.current_time()
        for message in messages:
            kind = type(message)
            if kind is wire.Join:
                metrics.JOINS.inc()
            elif kind is wire.Leave:
                metrics.LEAVES.inc()
            elif kind is wire.Replayed:
                continue  # the gate is open already
            out = handle(link_id, message, now)
            if out:
                self.dispatch(out)

    async def unlink_overdue(self) -> None:
        """Unlink routers that leave a Revoke unanswered (a join waits on them).
        A router still working through a backlog is slow, not stuck: it is
        given REVOKE_TIMEOUT_S from when its socket took everything."""
        while True:
            await trio.sleep(REVOKE_TIMEOUT_S / 5)
            now = trio.current_time()
            for link in self.links.values():
                if link.writer.queued:
                    link.backlog_seen = now
            for link_id in self.rooms.overdue(now, REVOKE_TIMEOUT_S):
                stuck = self.links.get(link_id)
                if stuck is not None and not stuck.scope.cancel_called and now - stuck.backlog_seen > REVOKE_TIMEOUT_S:
                    log.warning(
                        "shard %d: router %s has not released a room in %g s; unlinking it",
                        self.index, stuck.router_id, REVOKE_TIMEOUT_S,
                    )
                    metrics.UNLINKS.inc()
                    stuck.scope.cancel()


def prepare_socket_dir(path: Path) -> None:
    """Create the socket directory private to this user, or refuse a shared one."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"socket directory {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


async def serve_shard(
    config: Config,
    index: int,
    lifeline_fd: int | None = None,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope, index)
            nursery.start_soon(_sample_rooms, shard)
            if lifeline_fd is not None:
                nursery.start_soon(watch_lifeline, lifeline_fd, nursery.cancel_scope.cancel)
            nursery.start_soon(shard.open_gate_after_grace)
            nursery.start_soon(shard.unlink_overdue)
            nursery.start_soon(trio.serve_listeners, shard.handle_link, [listener])
            log.info("shard %d of %d listening on %s", index, config.shards, path)
            task_status.started(path)
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _sample_rooms(shard: Shard) -> None:
    label = str(shard.index)
    revokes = 0
    while True:
        rooms = shard.rooms
        metrics.ROOMS.labels(shard=label).set(len(rooms))
        metrics.MEMBERS.labels(shard=label).set(rooms.members())
        metrics.SOLO_ROOMS.labels(shard=label).set(rooms.solo_rooms())
        if rooms.revokes > revokes:
            metrics.REVOKES.inc(rooms.revokes - revokes)
            revokes = rooms.revokes
        await trio.sleep(1.0)


async def _is_alive(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await stream.aclose()
    return True


async def _stop_on_signal(scope: trio.CancelScope, index: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("shard %d stopping", index)
            scope.cancel()
            return

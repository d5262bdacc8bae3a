"""One router's link to one shard: connect, hello, then hand connections over.

The link is up (`link`) once the shard welcomed this router. Hand-offs wait
for it (`wait_up`) at most GARIN_SHARD_HOLD_TIMEOUT (and again, within that
time, for a link that closed under their send), then the router closes the
client 1013 "room unavailable". What the shard sends back (a connection
ended, a member moving to another shard's room) goes to the router's
callbacks. A lost link is retried every RETRY_MAX_S at most, forever; once
relinked, the shard's `Welcome` says which of the router's connections it
still holds (`on_linked`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import trio

from garin import wire
from garin.link import Link, LinkClosed, close_fds, receive_first
from garin.routing import HASH_NAME

log = logging.getLogger("garin.router")

HELLO_TIMEOUT_S = 5.0
RETRY_MIN_S = 0.05
# A restarted shard is back within a second or so; retrying a Unix socket
# connect twice a second costs nothing and keeps the outage short.
RETRY_MAX_S = 0.5
# A linked shard is asked every PING_EVERY_S whether it is reading; one that
# has not answered for UNRESPONSIVE_S (stopped, deadlocked) counts as down:
# /health says so and hand-offs wait for it as for a shard that is down. A
# shard reads pings in order behind the hand-offs already sent, and a burst
# of joins into a big room keeps it busy for seconds: 10 s of silence is
# not that.
PING_EVERY_S = 1.0
UNRESPONSIVE_S = 10.0
# A link can drop while its shard lives on (a send that timed out, a
# protocol error): the shard's connections are then still there, and the
# next Welcome lists them. Only a shard unreachable this long is taken for
# dead with all its connections (a crashed one is back within a second).
FORGET_AFTER_S = 10.0


class ShardRefused(Exception):
    """The shard will not serve this router: a configuration mismatch."""


class ShardLink:
    def __init__(
        self,
        index: int,
        path: Path,
        router_id: str,
        shard_count: int,
        on_ended: Callable[[wire.Ended], None],
        on_move: Callable[[wire.Adopt, int], None],
        on_linked: Callable[[int, frozenset[int]], None],
        on_gone: Callable[[int], None],
    ) -> None:
        self.index = index
        self.path = path
        self._router_id = router_id
        self._shard_count = shard_count
        self._on_ended = on_ended
        self._on_move = on_move
        self._on_linked = on_linked
        self._on_gone = on_gone
        self.link: Link | None = None
        self._up = trio.Event()
        # The shard answered a ping recently (or was just linked).
        self.responsive = False
        self._answered_at = 0.0
        # The shard's last Pong said its Redis link was up (GARIN_REDIS_URL).
        self.redis_up = False
        # Set by `limit_sends` when the router stops.
        self._send_deadline = math.inf

    @property
    def connected(self) -> bool:
        return self.link is not None and self.responsive

    def serving(self) -> Link | None:
        link = self.link
        return link if link is not None and link.can_send and self.responsive else None

    async def wait_up(self, deadline: float) -> Link | None:
        """The live link, waiting for it until `deadline` (trio time); None if
        it stays down."""
        serving = self.serving()
        if serving is not None:
            # The usual case, without a cancel scope. Checked here too: a
            # retry after a send that took long must not outlast the hold.
            return serving if trio.current_time() < deadline else None
        with trio.move_on_at(deadline):
            while self.serving() is None:
                if self._up.is_set():
                    # Up, but its link closed (a send failed a moment ago):
                    # `run` has not dropped it yet. Soon it has, and relinks.
                    await trio.sleep(RETRY_MIN_S)
                else:
                    await self._up.wait()
        return self.serving()

    def limit_sends(self, deadline: float) -> None:
        """The process stops: no send on this link (or a later one) may last
        past `deadline` (garin/link.py `Link.limit_sends`)."""
        self._send_deadline = min(self._send_deadline, deadline)
        if self.link is not None:
            self.link.limit_sends(deadline)

    def _set_responsive(self, responsive: bool) -> None:
        if responsive and not self.responsive:
            self._up.set()
        elif not responsive and self.responsive:
            self._up = trio.Event()
        self.responsive = responsive

    async def _keep_asking(self, link: Link) -> None:
        """Ping the shard; mark it unresponsive while its answers are overdue."""
        for no in itertools.count(1):
            try:
                await link.send(wire.Ping(no))
            except LinkClosed:
                if link.closed:
                    raise
                # The shard went: `_pump` first reads what it sent before
                # (its last Ended, members it passed on) to the end.
                self._set_responsive(False)
                await link.wait_read_out()
            await trio.sleep(PING_EVERY_S)
            overdue = trio.current_time() - self._answered_at > UNRESPONSIVE_S
            if overdue and self.responsive:
                log.warning("shard %d has not answered for %g s; not handing it clients", self.index, UNRESPONSIVE_S)
            self._set_responsive(not overdue)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up forever; `started` at once (the router serves
        clients of other shards meanwhile)."""
        task_status.started()
        delay = RETRY_MIN_S
        waiting_logged = False
        # When the link last dropped with connections maybe still counted.
        unlinked_at: float | None = None
        while True:
            if unlinked_at is not None and trio.current_time() - unlinked_at >= FORGET_AFTER_S:
                unlinked_at = None
                self._on_gone(self.index)
            try:
                sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
                try:
                    await sock.connect(str(self.path))
                except OSError:
                    sock.close()
                    raise
            except OSError as exc:
                if not waiting_logged:
                    # Normal at start (shards are starting too) and while one restarts.
                    log.debug("shard %d not reachable yet at %s (%s)", self.index, self.path, exc.strerror)
                    waiting_logged = True
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            waiting_logged = False
            link = Link(sock)
            try:
                welcome = await self._hello(link)
                unlinked_at = None
                self._on_linked(self.index, frozenset(welcome.live))
                self.link = link
                link.limit_sends(self._send_deadline)  # stopping already?
                self._answered_at = trio.current_time()
                self._set_responsive(True)
                log.info("linked to shard %d", self.index)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_asking, link)
                    await self._pump(link)
            except* (LinkClosed, wire.WireError, trio.TooSlowError) as group:
                cause = group.exceptions[0]
                log.warning("link to shard %d lost (%s); reconnecting", self.index, str(cause) or type(cause).__name__)
            finally:
                link.close()
                if self.link is link:
                    self.link = None
                    self._set_responsive(False)
                    unlinked_at = trio.current_time()
            await trio.sleep(RETRY_MIN_S)

    async def _hello(self, link: Link) -> wire.Welcome:
        await link.send(wire.Hello(wire.PROTOCOL_VERSION, self._router_id, self.index, self._shard_count, HASH_NAME))
        message = await receive_first(link, HELLO_TIMEOUT_S)
        if isinstance(message, wire.Refuse):
            raise ShardRefused(f"shard {self.index} refused this router: {message.reason}")
        if not isinstance(message, wire.Welcome) or message.shard_index != self.index:
            raise wire.WireError(f"expected welcome from shard {self.index}, got {message}")
        return message

    async def _pump(self, link: Link) -> None:
        while True:
            batch = await link.receive()
            for n, (message, fd) in enumerate(batch):
                if not isinstance(message, (wire.Ended, wire.Pong, wire.Adopt)) or (
                    isinstance(message, wire.Adopt) and fd is None
                ):
                    close_fds(batch[n:])
                    raise wire.WireError(f"unexpected {type(message).__name__} from shard {self.index}")
                if isinstance(message, wire.Ended):
                    self._on_ended(message)
                elif isinstance(message, wire.Pong):
                    self._answered_at = trio.current_time()
                    self.redis_up = message.redis_up
                    # An old answer read after our ping found the shard gone
                    # does not make it responsive again (`/health`).
                    self._set_responsive(link.can_send)
                elif isinstance(message, wire.Adopt) and fd is not None:
                    self._on_move(message, fd)  # owns fd from here

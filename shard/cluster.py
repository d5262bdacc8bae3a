"""A shard process's link to Redis (GARIN_REDIS_URL): the trio shell around
garin/shard/cluster_rooms.py.

Per shard process: one connection that subscribes and writes, driven on
trio with coredis's packer and parser (garin/shard/redis_link.py), and
coredis's client (on trio through anyio) for the heartbeats and scripts. One task writes: it takes what the members'
sessions queued, subscribes to the channels of rooms that got local
members (before their joins go out, so that the joins come back), sends
the batch without waiting for the last batch's replies (order kept: one connection, in order; replies checked as
they come, at most MAX_IN_FLIGHT batches unanswered),
and unsubscribes from rooms left empty. One task beats the heartbeat and
reaps dead instances once a second. One task reads the channels and fans
each event out to the local members, its frame encoded once. Another
closes the members whose join or message has waited past
GARIN_SHARD_HOLD_TIMEOUT (1013 `room unavailable`).

When the link breaks (any error, or an answer overdue): messages of the
batch in flight are lost (never sent twice), members whose join was in
flight are closed 1013, and the link is made again with backoff; then the
shard subscribes again, registers its members again (Redis may have
restarted empty; what it has that the shard no longer has is announced as
left) and sends what waited. Credentials come from the URL or
GARIN_REDIS_PASSWORD_FILE and are never logged.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

from garin import closes, metrics, protocol
from garin.closes import Close
from garin.config import Config
from garin.frames import text_frame
from garin.shard import redis_lua as lua
from garin.shard import redis_metrics
from garin.shard.cluster_rooms import ClusterRooms, JoinCommand, LeaveCommand, MessageCommand, channel, room_of
from garin.shard.redis_link import RedisLink, Reply, open_link
from garin.websocket import ClientWebSocket, fan_out

log = logging.getLogger("garin.shard")

HEARTBEAT_S = 1.0
HOLD_CHECK_S = 0.2
# Redis answers in well under a millisecond; an answer this late means the
# link (or Redis) is gone.
REPLY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# Commands per batch: large enough to carry a burst in one round trip.
BATCH = 1000
# Batches sent and not answered yet, at most; and how often the writer
# checks their replies while nothing new comes.
MAX_IN_FLIGHT = 64
REAP_EVERY_S = 0.05
# Redis answers a SUBSCRIBE after the events already on their way to this
# process: behind a backlog (bounded by Redis's client-output-buffer-limit
# pubsub) that takes a while.
SUBSCRIBE_TIMEOUT_S = 10.0
# While the link is up, a join or message is still given up after this long
# even with GARIN_SHARD_HOLD_TIMEOUT=0 (which means: do not wait for a link
# that is down).
UP_HOLD_FLOOR_S = 2.0
# Redis drops a subscriber whose output buffer reaches its
# client-output-buffer-limit pubsub (by default 32 MiB at once, or 8 MiB for
# 60 s): one message past that would cut every host's link for the room's
# shard processes, and be lost. A message whose text is larger than the
# default soft limit closes its sender 1009 instead (one host takes up to
# GARIN_MAX_MESSAGE_BYTES, at most 16 MiB).
MAX_MESSAGE_TEXT_BYTES = 8 * 1024 * 1024


def new_instance() -> str:
    """A name for this shard process in Redis: host, pid and a random part
    (a restarted process is a new instance)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class LinkDown(Exception):
    pass


@dataclass(slots=True)
class InFlight:
    """One batch sent to Redis, its replies not checked yet."""

    replies: list[Reply]  # in the order sent
    is_message: list[bool]
    sent_at: float

    def answered(self) -> bool:
        return self.replies[-1].done if self.replies else True


class ClusterNotSupported(RuntimeError):
    """GARIN_REDIS_URL names a Redis Cluster node: garin's scripts need every
    key in one Redis (README "Several hosts"). The shard stops (one line),
    so `garin run` gives up instead of retrying a setup that cannot work."""


class RedisRooms:
    """The rooms of one shard process, shared with other hosts through Redis."""

    def __init__(self, config: Config, shard_index: int) -> None:
        self.config = config
        self.index = shard_index
        self.label = str(shard_index)
        self.core: ClusterRooms[ClientWebSocket] = ClusterRooms(new_instance())
        self.up = False
        self._wake = trio.Event()
        self._stopping = False
        self._farewell_said = trio.Event()
        # The Redis "life" this instance registered in (redis_lua.REGISTER).
        self._epoch = ""
        # When the link last came up, and whether Redis was ever out of
        # reach before: see `_beat`.
        self._up_since = 0.0
        self._was_down = False
        self._warned_eviction = False
        # Batches sent on the writer's connection, replies not checked yet.
        self._in_flight: deque[InFlight] = deque()
        # The writer's connection and scripts while its task runs: `publish`
        # sends on it directly when nothing else waits.
        self._direct: tuple[RedisLink, dict[str, Any]] | None = None

    # -- what the shard's sessions do (never block) --------------------------------

    def join(self, key: int, room: str, username: str, sock: ClientWebSocket) -> None:
        self.core.join(key, room, username, sock, trio.current_time())
        self._wake.set()

    def publish(self, key: int, username: str, body: str) -> Close | None:
        """Queue `key`'s message; the close it deserves if it cannot be."""
        core = self.core
        text = protocol.message_text(username, body)
        if len(text) > MAX_MESSAGE_TEXT_BYTES:
            return closes.TOO_BIG_FRAME
        queued = core.publish(key, text, trio.current_time())
        direct = self._direct
        if (
            direct is not None and len(core.queue) == 1 and not core.rooms_changed and not self._stopping
            and len(self._in_flight) < MAX_IN_FLIGHT
        ):
            # Nothing else waits and no subscription is due: send it now,
            # in order on the writer's connection, rather than wake the
            # writer for it (a scheduler pass and more per message). The
            # writer still checks the replies.
            self._send(direct[0], direct[1], core.take(1))
            if len(self._in_flight) == 1:
                self._wake.set()
        else:
            self._wake.set()
        return None if queued else closes.SHARD_UNAVAILABLE

    def leave(self, key: int) -> None:
        self.core.leave(key, trio.current_time())
        self._wake.set()

    @property
    def member_count(self) -> int:
        return self.core.member_count

    @property
    def room_count(self) -> int:
        return len(self.core.local)

    async def say_farewell(self) -> None:
        """Stopping: send what waits (the members' leaves), then remove this
        instance from Redis. Bounded by the caller."""
        self._stopping = True
        self._wake.set()
        await self._farewell_said.wait()

    # -- the link --------------------------------------------------------------------

    async def run(self) -> None:
        redis_metrics.REDIS_UP.labels(shard=self.label).set(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._enforce_hold)
            backoff = BACKOFF_FIRST_S
            while True:
                try:
                    await self._connected()
                except* ClusterNotSupported:
                    raise
                except* Exception as group:
                    self._went_down(group.exceptions[0])
                if self._farewell_said.is_set():
                    return
                if self.up:
                    backoff = BACKOFF_FIRST_S
                self.up = False
                redis_metrics.REDIS_UP.labels(shard=self.label).set(0)
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _went_down(self, exc: BaseException) -> None:
        self._was_down = True
        for sock in self.core.link_lost():
            sock.kick(closes.SHARD_UNAVAILABLE)
        while isinstance(exc, BaseExceptionGroup):  # coredis's own task groups
            exc = exc.exceptions[0]
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, (
            coredis.exceptions.RedisError, OSError, trio.TooSlowError, LinkDown, TimeoutError,
            trio.BrokenResourceError, trio.ClosedResourceError,
        )):
            if self.up:
                log.warning("shard %d: Redis link down (%s); reconnecting", self.index, reason)
            else:
                log.info("shard %d: cannot reach Redis (%s); retrying", self.index, reason)
        else:
            log.error("shard %d: Redis link failed", self.index, exc_info=exc)

    def _client(self) -> coredis.Redis[bytes]:
        extra: dict[str, Any] = {}
        if self.config.redis_password_file:
            extra["password"] = Path(self.config.redis_password_file).read_text().strip()
        return coredis.Redis.from_url(
            self.config.redis_url,
            decode_responses=False,
            connect_timeout=CONNECT_TIMEOUT_S,
            stream_timeout=REPLY_TIMEOUT_S,
            retry_policy=NoRetryPolicy(),
            verify_version=False,
            **extra,
        )

    async def _connected(self) -> None:
        async with self._client() as client:
            with trio.fail_after(CONNECT_TIMEOUT_S + REPLY_TIMEOUT_S):
                await self._check_server(client)
                shas = {
                    name: await client.script_load(source)
                    for name, source in (
                        ("join", lua.JOIN), ("leave", lua.LEAVE), ("heartbeat", lua.HEARTBEAT),
                        ("reap", lua.REAP), ("register", lua.REGISTER), ("farewell", lua.FAREWELL),
                    )
                }
            # The subscription's and the writer's connection, our own.
            with trio.fail_after(CONNECT_TIMEOUT_S + REPLY_TIMEOUT_S):
                link = await open_link(client.connection_pool)
            try:
                subscribed: set[str] = set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.read, self._apply)
                    nursery.start_soon(link.write)
                    nursery.start_soon(self._keep_alive, link)
                    with trio.fail_after(REPLY_TIMEOUT_S):
                        await self._subscribe(link, subscribed)
                        await self._register(client, shas)
                    self.up = True
                    self._up_since = trio.current_time()
                    redis_metrics.REDIS_UP.labels(shard=self.label).set(1)
                    redis_metrics.REDIS_CONNECTS.inc()
                    log.info("shard %d: Redis link up as instance %s", self.index, self.core.instance)
                    nursery.start_soon(self._heartbeats, client, shas)
                    await self._write(link, shas, subscribed)
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(link.stream)

    async def _check_server(self, client: Any) -> None:
        """Refuse a Redis Cluster node; warn of a Redis that may evict keys."""
        try:
            info = await client.info("cluster")
            policy = (await client.info("memory")).get("maxmemory_policy", "noeviction")
        except coredis.exceptions.ResponseError:
            return  # INFO renamed or denied (some hosted Redis): nothing to tell
        if str(info.get("cluster_enabled", 0)) == "1":
            raise ClusterNotSupported(
                "GARIN_REDIS_URL names a Redis Cluster node; garin needs one Redis (or a primary with "
                "replicas), not a Cluster (README: Several hosts)"
            )
        if policy != "noeviction" and not self._warned_eviction:
            self._warned_eviction = True
            log.warning(
                "shard %d: Redis's maxmemory-policy is %s: it may evict a live host's heartbeat or a "
                "room's roster (garin needs noeviction)", self.index, policy,
            )

    async def _subscribe(self, link: RedisLink, subscribed: set[str]) -> None:
        wanted = self.core.wanted_rooms()
        new = [channel(room) for room in wanted - subscribed]
        if new:
            await link.subscribe(new)
            subscribed.update(wanted)

    def _unsubscribe(self, link: RedisLink, subscribed: set[str]) -> None:
        stale = subscribed - set(self.core.local)
        if stale:
            subscribed.difference_update(stale)
            link.unsubscribe([channel(room) for room in stale])

    async def _register(self, client: Any, shas: dict[str, Any]) -> None:
        args: list[str | int] = [self.core.instance, self._dead_after_ms, self._epoch, secrets.token_hex(8)]
        for key, room, username in self.core.registered():
            args += [key, room, username]
        epoch = await client.evalsha(shas["register"], args=args)
        if epoch == 0:
            await self._taken_for_dead(client, shas)
        else:
            self._epoch = epoch.decode()

    async def _taken_for_dead(self, client: Any, shas: dict[str, Any]) -> None:
        """The others removed this instance's members (it was silent past
        GARIN_REDIS_DEAD_AFTER): its members must reconnect, under a new name."""
        kicked = self.core.drop_all()
        for sock in kicked:
            sock.kick(closes.SHARD_UNAVAILABLE)
        old, self.core.instance = self.core.instance, new_instance()
        log.warning(
            "shard %d: the other hosts took instance %s for dead; closed its %d members (1013), now %s",
            self.index, old, len(kicked), self.core.instance,
        )
        epoch = await client.evalsha(shas["register"], args=[self.core.instance, self._dead_after_ms, "", secrets.token_hex(8)])
        self._epoch = epoch.decode()

    @property
    def _reap_grace_s(self) -> float:
        """Time for every other host to be back after an outage and beat."""
        return self.config.redis_dead_after_s + BACKOFF_MAX_S + HEARTBEAT_S

    @property
    def _dead_after_ms(self) -> int:
        return int(self.config.redis_dead_after_s * 1000)

    async def _write(self, link: RedisLink, shas: dict[str, Any], subscribed: set[str]) -> None:
        # The subscription's connection (RESP3 takes any command on a
        # subscribed connection; the pool's would be shared with the
        # heartbeats): commands go out in the order taken, and a PUBLISH's
        # reply and its echo to this process come back in one read. The
        # next batch goes out without waiting for the replies of the last
        # one (a reply wait per message cost more CPU than the PUBLISH
        # itself). Replies are checked as they come (`_reap`); at most
        # MAX_IN_FLIGHT batches wait for theirs.
        self._direct = link, shas
        try:
            await self._write_on(link, shas, subscribed)
        except BaseException:
            self._direct = None
            self._count_lost()
            raise
        finally:
            self._direct = None

    async def _write_on(self, link: RedisLink, shas: dict[str, Any], subscribed: set[str]) -> None:
        core = self.core
        while True:
            await self._reap(wait=len(self._in_flight) >= MAX_IN_FLIGHT)
            if not core.queue and not self._stopping:
                # Wake up now and then while replies are due, to check them.
                with trio.move_on_after(REAP_EVERY_S if self._in_flight else float("inf")):
                    await self._wake.wait()
                    self._wake = trio.Event()
                continue
            # Rooms that got their first local member are subscribed to
            # before their joins go out; rooms left empty are dropped after
            # their leaves (a shard process hears only its rooms).
            # Joins to further new rooms can come while a SUBSCRIBE is
            # answered: subscribe again until none came, then take the batch
            # with no checkpoint between (a join published before its room
            # is subscribed never comes back).
            rooms_changed = False
            while core.rooms_changed:
                rooms_changed, core.rooms_changed = True, False
                with trio.fail_after(SUBSCRIBE_TIMEOUT_S):
                    await self._subscribe(link, subscribed)
            batch = core.take(BATCH)
            redis_metrics.REDIS_QUEUE.labels(shard=self.label).set(len(core.queue))
            if batch:
                self._send(link, shas, batch)
            if rooms_changed:
                self._unsubscribe(link, subscribed)
            if self._stopping and not core.queue:
                with trio.fail_after(REPLY_TIMEOUT_S):
                    # The leaves first: the farewell removes what is left.
                    await self._reap(wait=True)
                    await link.request(b"EVALSHA", shas["farewell"], 0, core.instance)
                self._farewell_said.set()
                return

    async def _heartbeats(self, client: Any, shas: dict[str, Any]) -> None:
        """Its own task: a slow step of `_write` (a subscription answered
        behind a backlog) must not silence this process past
        GARIN_REDIS_DEAD_AFTER."""
        while True:
            with trio.fail_after(REPLY_TIMEOUT_S):
                await self._beat(client, shas)
            await trio.sleep(HEARTBEAT_S)

    async def _beat(self, client: Any, shas: dict[str, Any]) -> bool:
        alive = await client.evalsha(shas["heartbeat"], args=[self.core.instance, self._dead_after_ms])
        if alive == 0:
            await self._taken_for_dead(client, shas)
            return False
        if self._was_down and trio.current_time() - self._up_since < self._reap_grace_s:
            # Back from an outage: every heartbeat may have expired while
            # Redis was away (if it kept its keys), and the other hosts may
            # still be coming back (backoff). Reaping them now would close
            # all their members; a host that is really dead is reaped later.
            return True
        reaped = await client.evalsha(shas["reap"], args=[lua.REAP_EVERY_MS])
        if reaped:
            redis_metrics.REDIS_REAPED.inc(reaped)
            log.info("shard %d: removed the members of %d dead instance(s)", self.index, reaped)
        return True

    def _send(self, link: RedisLink, shas: dict[str, Any], batch: list[Any]) -> None:
        """Queue `batch` on the writer's own connection without waiting for
        its replies (they are checked by `_reap`): one connection, so Redis
        runs the commands in the order sent."""
        instance = self.core.instance
        commands: list[tuple[Any, ...]] = []
        is_message = []
        for command in batch:
            is_message.append(isinstance(command, MessageCommand))
            if is_message[-1]:
                commands.append((b"PUBLISH", channel(command.room), command.payload))
            else:
                keys = (lua.roster(command.room), lua.owned(instance))
                args: tuple[int | str, ...]
                if isinstance(command, JoinCommand):
                    sha, args = shas["join"], (command.key, command.room, command.username)
                else:
                    sha, args = shas["leave"], (command.key, command.username)
                commands.append((b"EVALSHA", sha, 2, *keys, channel(command.room), instance, *args))
        self._in_flight.append(InFlight(link.send(commands), is_message, trio.current_time()))

    async def _reap(self, wait: bool) -> None:
        """Check the replies of the batches sent, oldest first: an error, or
        a reply overdue (REPLY_TIMEOUT_S), breaks the link. With `wait`, wait
        for every reply (before the farewell); else take only those in."""
        in_flight = self._in_flight
        while in_flight:
            oldest = in_flight[0]
            if not wait and not oldest.answered():
                if trio.current_time() - oldest.sent_at > REPLY_TIMEOUT_S:
                    raise LinkDown(f"no reply from Redis in {REPLY_TIMEOUT_S:g} s")
                return
            for reply in oldest.replies:
                await reply.wait()  # raises what Redis answered with
            in_flight.popleft()
            redis_metrics.REDIS_ROUND_TRIP.observe(trio.current_time() - oldest.sent_at)

    def _count_lost(self) -> None:
        """The link broke: the messages not answered, or answered with an
        error, are lost (maybe delivered, never resent)."""
        lost = sum(
            1
            for batch in self._in_flight
            for reply, is_message in zip(batch.replies, batch.is_message)
            if is_message and (not reply.done or reply.error is not None)
        )
        self._in_flight.clear()
        if lost:
            redis_metrics.REDIS_LOST_MESSAGES.inc(lost)

    def _apply(self, channel_name: bytes, event: bytes) -> None:
        """One event from a room's channel: apply it, fan it out to the local members."""
        room = room_of(channel_name)
        if room is None:
            return
        core = self.core
        delivery = core.apply(room, event)
        if delivery is not None:
            fan_out(delivery.to.items(), text_frame(delivery.text), delivery.exclude)
            metrics.DELIVERIES.inc(len(delivery.to) - (delivery.exclude in delivery.to))
        if core.evicted:
            for sock in core.evicted:
                sock.kick(closes.SHARD_UNAVAILABLE)
            log.warning("shard %d: Redis removed %d of its members (taken for dead); closed them (1013)",
                        self.index, len(core.evicted))
            core.evicted.clear()

    async def _keep_alive(self, link: RedisLink) -> None:
        """A PING now and then on the subscription's connection, which
        otherwise only listens: a connection gone silent is a link down."""
        while True:
            await trio.sleep(HEARTBEAT_S * 2)
            with trio.fail_after(REPLY_TIMEOUT_S):
                await link.request(b"PING")

    async def _enforce_hold(self) -> None:
        hold = self.config.shard_hold_timeout_s
        while True:
            await trio.sleep(HOLD_CHECK_S)
            redis_metrics.REDIS_QUEUE.labels(shard=self.label).set(len(self.core.queue))
            late = self.core.held_too_long(trio.current_time(), hold if not self.up else max(hold, UP_HOLD_FLOOR_S))
            for sock in late:
                sock.kick(closes.SHARD_UNAVAILABLE)
            if late:
                log.info("shard %d: closed %d members held past %g s without Redis (1013)", self.index, len(late), hold)

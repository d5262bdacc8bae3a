"""One router's link to one shard: connect, hello, replay, then pump both ways.

Outgoing messages go to the link's `Outbox` (router/outbox.py, which decides
what is held, replayed and dropped). Whatever queued up during one trio
scheduler pass leaves in one non-blocking write from the pass's end (the
`Flusher` instrument of garin/batch_writer.py), so a busy link costs one
system call per batch and no task switch; only a write the kernel could not
take whole wakes the link's writer task. While the shard is unreachable the outbox holds
its events and the link retries every RETRY_MAX_S at most; when the hold runs
out, `on_unavailable(index)` lets the router close the shard's clients.
`on_down(index)` hears of every lost link at once, before the next event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from garin import wire
from garin.batch_writer import FlushedWriter, receive_into
from garin.routing import HASH_NAME
from router.outbox import LinkState, Outbox, Verdict

log = logging.getLogger("garin.router")

HELLO_TIMEOUT_S = 5.0
RETRY_MIN_S = 0.05
# A restarted shard is back within a second or so; retrying a Unix socket
# connect twice a second costs nothing and keeps the outage short.
RETRY_MAX_S = 0.5
RECEIVE_BYTES = 256 * 1024
# A shard that stops reading its link while connected (hung, stopped) is
# dropped past this much queued for it, as a shard drops a router past its
# own bound: the outage machinery then takes over (hold, 1013 to its clients).
MAX_LINK_QUEUE_BYTES = 64 * 1024 * 1024


class ShardRefused(Exception):
    """The shard will not serve this router: a configuration mismatch."""


class ShardLink(FlushedWriter):
    def __init__(
        self,
        index: int,
        path: Path,
        router_id: str,
        shard_count: int,
        dispatch: Callable[[wire.WireMessage], None],
        on_unavailable: Callable[[int], int],
        hold_bytes: int,
        hold_timeout_s: float,
        on_down: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.path = path
        self._router_id = router_id
        self._shard_count = shard_count
        self._dispatch = dispatch
        self._on_unavailable = on_unavailable
        self._on_down = on_down
        self.outbox = Outbox(hold_bytes, hold_timeout_s, trio.current_time())
        self.connected = False

    def send(self, message: wire.WireMessage) -> bool:
        """Queue (or hold) `message`; False if it was dropped because the shard
        is unavailable (the sender's client is being closed)."""
        verdict = self.outbox.add(message)
        if verdict is Verdict.QUEUED:
            self._schedule()
            # Only while the kernel refuses what is in flight (the shard is not
            # reading), and once.
            if (
                self.outbox.queued_bytes > MAX_LINK_QUEUE_BYTES and self._tail is not None
                and self._sock is not None and self._error is None
            ):
                self._overflow(trio.BrokenResourceError(f"shard {self.index} is not reading its link"))
            return True
        if verdict is Verdict.OVERFLOW:
            self._give_up(f"more than {self.outbox.max_hold_bytes} bytes held for it")
        return False

    @property
    def queued(self) -> int:
        return self.outbox.queued_bytes

    def _give_up(self, why: str) -> None:
        closing = self._on_unavailable(self.index)
        log.warning(
            "shard %d unreachable, %s: closing its %d clients with 1013 room unavailable "
            "and refusing joins to its rooms until it is back",
            self.index, why, closing,
        )

    def _check_hold(self) -> None:
        if self.outbox.expire(trio.current_time()):
            self._give_up(f"down for {self.outbox.hold_timeout_s:g} s")

    async def _pause(self, seconds: float) -> None:
        """Sleep before the next connection attempt, waking for the hold's deadline."""
        until = trio.current_time() + seconds
        deadline = self.outbox.deadline
        await trio.sleep_until(until if deadline is None else min(until, deadline))
        self._check_hold()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up forever; `started` once the first hello succeeds."""
        delay = RETRY_MIN_S
        started = False
        announced_down = False
        while True:
            self._check_hold()
            try:
                stream = await trio.open_unix_socket(str(self.path))
            except OSError as exc:
                if not announced_down:
                    log.info("shard %d not reachable at %s (%s); retrying", self.index, self.path, exc.strerror)
                    announced_down = True
                await self._pause(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            announced_down = False
            try:
                async with stream:
                    await self._handshake(stream)
                    self.connected = True
                    log.info("linked to shard %d", self.index)
                    if not started:
                        started = True
                        task_status.started()
                    await self._pump(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, wire.WireError, OSError) as group:
                error, self._error = self._error or group.exceptions[0], None
                log.warning("link to shard %d lost (%s); reconnecting", self.index, str(error) or type(error).__name__)
            finally:
                self.connected = False
                # After the writer task's end (which marks a partly written
                # batch sent) and before link_down (which queues a batch the
                # socket refused whole again): Router._link_down counts on it.
                if self._on_down is not None:
                    self._on_down(self.index)
            if self.outbox.state is LinkState.UP and self.outbox.link_down(trio.current_time()):
                self._give_up(f"more than {self.outbox.max_hold_bytes} bytes held for it")
            await self._pause(RETRY_MIN_S)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        hello = wire.Hello(wire.PROTOCOL_VERSION, self._router_id, self.index, self._shard_count, HASH_NAME)
        await stream.send_all(wire.encode(hello))
        decoder = wire.Decoder()
        with trio.fail_after(HELLO_TIMEOUT_S):
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise trio.BrokenResourceError("shard closed during hello")
                for message in decoder.feed(data):
                    if isinstance(message, wire.Refuse):
                        raise ShardRefused(f"shard {self.index} refused this router: {message.reason}")
                    if not isinstance(message, wire.Welcome) or message.shard_index != self.index:
                        raise wire.WireError(f"expected welcome from shard {self.index}, got {message}")
                    self._decoder = decoder
                    # Replayed members go before anything held while down.
                    self.outbox.link_up()
                    return

    async def _pump(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, stream.socket)
            decoder = self._decoder
            dispatch = self._dispatch
            sock = stream.socket
            buffer = bytearray(RECEIVE_BYTES)
            while True:
                data = await receive_into(sock, buffer)
                if not data:
                    raise trio.BrokenResourceError("shard closed the link")
                for message in decoder.feed(data):
                    try:
                        dispatch(message)
                    except Exception:
                        # A bug in fan-out must not take the link, and with
                        # it every room of this shard, down.
                        log.exception("shard %d: failed to deliver %s", self.index, type(message).__name__)

    def _take(self) -> bytearray | None:
        return self.outbox.take()

    def _sent(self) -> None:
        self.outbox.sent()

    async def _write(self, sock: trio.socket.SocketType) -> None:
        """The link's writer task: finish batches the kernel could not take at
        once; raise when a write fails."""
        self._tail, self.partly_sent, self._error = None, False, None
        self._sock, self._fd = sock, sock.fileno()
        self._schedule()  # the replay and anything held while down
        try:
            await self._drain()
        finally:
            if self.partly_sent:
                # Part of the batch reached the shard: it counts as sent.
                self.outbox.sent()
            self._sock, self._fd = None, -1
            self._tail = None
            self.partly_sent = False

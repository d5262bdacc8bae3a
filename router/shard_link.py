"""One router's link to one shard: connect, hello, replay, then pump both ways.

Outgoing messages are encoded at once. While the link is up they go to a
`BatchWriter`, which writes everything queued in one scheduler pass with one
system call at the end of the pass, so a busy link costs one system call per
batch rather than one per message, and no task switch. While the shard is
unreachable they queue here and the link retries; when it is back, the
router's members of that shard's rooms are replayed first (so counts stay
right), then the queue flows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from garin import wire
from garin.batch_writer import BatchWriter, receive_into
from garin.routing import HASH_NAME

log = logging.getLogger("garin.router")

HELLO_TIMEOUT_S = 5.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
RECEIVE_BYTES = 256 * 1024


class ShardRefused(Exception):
    """The shard will not serve this router: a configuration mismatch."""


class ShardLink:
    def __init__(
        self,
        index: int,
        path: Path,
        router_id: str,
        shard_count: int,
        dispatch: Callable[[wire.WireMessage], None],
        replay: Callable[[int], Iterable[wire.WireMessage]],
    ) -> None:
        self.index = index
        self.path = path
        self._router_id = router_id
        self._shard_count = shard_count
        self._dispatch = dispatch
        self._replay = replay
        # Messages waiting for the link to come up.
        self._queue: list[bytes] = []
        self._writer: BatchWriter | None = None
        self.connected = False

    def send(self, message: wire.WireMessage) -> None:
        if self._writer is not None:
            self._writer.send(wire.encode(message))
        else:
            self._queue.append(wire.encode(message))

    @property
    def queued(self) -> int:
        """Messages (while down) or bytes (while up) not yet handed to the kernel."""
        return len(self._queue) + (self._writer.queued if self._writer is not None else 0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up forever; `started` once the first hello succeeds."""
        delay = RETRY_MIN_S
        started = False
        announced_down = False
        while True:
            try:
                stream = await trio.open_unix_socket(str(self.path))
            except OSError as exc:
                if not announced_down:
                    log.info("shard %d not reachable at %s (%s); retrying", self.index, self.path, exc.strerror)
                    announced_down = True
                await trio.sleep(delay)
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
                exc = group.exceptions[0]
                log.warning("link to shard %d lost (%s); reconnecting", self.index, exc or type(exc).__name__)
            finally:
                self.connected = False
            await trio.sleep(RETRY_MIN_S)

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
                    return

    async def _pump(self, stream: trio.SocketStream) -> None:
        writer = BatchWriter(stream.socket)
        # Replayed members go before anything queued while down.
        for message in self._replay(self.index):
            writer.send(wire.encode(message))
        for data in self._queue:
            writer.send(data)
        self._queue.clear()
        self._writer = writer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                decoder = self._decoder
                dispatch = self._dispatch
                sock = stream.socket
                buffer = bytearray(RECEIVE_BYTES)
                while True:
                    data = await receive_into(sock, buffer)
                    if not data:
                        raise trio.BrokenResourceError("shard closed the link")
                    for message in decoder.feed(data):
                        dispatch(message)
        finally:
            self._writer = None
            writer.close()

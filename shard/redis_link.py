"""A shard process's own connection to Redis, for its subscription and its
writes: driven straight on a trio stream, with coredis's packer and parser.

coredis's connection runs a reader and a writer task of its own (anyio on
trio) and passes every reply and push through anyio memory streams, a
cancel scope and a limiter: 4-5 scheduler passes per command, about 150 µs
of CPU per message received and as much per message published, more than
the fan-out to 25 members (docs/performance.md). Here one task reads the
socket and handles everything a read brought: pushes (the channels'
events, SUBSCRIBE's acknowledgements) go to the caller at once, replies
complete the oldest command that waits for one (Redis answers in order).
On a plain socket (TCP or Unix, not TLS) a command is written by the
caller itself when nothing else waits to go out, and reads wait for the
socket to be readable before reading, as the members' WebSockets do
(garin/websocket.py): trio's socket stream tries a read first (at chat
rates nearly always EAGAIN) and adds a scheduler pass per call. What does
not go out at once is written by one writer task, in order. The wire format stays coredis's (its Packer and its compiled
Parser); what is here is the I/O around them, the connect (TCP, Unix
socket, TLS) and the HELLO/AUTH/SELECT handshake, from the settings
coredis parsed from GARIN_REDIS_URL. The heartbeats and script loading
keep using coredis's client and pool.

Nothing read is queued here: a shard that cannot keep up leaves the events
in its socket and in Redis's output buffer for it, where Redis's own guard
(`client-output-buffer-limit pubsub`) drops a subscriber too far behind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, cast

import os

import trio
from coredis._packer import Packer
from coredis.connection import UnixDomainSocketLocation
from coredis.constants.resp import DataType
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError
from coredis.parser import NotEnoughData, Parser

READ_SIZE = 1 << 16
# Pushes handled per read before the reader lets other tasks (the members'
# sessions) run: a burst does not hold up the whole process.
DRAIN = 64
PUSH = DataType.PUSH


class Reply:
    """The reply to one command sent: `done` once it came; `error` when
    Redis answered with one."""

    __slots__ = ("done", "value", "error", "_event")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: RedisError | None = None
        self._event: trio.Event | None = None

    def _complete(self, value: Any) -> None:
        self.done = True
        if isinstance(value, RedisError):
            self.error = value
        else:
            self.value = value
        if self._event is not None:
            self._event.set()

    async def wait(self) -> Any:
        """The value once it came (the caller bounds the wait); raises the
        error Redis answered with."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class RedisLink:
    """One connection: `run` it (reader and writer) in a nursery, then
    `send`, `request`, `subscribe`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # The socket's descriptor, read and written directly; None for TLS.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._pack = Packer("utf-8").pack_command
        self._parser = Parser()
        self._out: list[bytes] = []
        self._writer_idle: trio.Event | None = None
        self._replies: deque[Reply] = deque()
        # Channels whose SUBSCRIBE is not acknowledged yet.
        self._subscribing: dict[bytes, trio.Event] = {}

    # -- commands (never block) -------------------------------------------------------

    def send(self, commands: list[tuple[Any, ...]]) -> list[Reply]:
        """Queue `commands` (each a tuple: name, *args) in order; their replies."""
        replies = []
        chunks: list[bytes] = []
        for command in commands:
            chunks.extend(self._pack(*command))
            reply = Reply()
            self._replies.append(reply)
            replies.append(reply)
        self._queue(chunks)
        return replies

    async def request(self, *command: Any) -> Any:
        """Send one command and wait for its reply (the caller bounds the wait)."""
        return await self.send([command])[0].wait()

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe and wait until Redis has acknowledged every channel (the
        reader must be running): from then on, what is published there
        comes here. Bounded by the caller."""
        events = [self._subscribing.setdefault(name.encode(), trio.Event()) for name in channels]
        self._queue(self._pack(b"SUBSCRIBE", *channels))  # answered by pushes
        for event in events:
            await event.wait()

    def unsubscribe(self, channels: list[str]) -> None:
        """Stop hearing `channels` (events already on their way still come:
        the caller ignores what no local member hears)."""
        self._queue(self._pack(b"UNSUBSCRIBE", *channels))

    def _queue(self, chunks: list[bytes]) -> None:
        """Write `chunks` after everything queued before them: now, if the
        writer waits with nothing queued and the socket takes them all; else
        through the writer."""
        idle = self._writer_idle
        if idle is None or idle.is_set():
            self._out.extend(chunks)  # the writer runs or is about to: it takes them
            return
        data = b"".join(chunks)
        if self._fd is not None:
            try:
                written = os.write(self._fd, data)
            except OSError:  # would block, or broken: the writer tries (and raises)
                written = 0
            if written == len(data):
                return
            data = data[written:]
        self._out.append(data)
        idle.set()

    # -- the tasks ----------------------------------------------------------------------

    async def write(self) -> None:
        """Write what was queued, in order, until cancelled or the stream breaks."""
        while True:
            if not self._out:
                self._writer_idle = trio.Event()
                await self._writer_idle.wait()
                self._writer_idle = None
            data = b"".join(self._out)
            self._out.clear()
            if self._fd is None:
                await self.stream.send_all(data)
                continue
            while True:
                try:
                    data = data[os.write(self._fd, data):]
                except BlockingIOError:
                    pass
                if not data:
                    break
                await trio.lowlevel.wait_writable(self._fd)

    async def read(self, on_event: Callable[[bytes, bytes], None]) -> None:
        """Call `on_event(channel, data)` for each published event, in the
        order Redis sent them, and complete the replies. Raises coredis's
        ConnectionError when Redis closes the connection."""
        parser = self._parser
        receive = self._receive
        replies = self._replies
        subscribing = self._subscribing
        while True:
            data = await receive()
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            parser.feed(cast(bytes, data))  # a bytearray from TLS: BytesIO takes it
            handled = 0
            while True:
                response = parser.parse(False, None)
                if isinstance(response, NotEnoughData):
                    break
                kind = response[0]
                value: Any = response[1]
                if kind == PUSH:
                    what = value[0]
                    if what == b"message":
                        on_event(value[1], value[2])
                    elif what == b"subscribe":
                        event = subscribing.pop(value[1], None)
                        if event is not None:
                            event.set()
                elif replies:
                    replies.popleft()._complete(value)
                else:
                    raise RedisConnectionError(f"a reply with no command waiting for it ({kind!r})")
                handled += 1
                if handled == DRAIN:
                    handled = 0
                    await trio.lowlevel.checkpoint()

    async def _receive(self) -> bytes | bytearray:
        if self._fd is None:
            try:
                return await self.stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError as exc:  # TLS: Redis gone without a close_notify
                raise RedisConnectionError("Redis closed the connection") from exc
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                return os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                continue

    # -- connecting -------------------------------------------------------------------------

    async def _handshake(self, username: str | None, password: str | None, db: int | None) -> None:
        """HELLO 3 (with AUTH when a user or password is set), then SELECT;
        before the reader runs. Raises what Redis answered with."""
        hello: list[Any] = [b"HELLO", 3]
        if username or password:
            hello += [b"AUTH", username or "default", password or b""]
        commands = [tuple(hello)]
        if db:
            commands.append((b"SELECT", db))
        for command in commands:
            await self.stream.send_all(b"".join(self._pack(*command)))
            while isinstance(response := self._parser.parse(False, None), NotEnoughData):
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    raise RedisConnectionError("Redis closed the connection during the handshake")
                self._parser.feed(cast(bytes, data))
            if isinstance(response[1], RedisError):
                raise response[1]


async def open_link(pool: Any) -> RedisLink:
    """Connect to where coredis's `pool` connects (its URL's host and port or
    Unix socket, TLS context, user, password, database) and say hello.
    Bounded by the caller."""
    settings = pool.connection_kwargs
    location = pool.location
    stream: trio.abc.Stream
    if isinstance(location, UnixDomainSocketLocation):
        stream = await trio.open_unix_socket(location.path)
    else:
        stream = await trio.open_tcp_stream(location.host, location.port)
        context = settings.get("ssl_context")
        if context is not None:
            stream = trio.SSLStream(stream, context, server_hostname=location.host)
    try:
        if isinstance(stream, trio.SSLStream):
            await stream.do_handshake()
        link = RedisLink(stream)
        await link._handshake(settings.get("username"), settings.get("password"), settings.get("db"))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return link

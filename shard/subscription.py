"""A shard process's subscription to its rooms' channels, read straight
from coredis's connection.

coredis's PubSub hands each event through a task of its own, builds a
message dict for it and queues it on a second anyio memory stream, and
`get_message` opens a cancel scope per event: several trio task switches
per event, most of a receiving shard's CPU beside the fan-out writes
(docs/performance.md). Here the shard's reader takes the pushes straight
from the connection's buffer (coredis parses them there) and takes all it
has parsed already at each wake-up, up to DRAIN events: a burst costs one
wake-up, and the frames of several events to one member go out in one
write (fan_out's pass batching). SUBSCRIBE and UNSUBSCRIBE are coredis's
`send_command`; their acknowledgements come back as pushes, in order with
the events, and are matched here.

coredis 6 has no public call that takes a push without waiting (its
`push_messages` generator waits, a scheduler pass, for every item): this
reads the connection's `_push_message_buffer_out` (an anyio memory
stream), checked when the link comes up (`Subscription.__init__`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import trio
from anyio.streams.memory import MemoryObjectReceiveStream
from coredis.exceptions import ConnectionError as RedisConnectionError

# Events taken per wake-up at most: then the reader yields (other tasks,
# the members' sessions, run) and checks how far behind it is.
DRAIN = 64


class Subscription:
    """The channels one coredis connection is subscribed to."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        pushes = getattr(connection, "_push_message_buffer_out", None)
        if not isinstance(pushes, MemoryObjectReceiveStream):
            raise RuntimeError("this coredis has no push buffer on its connections (garin needs coredis 6)")
        self._pushes: MemoryObjectReceiveStream[Any] = pushes
        # Channels whose SUBSCRIBE is not acknowledged yet.
        self._waiting: dict[bytes, trio.Event] = {}

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe and wait until Redis has acknowledged every channel (the
        reader must be running): from then on, what is published there
        comes here. Bounded by the caller."""
        events = [self._waiting.setdefault(name.encode(), trio.Event()) for name in channels]
        self._connection.send_command(b"SUBSCRIBE", *channels)
        for event in events:
            await event.wait()

    def unsubscribe(self, channels: list[str]) -> None:
        """Stop hearing `channels` (events already on their way still come:
        the caller ignores what no local member hears)."""
        self._connection.send_command(b"UNSUBSCRIBE", *channels)

    @property
    def backlog(self) -> int:
        """Events coredis has parsed and not handed over yet."""
        return int(self._pushes.statistics().current_buffer_used)

    async def read(self, on_event: Callable[[bytes, bytes], None], on_behind: Callable[[int], None]) -> None:
        """Call `on_event(channel, data)` for each published event, in the
        order Redis sent them; `on_behind(backlog)` when a wake-up found
        DRAIN events or more waiting. Raises coredis's ConnectionError when
        the connection closes."""
        pushes = self._pushes
        receive_nowait = pushes.receive_nowait
        waiting = self._waiting
        while True:
            try:
                push = await pushes.receive()
                taken = 1
                while True:
                    kind = push[0]
                    if kind == b"message":
                        on_event(push[1], push[2])
                    elif kind == b"subscribe":
                        event = waiting.pop(push[1], None)
                        if event is not None:
                            event.set()
                    if taken == DRAIN:
                        on_behind(self.backlog)
                        break
                    try:
                        push = receive_nowait()
                    except anyio.WouldBlock:
                        break
                    taken += 1
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                raise RedisConnectionError("Connection lost while waiting for push messages") from exc

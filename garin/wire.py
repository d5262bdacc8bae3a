"""The router <-> shard protocol: msgpack arrays over a Unix stream socket.

Every message is one msgpack array `[tag, field, ...]`. The first message on a
link is the router's `Hello`; the shard answers `Welcome` or `Refuse` (then
closes). After that the link carries connections, not chat traffic:

- `Adopt` (router -> shard): a client that has authenticated and joined a
  room of this shard. The client's socket travels with it as ancillary data
  (SCM_RIGHTS, garin/link.py), one socket per `Adopt`, in order.
- `Adopt` (shard -> router): a member left its room and joined one of another
  shard; the router passes it on to that shard as it would a new client.
- `Ended` (shard -> router): a connection the router handed over is gone, so
  the router can release what its connection limits counted for it.
  `Welcome` lists the ones still there, for a router that was unlinked a while.
- `Ping` / `Pong`: the router asks every second whether the shard is
  reading; one that does not answer is not handed new clients. The answer
  says whether the shard's Redis link is up (for /health).

This is the only module that touches msgpack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar

import msgpack

# 4: connections live in their room's shard (Adopt, Ended); no chat traffic.
# 5: Pong says whether the shard's Redis link is up.
# 6: Welcome lists the connections the shard holds for the router.
# 7: the frame parser's snapshot counts a message under way in bytes only.
PROTOCOL_VERSION = 7
# One message is at most a session's state plus what the client sent that was
# not handled yet: the rest of one read (64 KiB) and the part received of one
# unfinished message, at most GARIN_MAX_MESSAGE_BYTES (16 MiB). Anything
# larger means a corrupt or hostile peer.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024 + 1024 * 1024


class WireError(Exception):
    """The peer sent something that is not a valid message: drop the link."""


@dataclass(frozen=True, slots=True)
class Hello:
    """Router -> shard, first on a link."""

    TAG: ClassVar[int] = 0
    version: int
    router_id: str
    shard_index: int
    shard_count: int
    hash_name: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """Shard -> router, the answer to `Hello`. `live`: the ids of the
    connections this shard holds that the router counts (their `Adopt.owner`
    is the hello's `router_id`). A link can drop while the shard lives on;
    the router then keeps counting these and forgets the rest."""

    TAG: ClassVar[int] = 10
    version: int
    shard_index: int
    live: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(type(conn) is int for conn in self.live):
            raise WireError(f"Welcome.live holds something other than connection ids: {self.live!r:.80}")


@dataclass(frozen=True, slots=True)
class Refuse:
    TAG: ClassVar[int] = 11
    reason: str


@dataclass(frozen=True, slots=True)
class Adopt:
    """A connection changes process; its socket is the next one on the link.

    `conn` is the id the owning router gave it (logs, `Ended`), `owner` that
    router's instance name: the process whose connection limits count it.
    `session` and `frames` are `Session.snapshot()` and
    `FrameParser.snapshot()` (checked by their `restore`), with times relative
    to `sent_at`, the sender's CLOCK_MONOTONIC reading."""

    TAG: ClassVar[int] = 1
    conn: int
    owner: str
    peer: str
    subject: str | None
    claimed_name: str | None
    room: str
    username: str
    session: tuple[Any, ...]
    frames: tuple[Any, ...]
    sent_at: float


@dataclass(frozen=True, slots=True)
class Ended:
    """Shard -> owning router: connection `conn` is closed (or its shard
    passed it on through another router). `rate_limited`: it was closed for
    the rate limit, a strike against its token subject."""

    TAG: ClassVar[int] = 12
    conn: int
    rate_limited: bool


@dataclass(frozen=True, slots=True)
class Ping:
    """Router -> shard, every second: are you reading? (A stopped shard keeps
    its sockets open: only an unanswered ping shows it is not serving.)"""

    TAG: ClassVar[int] = 2
    no: int


@dataclass(frozen=True, slots=True)
class Pong:
    """`redis_up`: the shard's Redis link is up (always true without Redis)."""

    TAG: ClassVar[int] = 13
    no: int
    redis_up: bool


WireMessage = Hello | Welcome | Refuse | Adopt | Ended | Ping | Pong

_STR_OR_NONE = (str, type(None))
# Accepted Python types per field, in order (msgpack gives tuples for arrays).
_FIELD_TYPES: dict[int, tuple[type, tuple[tuple[type, ...], ...]]] = {
    Hello.TAG: (Hello, ((int,), (str,), (int,), (int,), (str,))),
    Welcome.TAG: (Welcome, ((int,), (int,), (tuple,))),
    Refuse.TAG: (Refuse, ((str,),)),
    Adopt.TAG: (
        Adopt,
        ((int,), (str,), (str,), _STR_OR_NONE, _STR_OR_NONE, (str,), (str,), (tuple,), (tuple,), (float,)),
    ),
    Ended.TAG: (Ended, ((int,), (bool,))),
    Ping.TAG: (Ping, ((int,),)),
    Pong.TAG: (Pong, ((int,), (bool,))),
}


def _array_maker(cls: Any) -> Callable[[Any], tuple[Any, ...]]:
    # dataclasses.astuple deep-copies every field: a getter is cheaper.
    tag = cls.TAG
    getter = attrgetter(*[f.name for f in fields(cls)])
    if len(fields(cls)) == 1:
        return lambda m: (tag, getter(m))
    return lambda m: (tag, *getter(m))


_AS_ARRAY: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    cls: _array_maker(cls) for cls, _ in _FIELD_TYPES.values()
}
_pack = msgpack.Packer(use_bin_type=True).pack


def encode(message: WireMessage) -> bytes:
    data: bytes = _pack(_AS_ARRAY[type(message)](message))
    return data


def _build(item: Any) -> WireMessage:
    if not isinstance(item, tuple) or not item:
        raise WireError(f"expected a non-empty array, got {item!r:.80}")
    tag, *values = item
    spec = _FIELD_TYPES.get(tag) if type(tag) is int else None
    if spec is None:
        raise WireError(f"unknown message tag {tag!r:.40}")
    cls, types = spec
    if len(values) != len(types) or not all(type(v) in t for v, t in zip(values, types)):
        raise WireError(f"bad fields for {cls.__name__}: {values!r:.120}")
    return cls(*values)  # type: ignore[no-any-return]


class Decoder:
    """Feed bytes as they arrive; iterate the complete messages."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False, use_list=False, max_buffer_size=MAX_MESSAGE_BYTES * 2
        )

    def feed(self, data: bytes | memoryview) -> Iterator[WireMessage]:
        try:
            self._unpacker.feed(data)
            for item in self._unpacker:
                yield _build(item)
        except WireError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types
            raise WireError(f"undecodable data: {exc}") from exc

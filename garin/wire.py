"""The router <-> shard protocol: msgpack arrays over a Unix stream socket.

Every message is one msgpack array `[tag, field, ...]`. The first message on a
link is the router's `Hello`; the shard answers `Welcome` or `Refuse` (then
closes). The router then replays the members it has on that shard (`Rejoin`,
needed after a shard restart) and sends `Replayed`; everything after that is
new. Member ids are chosen by the router and unique only within it; a shard
keys members by (link, member). Texts sent to clients are built once by the
shard as UTF-8 bytes and travel as msgpack `bin`, so a router turns them into
WebSocket frames without decoding them.

This is the only module that touches msgpack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar

import msgpack

# 2: Replayed. 3: solo rooms (Joined.solo, Revoke, Released, Offer, Accept, SoloFrom).
PROTOCOL_VERSION = 3
# One message is at most a client text plus small fields; anything far larger
# means a corrupt or hostile peer.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class WireError(Exception):
    """The peer sent something that is not a valid message: drop the link."""


# --- router -> shard -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    TAG: ClassVar[int] = 0
    version: int
    router_id: str
    shard_index: int
    shard_count: int
    hash_name: str


@dataclass(frozen=True, slots=True)
class Join:
    """A member joins a room; the room hears about it (`Joined` / `Deliver`)."""

    TAG: ClassVar[int] = 1
    member: int
    room: str
    username: str


@dataclass(frozen=True, slots=True)
class Rejoin:
    """Replay of a member after the link came back: no announcement."""

    TAG: ClassVar[int] = 2
    member: int
    room: str
    username: str


@dataclass(frozen=True, slots=True)
class Publish:
    TAG: ClassVar[int] = 3
    member: int
    body: str


@dataclass(frozen=True, slots=True)
class Leave:
    TAG: ClassVar[int] = 4
    member: int


@dataclass(frozen=True, slots=True)
class Replayed:
    """The router has re-sent (`Rejoin`) every member it has on this shard.

    A shard that has just started applies no other event until every router
    has replayed (or a grace period has passed), so a join's totalUsers and a
    held message's recipients include the members of every router."""

    TAG: ClassVar[int] = 5


@dataclass(frozen=True, slots=True)
class Released:
    """Answer to `Revoke` number `no`: this router has stopped fanning `room`
    out itself; its messages to the room come as `Publish` from here on. (The
    number lets a shard ignore an answer replayed after a relink.)"""

    TAG: ClassVar[int] = 6
    room: str
    no: int


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer to `Offer` number `no`: the shard makes `room` solo if it still
    can, and says so with `SoloFrom` after everything this router sent before."""

    TAG: ClassVar[int] = 7
    room: str
    no: int


# --- shard -> router -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    TAG: ClassVar[int] = 10
    version: int
    shard_index: int


@dataclass(frozen=True, slots=True)
class Refuse:
    TAG: ClassVar[int] = 11
    reason: str


@dataclass(frozen=True, slots=True)
class Joined:
    """`member` (on the receiving router) is now in `room`; send `text` to all
    the router's members of the room, the joiner included.

    `solo`: every member the shard had announced to the room is on the
    receiving router, and no other router's join will be announced before the
    router answers a `Revoke`; it may fan its members' messages out itself
    instead of sending `Publish`."""

    TAG: ClassVar[int] = 12
    room: str
    member: int
    text: bytes
    solo: bool = False


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send `text` to the router's members of `room`, except `exclude` (-1: none)."""

    TAG: ClassVar[int] = 13
    room: str
    exclude: int
    text: bytes


@dataclass(frozen=True, slots=True)
class Revoke:
    """A member of another router is joining solo `room` (or was replayed
    into it): stop fanning it out locally and answer `Released(room, no)`.
    The shard holds such joins until then."""

    TAG: ClassVar[int] = 14
    room: str
    no: int


@dataclass(frozen=True, slots=True)
class Offer:
    """Every member of `room` is on the receiving router now (others left, or
    the room was rebuilt by replays): answer `Accept(room, no)` to make it solo."""

    TAG: ClassVar[int] = 15
    room: str
    no: int


@dataclass(frozen=True, slots=True)
class SoloFrom:
    """`room` is solo for the receiving router from here on (as `Joined.solo`):
    every message its members sent before its `Accept` has come back already."""

    TAG: ClassVar[int] = 16
    room: str
    no: int


WireMessage = (
    Hello | Join | Rejoin | Publish | Leave | Replayed | Released | Accept
    | Welcome | Refuse | Joined | Deliver | Revoke | Offer | SoloFrom
)

_FIELD_TYPES: dict[int, tuple[type, tuple[type, ...]]] = {
    Hello.TAG: (Hello, (int, str, int, int, str)),
    Join.TAG: (Join, (int, str, str)),
    Rejoin.TAG: (Rejoin, (int, str, str)),
    Publish.TAG: (Publish, (int, str)),
    Leave.TAG: (Leave, (int,)),
    Replayed.TAG: (Replayed, ()),
    Released.TAG: (Released, (str, int)),
    Accept.TAG: (Accept, (str, int)),
    Welcome.TAG: (Welcome, (int, int)),
    Refuse.TAG: (Refuse, (str,)),
    Joined.TAG: (Joined, (str, int, bytes, bool)),
    Deliver.TAG: (Deliver, (str, int, bytes)),
    Revoke.TAG: (Revoke, (str, int)),
    Offer.TAG: (Offer, (str, int)),
    SoloFrom.TAG: (SoloFrom, (str, int)),
}


# Per class, a function returning (TAG, field, ...): dataclasses.astuple deep-
# copies every field and costs more than the packing itself.
def _array_maker(cls: Any) -> Callable[[Any], tuple[Any, ...]]:
    tag = cls.TAG
    names = [f.name for f in fields(cls)]
    if not names:
        return lambda m: (tag,)
    getter = attrgetter(*names)
    if len(names) == 1:
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
    if tuple(map(type, values)) != types:
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

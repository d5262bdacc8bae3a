"""garin.wire: the router <-> shard msgpack messages and the streaming decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import wire
from garin.wire import (
    Accept,
    Decoder,
    Deliver,
    Hello,
    Join,
    Joined,
    Leave,
    Offer,
    Publish,
    Refuse,
    Rejoin,
    Released,
    Replayed,
    Revoke,
    SoloFrom,
    Welcome,
    WireError,
    encode,
)

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)

SAMPLES: list[wire.WireMessage] = [
    Hello(wire.PROTOCOL_VERSION, "router-0", 0, 4, "crc32"),
    Hello(7, "", 255, 256, ""),
    Hello(1, "r-日本", 3, 4, "crc32"),
    Join(1, "lobby", "alice"),
    Join(0, "", ""),
    Join(I64_MAX, "ルーム", "zoë 😀"),
    Join(-1, "lobby", "alice"),
    Rejoin(2, "lobby", "bob"),
    Rejoin(I64_MIN, "r", "u"),
    Publish(1, "hello"),
    Publish(1, ""),
    Publish(3, "x" * 100_000),
    Publish(4, "日本語 \x00 \n 😀"),
    Leave(1),
    Leave(0),
    Leave(2**64 - 1),
    Replayed(),
    Welcome(1, 0),
    Welcome(1, 255),
    Refuse("shard count mismatch: router has 4, shard has 8"),
    Refuse(""),
    Joined("lobby", 1, b'{"type":"join","username":"alice","totalUsers":1}'),
    Joined("lobby", 0, b""),
    Deliver("lobby", -1, b'{"type":"message","username":"a","body":"hi"}'),
    Deliver("lobby", 5, "日本語".encode()),
    # Texts are opaque bytes: they travel as bin, never decoded.
    Deliver("lobby", -1, b"\xff\xfe\x00not utf-8"),
    Joined("r", 2, bytes(range(256))),
    Joined("lobby", 1, b"t", True),
    Revoke("lobby", 1),
    Revoke("", 0),
    Released("ルーム", 2**40),
    Offer("lobby", 3),
    Accept("lobby", 3),
    SoloFrom("lobby", 3),
]


def decode_all(data: bytes) -> list[wire.WireMessage]:
    return list(Decoder().feed(data))


def raw(*item: Any) -> bytes:
    return msgpack.packb(list(item), use_bin_type=True)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(message: wire.WireMessage) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    [decoded] = decode_all(data)
    assert decoded == message
    assert type(decoded) is type(message)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_encoding_is_a_tagged_array(message: wire.WireMessage) -> None:
    item = msgpack.unpackb(encode(message), raw=True)
    assert isinstance(item, list)
    assert item[0] == message.TAG
    assert len(item) == 1 + len(dataclasses.fields(message))


@pytest.mark.parametrize("cls", [Joined, Deliver])
def test_texts_travel_as_bin(cls: type) -> None:
    message = cls("lobby", 1, b"{}")
    item = msgpack.unpackb(encode(message), raw=True)
    assert item[3] == b"{}"
    # bin (0xc4) for the text, str (0xa5) for the room.
    data = encode(message)
    assert b"\xc4\x02{}" in data and b"\xa5lobby" in data


def test_tags_are_distinct_and_stable() -> None:
    tags = {cls.__name__: cls.TAG for cls in
            (Hello, Join, Rejoin, Publish, Leave, Replayed, Released, Accept,
             Welcome, Refuse, Joined, Deliver, Revoke, Offer, SoloFrom)}
    assert tags == {"Hello": 0, "Join": 1, "Rejoin": 2, "Publish": 3, "Leave": 4, "Replayed": 5, "Released": 6,
                    "Accept": 7, "Welcome": 10, "Refuse": 11, "Joined": 12, "Deliver": 13, "Revoke": 14,
                    "Offer": 15, "SoloFrom": 16}


def test_protocol_version() -> None:
    assert wire.PROTOCOL_VERSION == 3


def test_encoding_is_compact() -> None:
    # Small shapes matter: the link carries every chat message.
    assert len(encode(Publish(1, "hi"))) <= 8
    assert len(encode(Leave(1))) <= 3
    assert len(encode(Replayed())) <= 2


# --- streaming ------------------------------------------------------------------------

STREAM = b"".join(encode(m) for m in SAMPLES)


def test_stream_of_messages_in_order() -> None:
    assert decode_all(STREAM) == SAMPLES


def test_byte_by_byte() -> None:
    decoder = Decoder()
    got: list[wire.WireMessage] = []
    for i in range(len(STREAM)):
        got.extend(decoder.feed(STREAM[i : i + 1]))
    assert got == SAMPLES


def test_partial_message_waits() -> None:
    data = encode(Join(1, "lobby", "alice"))
    decoder = Decoder()
    assert list(decoder.feed(data[:-1])) == []
    assert list(decoder.feed(b"")) == []
    assert list(decoder.feed(data[-1:])) == [Join(1, "lobby", "alice")]


def test_empty_feed() -> None:
    assert list(Decoder().feed(b"")) == []


def test_decoders_are_independent() -> None:
    a, b = Decoder(), Decoder()
    data = encode(Leave(1))
    assert list(a.feed(data[:1])) == []
    assert list(b.feed(data)) == [Leave(1)]
    assert list(a.feed(data[1:])) == [Leave(1)]


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.sampled_from(SAMPLES[:-3] + SAMPLES[-2:]), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_any_split_decodes_the_same(messages: list[wire.WireMessage], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in messages)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = Decoder()
    got: list[wire.WireMessage] = []
    for start, end in zip(points, points[1:]):
        got.extend(decoder.feed(data[start:end]))
    assert got == messages


INTS = st.integers(I64_MIN, 2**64 - 1)
TEXTS = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
MESSAGES = st.one_of(
    st.builds(Hello, INTS, TEXTS, INTS, INTS, TEXTS),
    st.builds(Join, INTS, TEXTS, TEXTS),
    st.builds(Rejoin, INTS, TEXTS, TEXTS),
    st.builds(Publish, INTS, TEXTS),
    st.builds(Leave, INTS),
    st.builds(Welcome, INTS, INTS),
    st.builds(Refuse, TEXTS),
    st.builds(Joined, TEXTS, INTS, st.binary(max_size=40), st.booleans()),
    st.builds(Deliver, TEXTS, INTS, st.binary(max_size=40)),
    st.builds(Revoke, TEXTS, INTS),
    st.builds(Released, TEXTS, INTS),
)


@settings(max_examples=200, deadline=None)
@given(message=MESSAGES)
def test_roundtrip_property(message: wire.WireMessage) -> None:
    assert decode_all(encode(message)) == [message]


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(raw(5, 1), id="unused tag 5"),
        pytest.param(raw(9), id="unused tag 9"),
        pytest.param(raw(17, "r", -1, b""), id="tag 17"),
        pytest.param(raw(99, 1), id="tag 99"),
        pytest.param(raw(-1, 1), id="negative tag"),
        pytest.param(raw(2**64 - 1, 1), id="huge tag"),
        pytest.param(raw("1", 1, "room", "user"), id="str tag"),
        pytest.param(raw(b"\x01", 1, "room", "user"), id="bin tag"),
        pytest.param(raw(1.0, 1, "room", "user"), id="float tag"),
        pytest.param(raw(None, 1), id="nil tag"),
        pytest.param(raw([1], 1, "room", "user"), id="array tag"),
        # A bool is not an int on this wire (it is not for fields either).
        pytest.param(raw(True, 1, "room", "user"), id="bool tag True"),
        pytest.param(raw(False, 1, "r", 0, 4, "crc32"), id="bool tag False"),
    ],
)
def test_unknown_tag(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_all(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(msgpack.packb([]), id="empty array"),
        pytest.param(msgpack.packb(1), id="int"),
        pytest.param(msgpack.packb(None), id="nil"),
        pytest.param(msgpack.packb(True), id="bool"),
        pytest.param(msgpack.packb("join"), id="str"),
        pytest.param(msgpack.packb(b"\x01", use_bin_type=True), id="bin"),
        pytest.param(msgpack.packb(1.5), id="float"),
        pytest.param(msgpack.packb({"tag": 1}), id="map"),
        pytest.param(msgpack.packb({1: 1}, strict_types=False), id="int-keyed map"),
        pytest.param(msgpack.packb(msgpack.ExtType(1, b"x")), id="ext"),
    ],
)
def test_not_an_array(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_all(data)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param((Hello.TAG, 1, "r", 0, 4), id="Hello short"),
        pytest.param((Hello.TAG, 1, "r", 0, 4, "crc32", "x"), id="Hello long"),
        pytest.param((Join.TAG, 1, "lobby"), id="Join short"),
        pytest.param((Join.TAG, 1, "lobby", "alice", 9), id="Join long"),
        pytest.param((Rejoin.TAG,), id="Rejoin empty"),
        pytest.param((Publish.TAG, 1), id="Publish short"),
        pytest.param((Publish.TAG, 1, "x", "y"), id="Publish long"),
        pytest.param((Leave.TAG,), id="Leave short"),
        pytest.param((Leave.TAG, 1, 2), id="Leave long"),
        pytest.param((Replayed.TAG, 1), id="Replayed long"),
        pytest.param((Welcome.TAG, 1), id="Welcome short"),
        pytest.param((Refuse.TAG,), id="Refuse short"),
        pytest.param((Refuse.TAG, "a", "b"), id="Refuse long"),
        pytest.param((Joined.TAG, "r", 1), id="Joined short"),
        pytest.param((Joined.TAG, "r", 1, b"t"), id="Joined without solo"),
        pytest.param((Revoke.TAG, "r"), id="Revoke short"),
        pytest.param((Released.TAG, "r", 1, 2), id="Released long"),
        pytest.param((Deliver.TAG, "r", -1, b"t", b"u"), id="Deliver long"),
    ],
)
def test_wrong_arity(item: tuple[Any, ...]) -> None:
    with pytest.raises(WireError, match="bad fields"):
        decode_all(raw(*item))


# (tag, a good field list, index to replace, bad value)
BAD_FIELDS = [
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 0, True),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 0, "1"),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 1, 0),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 1, b"r"),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 2, False),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 3, 4.0),
    (Hello.TAG, [1, "r", 0, 4, "crc32"], 4, None),
    (Join.TAG, [1, "lobby", "alice"], 0, True),
    (Join.TAG, [1, "lobby", "alice"], 0, False),
    (Join.TAG, [1, "lobby", "alice"], 0, 1.0),
    (Join.TAG, [1, "lobby", "alice"], 0, "1"),
    (Join.TAG, [1, "lobby", "alice"], 0, None),
    (Join.TAG, [1, "lobby", "alice"], 1, b"lobby"),
    (Join.TAG, [1, "lobby", "alice"], 1, 5),
    (Join.TAG, [1, "lobby", "alice"], 2, ["alice"]),
    (Join.TAG, [1, "lobby", "alice"], 2, {"u": "alice"}),
    (Rejoin.TAG, [1, "lobby", "alice"], 0, True),
    (Rejoin.TAG, [1, "lobby", "alice"], 2, None),
    (Publish.TAG, [1, "hi"], 0, True),
    (Publish.TAG, [1, "hi"], 1, b"hi"),
    (Publish.TAG, [1, "hi"], 1, 7),
    (Leave.TAG, [1], 0, True),
    (Leave.TAG, [1], 0, "1"),
    (Leave.TAG, [1], 0, [1]),
    (Welcome.TAG, [1, 0], 0, True),
    (Welcome.TAG, [1, 0], 1, False),
    (Refuse.TAG, ["no"], 0, b"no"),
    (Refuse.TAG, ["no"], 0, None),
    (Joined.TAG, ["r", 1, b"t", False], 0, b"r"),
    (Joined.TAG, ["r", 1, b"t", False], 1, True),
    (Joined.TAG, ["r", 1, b"t", False], 2, "t"),  # text must be bin, not str
    (Joined.TAG, ["r", 1, b"t", True], 3, 1),
    (Joined.TAG, ["r", 1, b"t", True], 3, None),
    (Revoke.TAG, ["r", 1], 0, b"r"),
    (Revoke.TAG, ["r", 1], 1, "1"),
    (Released.TAG, ["r", 1], 0, 1),
    (Released.TAG, ["r", 1], 1, True),
    (Deliver.TAG, ["r", -1, b"t"], 1, False),
    (Deliver.TAG, ["r", -1, b"t"], 1, -1.0),
    (Deliver.TAG, ["r", -1, b"t"], 2, "t"),
    (Deliver.TAG, ["r", -1, b"t"], 2, None),
]


@pytest.mark.parametrize(
    ("tag", "fields", "index", "bad"),
    BAD_FIELDS,
    ids=[f"tag{t}-field{i}-{type(b).__name__}" for t, _, i, b in BAD_FIELDS],
)
def test_wrong_field_types(tag: int, fields: list[Any], index: int, bad: Any) -> None:
    assert len(decode_all(raw(tag, *fields))) == 1  # the good version decodes
    broken = list(fields)
    broken[index] = bad
    with pytest.raises(WireError, match="bad fields"):
        decode_all(raw(tag, *broken))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1", id="never-used byte"),
        pytest.param(b"\xc1" + encode(Leave(1)), id="never-used then valid"),
        pytest.param(b"\x93\x01\x01\xa2\xff\xfe", id="invalid utf-8 str"),
        pytest.param(b"\x92\x04\xa2\xed\xa0", id="truncated then invalid"),
        pytest.param(b"\x93\x03\x01\xa3\xed\xa0\x80", id="surrogate in utf-8"),
    ],
)
def test_garbage_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_all(data)


def test_garbage_after_good_messages() -> None:
    decoder = Decoder()
    got: list[wire.WireMessage] = []
    with pytest.raises(WireError):
        for message in decoder.feed(encode(Leave(1)) + encode(Leave(2)) + b"\xc1"):
            got.append(message)
    assert got == [Leave(1), Leave(2)]


def test_error_is_raised_on_a_later_feed_too() -> None:
    decoder = Decoder()
    data = raw(99, 1)
    assert list(decoder.feed(data[:1])) == []
    with pytest.raises(WireError, match="unknown message tag"):
        list(decoder.feed(data[1:]))


def test_oversized_message_is_refused() -> None:
    # A peer that declares a huge bin and keeps sending is cut off, instead of
    # the decoder buffering without bound.
    decoder = Decoder()
    assert list(decoder.feed(b"\xc6\x7f\xff\xff\xff")) == []
    chunk = b"x" * (1 << 20)
    with pytest.raises(WireError):
        for _ in range(3 * wire.MAX_MESSAGE_BYTES // len(chunk)):
            list(decoder.feed(chunk))


def test_largest_message_fits() -> None:
    message = Deliver("lobby", -1, b"x" * wire.MAX_MESSAGE_BYTES)
    assert decode_all(encode(message)) == [message]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    decoder = Decoder()
    try:
        for message in decoder.feed(data):
            assert isinstance(message, (Hello, Join, Rejoin, Publish, Leave, Welcome,
                                        Refuse, Joined, Deliver))
    except WireError:
        pass

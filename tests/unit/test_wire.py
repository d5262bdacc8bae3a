"""garin.wire: the router <-> shard messages, msgpack arrays checked field by field."""

from __future__ import annotations

import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import wire
from garin.wire import Adopt, Decoder, Ended, Hello, Ping, Pong, Refuse, Welcome, WireError, WireMessage, encode

SESSION = ("in_room", None, -0.5, -0.25, None, "lobby", "alice", (-0.75, -0.125), 3.5)
FRAMES = (b"\x81\x85", False, 3, b"\x01\x02\x03\x04", True, 1, (b"\xf0\x9f", 0), "h\u00e9", 2)

EXAMPLES: list[WireMessage] = [
    Hello(wire.PROTOCOL_VERSION, "router-1", 2, 4, "blake2b"),
    Welcome(wire.PROTOCOL_VERSION, 2, (1, 7, 2**40)),
    Refuse("wrong shard count"),
    Adopt(7, "router-1", "10.0.0.1:5555", "sub-1", "Alice", "lobby", "alice", SESSION, FRAMES, 1234.5),
    Adopt(8, "r", "[::1]:1", None, None, "den", "bob", (), (), 0.0),
    Ended(7, True),
    Ended(1 << 40, False),
    Ping(0),
    Ping(123456),
    Pong(123456, True),
]


def test_the_examples_cover_every_message_type() -> None:
    assert {type(m) for m in EXAMPLES} == set(typing.get_args(WireMessage))


def decode_all(data: bytes) -> list[WireMessage]:
    return list(Decoder().feed(data))


def pack(item: Any) -> bytes:
    data: bytes = msgpack.packb(item, use_bin_type=True)
    return data


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_fed_whole(message: WireMessage) -> None:
    decoded = decode_all(encode(message))
    assert decoded == [message]
    assert type(decoded[0]) is type(message)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_fed_byte_by_byte(message: WireMessage) -> None:
    data = encode(message)
    decoder = Decoder()
    out: list[WireMessage] = []
    for i in range(len(data)):
        got = list(decoder.feed(data[i:i + 1]))
        # Nothing comes out before the last byte.
        assert got == [] or i == len(data) - 1
        out.extend(got)
    assert out == [message]


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    data = b"".join(encode(m) for m in EXAMPLES)
    assert decode_all(data) == EXAMPLES
    # Split anywhere: the same messages, in order.
    for cut in range(len(data) + 1):
        decoder = Decoder()
        out = list(decoder.feed(data[:cut])) + list(decoder.feed(data[cut:]))
        assert out == EXAMPLES, cut


def test_a_memoryview_is_accepted() -> None:
    data = encode(EXAMPLES[3])
    assert list(Decoder().feed(memoryview(data))) == [EXAMPLES[3]]


def test_adopt_keeps_nested_state_as_tuples_and_bytes() -> None:
    (adopt,) = decode_all(encode(EXAMPLES[3]))
    assert isinstance(adopt, Adopt)
    assert adopt.session == SESSION and type(adopt.session) is tuple
    assert type(adopt.session[7]) is tuple
    assert adopt.frames == FRAMES
    assert type(adopt.frames[0]) is bytes and type(adopt.frames[3]) is bytes
    assert type(adopt.frames[7]) is str
    assert type(adopt.sent_at) is float


def test_adopt_with_no_subject_or_claimed_name() -> None:
    message = Adopt(1, "r", "p", None, None, "room", "user", SESSION, FRAMES, 1.0)
    (decoded,) = decode_all(encode(message))
    assert isinstance(decoded, Adopt)
    assert decoded.subject is None and decoded.claimed_name is None
    assert decoded == message


def test_the_encoding_is_a_tagged_array() -> None:
    assert msgpack.unpackb(encode(Ended(5, True))) == [Ended.TAG, 5, True]
    assert msgpack.unpackb(encode(Refuse("no"))) == [Refuse.TAG, "no"]
    assert msgpack.unpackb(encode(Ping(3))) == [Ping.TAG, 3]
    tags = [cls.TAG for cls in typing.get_args(WireMessage)]
    assert len(set(tags)) == len(tags)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8),
)
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)
state_tuples = st.lists(nested, max_size=9).map(tuple)
ints = st.integers(-(2**63), 2**64 - 1)
texts = st.text(max_size=20)
maybe_text = st.none() | texts

any_message = st.one_of(
    st.builds(Hello, ints, texts, ints, ints, texts),
    st.builds(Welcome, ints, ints, st.lists(ints, max_size=5).map(tuple)),
    st.builds(Refuse, texts),
    st.builds(Adopt, ints, texts, texts, maybe_text, maybe_text, texts, texts, state_tuples, state_tuples,
              st.floats(allow_nan=False)),
    st.builds(Ended, ints, st.booleans()),
    st.builds(Ping, ints),
    st.builds(Pong, ints),
)


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(any_message, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_any_messages_round_trip_however_split(messages: list[WireMessage], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in messages)
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = Decoder()
    out: list[WireMessage] = []
    for a, b in zip([0, *points], [*points, len(data)]):
        out.extend(decoder.feed(data[a:b]))
    assert out == messages
    assert [type(m) for m in out] == [type(m) for m in messages]


# -- rejection ----------------------------------------------------------------------


def test_an_unknown_tag_is_refused() -> None:
    known = {cls.TAG for cls in typing.get_args(WireMessage)}
    unknown = [tag for tag in range(-2, 30) if tag not in known]
    for tag in (*unknown, 1 << 40, "1", None, b"\x01", [1]):
        with pytest.raises(WireError):
            decode_all(pack([tag, 5, True]))


def test_a_tag_must_be_an_int_not_an_equal_bool_or_float() -> None:
    # True == 1 and 12.0 == 12 as dict keys: the tag's type is checked too.
    assert Adopt.TAG == 1
    with pytest.raises(WireError):
        decode_all(pack([True, *adopt_fields()[1:]]))
    with pytest.raises(WireError):
        decode_all(pack([float(Ended.TAG), 5, True]))


@pytest.mark.parametrize("item", [
    [Ended.TAG, 5],
    [Ended.TAG, 5, True, 1],
    [Ended.TAG],
    [Refuse.TAG],
    [Refuse.TAG, "a", "b"],
    [Ping.TAG],
    [Ping.TAG, 1, 2],
    [Pong.TAG],
    [Welcome.TAG, 4],
    [Welcome.TAG, 4, 1],
    [Welcome.TAG, 4, 1, [], 2],
    [Hello.TAG, 4, "r", 0, 1],
    [Adopt.TAG, 1, "r", "p", None, None, "room", "user", [], [], 1.0, 9],
    [Adopt.TAG, 1, "r", "p", None, None, "room", "user", [], []],
])
def test_a_wrong_field_count_is_refused(item: list[Any]) -> None:
    with pytest.raises(WireError):
        decode_all(pack(item))


def adopt_fields(**changes: Any) -> list[Any]:
    fields = {
        "conn": 1, "owner": "r", "peer": "p", "subject": None, "claimed_name": None, "room": "room",
        "username": "user", "session": [], "frames": [], "sent_at": 1.0,
    }
    for name, value in changes.items():
        assert name in fields
        fields[name] = value
    return [Adopt.TAG, *fields.values()]


def test_the_adopt_helper_makes_a_valid_message() -> None:
    assert decode_all(pack(adopt_fields())) == [Adopt(1, "r", "p", None, None, "room", "user", (), (), 1.0)]


@pytest.mark.parametrize("item", [
    [Ended.TAG, True, True],  # a bool where an int is expected
    [Ended.TAG, 5, 1],  # an int where a bool is expected
    [Ended.TAG, 5.0, True],
    [Ended.TAG, "5", True],
    [Welcome.TAG, 4, False, []],
    [Welcome.TAG, None, 1, []],
    [Welcome.TAG, 4, 1, 5],  # live must be an array
    [Welcome.TAG, 4, 1, ["7"]],  # of connection ids
    [Welcome.TAG, 4, 1, [True]],
    [Welcome.TAG, 4, 1, [[1]]],
    [Refuse.TAG, b"bytes, not text"],
    [Ping.TAG, True],
    [Ping.TAG, 1.0],
    [Pong.TAG, "1"],
    [Pong.TAG, None],
    [Refuse.TAG, None],
    [Hello.TAG, 4, "r", 0, 1, 5],
    [Hello.TAG, 4, 7, 0, 1, "h"],
    adopt_fields(sent_at=1),  # an int where a float is expected
    adopt_fields(sent_at=True),
    adopt_fields(sent_at=None),
    adopt_fields(sent_at="1.0"),
    adopt_fields(conn=True),
    adopt_fields(conn=1.0),
    adopt_fields(owner=None),
    adopt_fields(peer=b"p"),
    adopt_fields(subject=5),
    adopt_fields(claimed_name=b"x"),
    adopt_fields(room=None),
    adopt_fields(username=None),
    adopt_fields(session=None),
    adopt_fields(session={"a": 1}),
    adopt_fields(session="abc"),
    adopt_fields(frames=b"abc"),
])
def test_a_wrong_field_type_is_refused(item: list[Any]) -> None:
    with pytest.raises(WireError):
        decode_all(pack(item))


@pytest.mark.parametrize("item", [5, "text", b"bin", None, True, 1.5, {"0": 1}, {0: [1, 2]}, []])
def test_a_non_array_or_empty_array_is_refused(item: Any) -> None:
    with pytest.raises(WireError):
        decode_all(pack(item))


@pytest.mark.parametrize("data", [
    b"\xc1",  # a byte msgpack never uses
    b"\xd9\x02\xff\xfe",  # a str that is not UTF-8
    b"\x92\x0c\xa2\xff\xfe",  # [12, <not UTF-8>]
])
def test_undecodable_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_all(data)


def test_messages_before_a_bad_one_still_come_out() -> None:
    good = Ended(3, False)
    decoder = Decoder()
    feed = decoder.feed(encode(good) + pack([99]))
    assert next(feed) == good
    with pytest.raises(WireError):
        next(feed)


def test_an_incomplete_message_waits_for_more() -> None:
    data = encode(EXAMPLES[3])
    decoder = Decoder()
    assert list(decoder.feed(data[:-1])) == []
    assert list(decoder.feed(data[-1:])) == [EXAMPLES[3]]

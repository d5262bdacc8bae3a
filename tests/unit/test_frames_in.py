"""The incoming frame parser (router/frames_in.py): every rule, every split."""

from __future__ import annotations

import os
import struct

import pytest

from garin.closes import Close
from garin.frames import close_frame, pong_frame
from garin.frames_in import BINARY, HEARD, HEARD_FRAME, MAX_FRAGMENTS, FrameParser, Heard, PeerClosed, Ping, unmask

KEY = b"\x37\xfa\x21\x3d"
MAX = 1000


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0,
          key: bytes = KEY, length_bytes: int | None = None) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    size = length_bytes if length_bytes is not None else (0 if n < 126 else 2 if n < 65536 else 8)
    bit = 0x80 if mask else 0
    if size == 0:
        head = bytes((first, bit | n))
    elif size == 2:
        head = bytes((first, bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, bit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    return head + key + unmask(payload, key)


def text(s: str, fin: bool = True, opcode: int = 1) -> bytes:
    return frame(opcode, s.encode(), fin)


def events(data: bytes, chunks: list[int] | None = None, max_chars: int = MAX) -> list[object]:
    """Feed `data` (in pieces of the given sizes, or whole) and collect every event."""
    parser = FrameParser(max_chars)
    out: list[object] = []
    pieces = [data] if chunks is None else _split(data, chunks)
    for piece in pieces:
        parser.feed(piece)
        while (event := parser.next_event()) is not None:
            out.append(heard(event))
    return out


def heard(event: object) -> object:
    """Every `Heard` as HEARD: whether a frame was charged to the frame
    budget is checked by test_heard_frames_are_whole_frames_only."""
    return HEARD if isinstance(event, Heard) else event


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos:pos + size])
        pos += size
    pieces.append(data[pos:])
    return pieces


def messages(evs: list[object]) -> list[object]:
    """Events without the HEARDs that partial frames and fragments produce."""
    return [e for e in evs if e is not HEARD]


# -- masking ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 125, 126, 1000, 65537])
def test_unmask_is_xor_with_the_repeating_key(n: int) -> None:
    data = os.urandom(n)
    expected = bytes(b ^ KEY[i % 4] for i, b in enumerate(data))
    assert unmask(data, KEY) == expected
    assert unmask(expected, KEY) == data


# -- messages --------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["", "hi", "x" * 125, "y" * 126, "z" * 65535, "é" * 400, "🙂" * 250])
def test_a_text_frame_is_one_message(payload: str) -> None:
    assert events(text(payload), max_chars=70000) == [payload]


@pytest.mark.parametrize("n,length_bytes", [(5, 0), (126, 2), (65535, 2), (65536, 8), (70000, 8)])
def test_16_and_64_bit_lengths(n: int, length_bytes: int) -> None:
    data = frame(1, b"a" * n, length_bytes=length_bytes)
    assert messages(events(data, max_chars=100000)) == ["a" * n]


def test_several_frames_in_one_read() -> None:
    data = text("one") + frame(0x9, b"p") + text("two") + frame(0xA, b"") + text("three")
    assert events(data) == ["one", Ping(b"p"), "two", HEARD, "three"]


def test_every_split_point_gives_the_same_messages() -> None:
    data = (text("héllo wörld 🙂") + frame(0x9, b"ping!") + text("frag-", fin=False)
            + frame(0xA, b"x") + frame(0, "mént 🙂".encode(), fin=False) + frame(0, b"end")
            + frame(1, b"b" * 300) + frame(0x8, struct.pack("!H", 1000) + b"bye"))
    want = ["héllo wörld 🙂", Ping(b"ping!"), HEARD, "frag-mént 🙂end", "b" * 300, PeerClosed(1000, "bye")]
    assert messages(events(data)) == messages(want)
    for cut in range(1, len(data)):
        assert messages(events(data, [cut])) == messages(want), cut
    # One byte at a time.
    assert messages(events(data, [1] * len(data))) == messages(want)


def test_a_split_multibyte_character_is_decoded_across_reads() -> None:
    data = text("🙂🙂")
    for cut in range(1, len(data)):
        assert messages(events(data, [cut])) == ["🙂🙂"]


def test_fragments_and_partial_frames_are_heard() -> None:
    assert events(text("ab", fin=False) + frame(0, b"cd")) == [HEARD, "abcd"]
    # A frame arriving in two reads: the first part is a sign of life.
    data = text("abcdef")
    assert events(data, [len(data) - 2]) == [HEARD, "abcdef"]
    # A header alone is not.
    assert events(data, [2, 4]) == ["abcdef"]


def test_empty_fragments() -> None:
    assert events(text("", fin=False) + frame(0, b"", fin=False) + frame(0, b"x")) == [HEARD, HEARD, "x"]
    assert events(text("x", fin=False) + frame(0, b"")) == [HEARD, "x"]


def test_pings_and_pongs_between_fragments() -> None:
    data = text("a", fin=False) + frame(0x9, b"1") + frame(0, b"b", fin=False) + frame(0xA, b"2") + frame(0, b"c")
    assert events(data) == [HEARD, Ping(b"1"), HEARD, HEARD, "abc"]


def test_binary_frames() -> None:
    assert events(frame(2, b"\x00\x01")) == [BINARY]
    assert events(frame(2, b"")) == [BINARY]
    # A fragmented binary message: each frame is reported, the payload skipped.
    assert events(frame(2, b"ab", fin=False) + frame(0, b"cd") + text("t")) == [BINARY, BINARY, "t"]
    # A huge binary frame is reported at once and never buffered.
    parser = FrameParser(MAX)
    head = frame(2, b"")[:1] + bytes((0x80 | 127,)) + struct.pack("!Q", 1 << 40) + KEY
    parser.feed(head + b"x" * 100)
    assert parser.next_event() is BINARY
    assert parser.next_event() is None
    parser.feed(b"x" * 100)
    assert isinstance(parser.next_event(), Heard)


def test_control_frame_waits_for_its_whole_payload() -> None:
    data = frame(0x9, b"0123456789")
    for cut in range(1, len(data)):
        assert events(data, [cut]) == [Ping(b"0123456789")]


# -- message size ------------------------------------------------------------------


TOO_BIG = Close(1009, "message too big")


def test_the_limit_counts_utf8_bytes() -> None:
    # A message of 4-byte characters may not hold four times the limit.
    assert events(text("é" * 5), max_chars=10) == ["é" * 5]
    assert events(text("é" * 6), max_chars=10) == [TOO_BIG]
    assert events(text("🙂" * 3), max_chars=10) == [TOO_BIG]
    assert events(text("a" * 6, fin=False) + frame(0, b"a" * 4), max_chars=10) == [HEARD, "a" * 10]
    assert events(text("a" * 6, fin=False) + frame(0, b"a" * 5), max_chars=10) == [HEARD, TOO_BIG]


def test_a_message_too_big_is_refused_at_the_header_that_makes_it_so() -> None:
    # Before its payload arrives: an unfinished message never holds more than the limit.
    parser = FrameParser(100)
    parser.feed(text("a" * 60, fin=False))
    assert parser.next_event() == HEARD_FRAME
    header = frame(0, b"a" * 60)
    parser.feed(header[:7])  # the header and its key, one byte of payload
    assert parser.next_event() == TOO_BIG
    assert parser._parts is None


def test_a_huge_declared_length_is_refused_at_once() -> None:
    parser = FrameParser(100)
    parser.feed(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 40) + KEY + b"a")
    assert parser.next_event() == TOO_BIG
    parser.feed(b"a" * 1000)
    assert parser.next_event() is None
    assert parser._buf == b""


# -- broken rules: wsproto's codes and reasons -------------------------------------


def only(data: bytes) -> object:
    evs = messages(events(data))
    assert len(evs) == 1, evs
    return evs[0]


@pytest.mark.parametrize("data,reason", [
    (frame(1, b"x", mask=False), "server received unexpected unmasked frame"),
    (frame(1, b"x", rsv=0x40), "Reserved bit set unexpectedly"),
    (frame(1, b"x", rsv=0x20), "Reserved bit set unexpectedly"),
    (frame(1, b"x", rsv=0x10), "Reserved bit set unexpectedly"),
    (frame(3, b"x"), "Invalid opcode 0x3"),
    (frame(0xB, b"x"), "Invalid opcode 0xb"),
    (frame(0x9, b"x", fin=False), "Invalid attempt to fragment control frame"),
    (frame(0x9, b"x" * 126), "Control frame with payload len > 125"),
    (frame(0x8, b"\x03\xe8" + b"x" * 124), "Control frame with payload len > 125"),
    (frame(0, b"x"), "unexpected CONTINUATION"),
    (text("a", fin=False) + text("b"), "expected CONTINUATION, got <Opcode.TEXT: 1>"),
    (text("a", fin=False) + frame(2, b"b"), "expected CONTINUATION, got <Opcode.BINARY: 2>"),
    (frame(1, b"x" * 100, length_bytes=2), "Payload length used 2 bytes when 1 would have sufficed"),
    (frame(1, b"x" * 300, length_bytes=8), "Payload length used 8 bytes when 2 would have sufficed"),
    (bytes((0x81, 0xFF)) + b"\x80" + b"\0" * 7 + KEY + b"x", "8-byte payload length with non-zero MSB"),
    (frame(8, b"\x03"), "CLOSE with 1 byte payload"),
    (frame(8, struct.pack("!H", 999)), "CLOSE with invalid code"),
    (frame(8, struct.pack("!H", 5000)), "CLOSE with invalid code"),
    (frame(8, struct.pack("!H", 1005)), "remote CLOSE with local-only reason"),
    (frame(8, struct.pack("!H", 1006)), "remote CLOSE with local-only reason"),
    (frame(8, struct.pack("!H", 1015)), "remote CLOSE with local-only reason"),
    (frame(8, struct.pack("!H", 1004)), "CLOSE with unknown reserved code"),
    (frame(8, struct.pack("!H", 1014)), "CLOSE with unknown reserved code"),
    (frame(8, struct.pack("!H", 2999)), "CLOSE with unknown reserved code"),
])
def test_protocol_errors_close_1002(data: bytes, reason: str) -> None:
    assert only(data) == Close(1002, reason)


def test_invalid_utf8_closes_1007() -> None:
    result = only(frame(1, b"ok\xff"))
    assert isinstance(result, Close) and result.code == 1007
    assert result.reason == "'utf-8' codec can't decode byte 0xff in position 2: invalid start byte"
    # A truncated character at the end of the message.
    result = only(frame(1, "🙂".encode()[:3]))
    assert isinstance(result, Close) and result.code == 1007
    # Split across fragments: caught in the fragment where it breaks.
    evs = events(frame(1, b"ab", fin=False) + frame(0, b"\xc3", fin=False) + frame(0, b"(", fin=True))
    assert evs[:2] == [HEARD, HEARD] and isinstance(evs[2], Close) and evs[2].code == 1007
    # A character split across fragments is fine.
    raw = "é".encode()
    assert messages(events(frame(1, raw[:1], fin=False) + frame(0, raw[1:]))) == ["é"]


def test_invalid_utf8_close_reason_closes_1007() -> None:
    result = only(frame(8, struct.pack("!H", 1000) + b"\xff"))
    assert isinstance(result, Close) and result.code == 1007
    assert result.reason.startswith("Error decoding CLOSE reason: ")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 4999])
def test_peer_close_codes(code: int) -> None:
    assert only(frame(8, struct.pack("!H", code) + "réason".encode())) == PeerClosed(code, "réason")


def test_an_empty_close_is_1005() -> None:
    assert only(frame(8, b"")) == PeerClosed(1005, "")


def test_nothing_after_a_close_or_an_error() -> None:
    assert events(frame(8, b"") + text("late")) == [PeerClosed(1005, "")]
    assert events(frame(3, b"") + text("late")) == [Close(1002, "Invalid opcode 0x3")]
    parser = FrameParser(MAX)
    parser.feed(frame(8, b""))
    assert parser.next_event() == PeerClosed(1005, "")
    parser.feed(text("more"))
    assert parser.next_event() is None
    assert parser._buf == b""


# -- outgoing control frames --------------------------------------------------------


def test_close_and_pong_frames() -> None:
    assert pong_frame(b"") == b"\x8a\x00"
    assert pong_frame(b"abc") == b"\x8a\x03abc"
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert close_frame(1005, "") == b"\x88\x00"
    assert close_frame(1006, "") == b"\x88\x02\x03\xe8"
    long = close_frame(1002, "é" * 100)
    assert long[1] == 125 or long[1] == 124
    assert long[4:].decode() == "é" * ((long[1] - 2) // 2)


# -- the same as wsproto ------------------------------------------------------------


def test_matches_wsproto_on_random_streams() -> None:
    """Random mixes of valid and broken frames, split at random: the same results."""
    wsproto = pytest.importorskip("wsproto")
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection, Ping as WPing, Pong, TextMessage

    import random
    rng = random.Random(1234)
    choices = [
        lambda: text(rng.choice(["", "a", "héllo", "🙂" * 3, "x" * 200])),
        lambda: text("ab", fin=False) + frame(0, "ç🙂".encode(), fin=False) + frame(0, b"z"),
        lambda: frame(0x9, os.urandom(rng.randrange(0, 20))),
        lambda: frame(0xA, b"p"),
        lambda: frame(1, bytes([rng.randrange(256) for _ in range(rng.randrange(1, 6))])),
        lambda: frame(8, struct.pack("!H", rng.choice([1000, 1001, 1004, 1005, 3000, 999])) + b"r"),
        lambda: frame(rng.choice([3, 7, 0xB, 0]), b"q"),
    ]
    for _ in range(300):
        data = b"".join(rng.choice(choices)() for _ in range(rng.randrange(1, 6)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        ours: list[object] = []
        parser = FrameParser(MAX)
        theirs: list[object] = []
        conn = Connection(ConnectionType.SERVER)
        parts: list[str] = []
        for piece in pieces:
            parser.feed(piece)
            while (event := parser.next_event()) is not None:
                ours.append(heard(event))
            conn.receive_data(piece)
            for ev in conn.events():
                if isinstance(ev, TextMessage):
                    parts.append(ev.data)
                    if ev.message_finished:
                        theirs.append("".join(parts))
                        parts.clear()
                    else:
                        theirs.append(HEARD)
                elif isinstance(ev, BytesMessage):
                    theirs.append(BINARY)
                elif isinstance(ev, WPing):
                    theirs.append(Ping(bytes(ev.payload)))
                elif isinstance(ev, Pong):
                    theirs.append(HEARD)
                elif isinstance(ev, CloseConnection):
                    if conn.state.name == "REMOTE_CLOSING":
                        theirs.append(PeerClosed(ev.code, ev.reason or ""))
                    else:
                        theirs.append(Close(ev.code, ev.reason or "protocol error"))
        assert ours == theirs, (data, pieces)
    assert wsproto


def test_heard_frames_are_whole_frames_only() -> None:
    """A pong and each fragment before the last cost a frame from the budget;
    more bytes of a frame already begun do not."""
    parser = FrameParser(1 << 20)
    parser.feed(frame(0xA, b"") + text("ab", fin=False) + frame(0, b"", fin=False))
    assert [parser.next_event() for _ in range(3)] == [HEARD_FRAME, HEARD_FRAME, HEARD_FRAME]
    parser = FrameParser(1 << 20)
    parser.feed(text("y" * 1000, fin=False)[:600])
    assert parser.next_event() is HEARD_FRAME  # a frame begins
    parser.feed(text("y" * 1000, fin=False)[600:])
    assert parser.next_event() is HEARD  # the rest of it: free


def test_a_message_in_too_many_fragments_closes() -> None:
    ok = text("a", fin=False) + b"".join(frame(0, b"a", fin=False) for _ in range(MAX_FRAGMENTS - 2)) + frame(0, b"a")
    assert messages(events(ok)) == ["a" * MAX_FRAGMENTS]
    too_many = text("a", fin=False) + b"".join(frame(0, b"a", fin=False) for _ in range(MAX_FRAGMENTS))
    assert messages(events(too_many))[-1] == Close(1008, "message in too many fragments")


def test_an_unfinished_message_costs_its_size_not_its_fragment_count() -> None:
    parser = FrameParser(1 << 20)
    parser.feed(text("a", fin=False) + b"".join(frame(0, b"b", fin=False) for _ in range(200)))
    while parser.next_event() is not None:
        pass
    snapshot = parser.snapshot()
    assert snapshot[7] == b"a" + b"b" * 200  # the message so far, as its bytes

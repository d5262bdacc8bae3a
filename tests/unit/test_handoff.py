"""What travels with a connection that changes process: `Session.snapshot`/
`restore` and `FrameParser.snapshot`/`restore`.

A restored session must go on exactly as the original would have, on another
clock origin; a restored frame parser must yield exactly the events the
original would have. Times here are multiples of 1/8 s, so every sum and
difference is exact and deadlines can be compared with `==`."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import closes, wire
from garin.closes import Close
from garin.frames_in import BINARY, HEARD, HEARD_FRAME, MAX_FRAGMENTS, FrameParser, Heard, PeerClosed, Ping, unmask
from garin.session import (
    FRAME_BURST,
    CloseClient,
    JoinRoom,
    LeaveRoom,
    Publish,
    SendPing,
    Session,
    SessionRules,
    State,
)

# -- sessions ------------------------------------------------------------------------

GOOD = "good-token"


def check_token(token: str) -> Close | None:
    return None if token == GOOD else closes.INVALID_TOKEN


def auth(token: str = GOOD) -> str:
    return json.dumps({"type": "auth", "body": token})


def join(username: str = "alice", room: str = "lobby") -> str:
    return json.dumps({"type": "join", "username": username, "room": room})


def msg(body: str = "hello") -> str:
    return json.dumps({"type": "message", "body": body})


LEAVE = '{"type":"userleave"}'


def through_wire(session: tuple[Any, ...] = (), frames: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The snapshots as the receiving process gets them: inside an encoded `Adopt`."""
    sent = wire.Adopt(1, "router-0", "127.0.0.1:1", None, None, "lobby", "alice", session, frames, 1.0)
    (received,) = list(wire.Decoder().feed(wire.encode(sent)))
    assert isinstance(received, wire.Adopt)
    return received.session, received.frames


def moved(session: Session, now: float, there: float, rules: SessionRules | None = None) -> Session:
    """`session` snapshotted at `now` and restored (via the wire) at `there`."""
    snap, _ = through_wire(session=session.snapshot(now))
    return Session.restore(rules or session.rules, check_token, snap, there)


def same(original: Session, restored: Session, shift: float) -> None:
    """`restored` is `original` on a clock `shift` seconds later."""
    assert restored.state is original.state
    assert (restored.room, restored.username, restored.close) == (original.room, original.username, original.close)
    if original.deadline is None:
        assert restored.deadline is None
    else:
        assert restored.deadline == original.deadline + shift


# Inputs: the same for both sessions, at the same time relative to the move.
Input = tuple[str, str]
# Frames in a "frames" input: a few of them exhaust the budget (garin.session.FRAME_BURST).
FRAMES_BURST = 45

TEXTS = [
    auth(), auth("bad"), join("alice", "lobby"), join("bob", "den"), msg("hi"), msg("x" * 20), msg(""),
    LEAVE, "not json", '{"type":"nope"}',
]
inputs: st.SearchStrategy[Input] = st.one_of(
    # The inputs that limits and deadlines are about, often.
    st.tuples(st.sampled_from(["say", "switch"]), st.just("")),
    st.tuples(st.just("text"), st.sampled_from(TEXTS)),
    st.tuples(st.sampled_from(["heard", "timeout", "frame", "frames", "timeout", "binary", "end"]), st.just("")),
)


def grid(low: float, high: float) -> st.SearchStrategy[float]:
    return st.integers(int(low * 8), int(high * 8)).map(lambda n: n / 8)


# Mostly short gaps, so that rate and join limits come into play.
gaps = st.one_of(st.just(0.0), grid(0, 0.5), grid(0, 2.5))
steps = st.lists(st.tuples(gaps, inputs), max_size=10)

rules_strategy = st.builds(
    SessionRules,
    auth_timeout_s=st.sampled_from([1.0, 2.0, 4.0]),
    join_timeout_s=st.sampled_from([1.0, 2.0, 4.0]),
    rate_limit_count=st.sampled_from([0, 1, 2, 4]),
    rate_limit_window_s=st.sampled_from([0.5, 1.0, 2.0]),
    max_body_chars=st.sampled_from([0, 10]),
    ping_interval_s=st.sampled_from([0.0, 1.0, 2.5]),
    ping_timeout_s=st.sampled_from([0.5, 2.0]),
    idle_timeout_s=st.sampled_from([0.0, 1.5, 4.0]),
    join_limit_count=st.sampled_from([0, 1, 2, 4]),
    join_limit_window_s=st.sampled_from([1.0, 2.0, 4.0]),
)


def apply(session: Session, item: Input, now: float) -> list[Any]:
    kind, text = item
    # Inputs that depend on the state (the same in both sessions: checked).
    if kind == "switch":  # leave the room, or join one
        kind, text = "text", LEAVE if session.state is State.IN_ROOM else join("carol", "attic")
    elif kind == "say":  # a message, where it is allowed
        kind, text = ("text", msg("hi")) if session.state is State.IN_ROOM else ("heard", "")
    if kind == "text":
        return list(session.receive_text(text, now))
    if kind == "heard":  # more of a frame under way
        return list(session.heard(now))
    if kind == "frame":  # a ping, a pong or a fragment: from the frame budget
        return list(session.heard(now, frame=True))
    if kind == "frames":  # a burst of them, to reach the budget's end
        return [action for _ in range(FRAMES_BURST) for action in session.heard(now, frame=True)]
    if kind == "timeout":
        return list(session.timeout(now))
    if kind == "binary":
        return list(session.receive_binary(now))
    assert kind == "end"
    return list(session.end(closes.SHUTDOWN))


OPENINGS = {"fresh": [], "authed": [auth()], "in_room": [auth(), join()], "left": [auth(), join(), LEAVE]}


def check_move(
    rules: SessionRules, start: str, t0: float, there: float,
    before: list[tuple[float, Input]], gap: float, after: list[tuple[float, Input]],
) -> None:
    """Drive a session through `before`, move it `gap` later onto a clock at
    `there`, then drive it and the original through `after` at the same
    times relative to the move: the same actions, states and deadlines."""
    original = Session(rules, check_token, t0)
    now = t0
    for text in OPENINGS[start]:
        original.receive_text(text, now)
    for dt, item in before:
        now += dt
        apply(original, item, now)
    now += gap  # the move happens a while after the last input
    if original.state is State.CLOSED:
        with pytest.raises(ValueError):
            moved(original, now, there)
        return
    restored = moved(original, now, there)
    shift = there - now
    same(original, restored, shift)
    elapsed = 0.0
    for dt, item in after:
        elapsed += dt
        expected = apply(original, item, now + elapsed)
        assert apply(restored, item, there + elapsed) == expected, (item, elapsed)
        same(original, restored, shift)
    # And a restored session can move again (unless it has closed).
    if restored.state is not State.CLOSED:
        again = moved(restored, there + elapsed, t0)
        same(original, again, t0 - (now + elapsed))


@settings(max_examples=250, deadline=None)
@given(
    rules=rules_strategy,
    start=st.sampled_from(sorted(OPENINGS)),
    t0=grid(-1e5, 1e5),
    there=grid(-1e5, 1e5),
    before=steps,
    gap=gaps,
    after=steps,
)
def test_a_restored_session_behaves_exactly_like_the_original(
    rules: SessionRules, start: str, t0: float, there: float,
    before: list[tuple[float, Input]], gap: float, after: list[tuple[float, Input]],
) -> None:
    check_move(rules, start, t0, there, before, gap, after)


# The same, narrowed to what the limits and the keepalive depend on: a member
# sending, leaving, rejoining, pinged and answering, sending bursts of frames,
# idle, at short intervals.
busy_rules = st.builds(
    SessionRules,
    join_timeout_s=st.just(4.0),
    rate_limit_count=st.sampled_from([1, 2]),
    rate_limit_window_s=st.sampled_from([0.5, 1.0]),
    ping_interval_s=st.sampled_from([0.5, 1.0]),
    ping_timeout_s=st.sampled_from([0.5, 1.0]),
    idle_timeout_s=st.sampled_from([0.0, 0.75, 1.5]),
    join_limit_count=st.sampled_from([1, 2]),
    join_limit_window_s=st.sampled_from([1.0, 2.0]),
)
busy_steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.125, 0.25, 0.5]),
        st.sampled_from([("say", ""), ("switch", ""), ("switch", ""), ("timeout", ""), ("heard", ""), ("frames", "")]),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    rules=busy_rules, t0=grid(-100, 100), there=grid(-100, 100),
    before=busy_steps, gap=st.sampled_from([0.0, 0.125, 0.5]), after=busy_steps,
)
def test_limits_and_keepalive_carry_over_a_move(
    rules: SessionRules, t0: float, there: float,
    before: list[tuple[float, Input]], gap: float, after: list[tuple[float, Input]],
) -> None:
    check_move(rules, "in_room", t0, there, before, gap, after)


def test_the_rate_limit_moves_with_the_session() -> None:
    # Two at once, then one every 0.5 s, up to 0.125 s early.
    rules = SessionRules(rate_limit_count=2, rate_limit_window_s=1.0, ping_interval_s=0)
    s = Session(rules, check_token, 0.0)
    s.receive_text(auth(), 0.0)
    s.receive_text(join(), 0.0)
    assert s.receive_text(msg("a"), 10.0) == [Publish("a")]
    assert s.receive_text(msg("b"), 10.0) == [Publish("b")]
    # Moved at 10.125 onto a clock 5000 s ahead: the bucket is still full.
    r1 = moved(s, 10.125, 5010.125)
    assert r1.receive_text(msg("c"), 5010.25) == [CloseClient(closes.RATE_LIMITED)]
    r2 = moved(s, 10.125, 5010.125)
    assert r2.receive_text(msg("c"), 5010.375) == [Publish("c")]
    assert r2.receive_text(msg("d"), 5010.375) == [CloseClient(closes.RATE_LIMITED)]
    # A fresh session on that clock would have taken both.
    fresh = Session(rules, check_token, 5010.0)
    fresh.receive_text(auth(), 5010.0)
    fresh.receive_text(join(), 5010.0)
    assert fresh.receive_text(msg("c"), 5010.25) == [Publish("c")]
    assert fresh.receive_text(msg("d"), 5010.25) == [Publish("d")]


def test_the_frame_budget_moves_with_the_session() -> None:
    s = Session(SessionRules(ping_interval_s=0), check_token, 0.0)
    s.receive_text(auth(), 0.0)
    s.receive_text(join(), 0.0)
    for _ in range(FRAME_BURST):
        assert s.heard(1.0, frame=True) == []
    # Spent: the next frame at once is one too many, here and after a move.
    r1 = moved(s, 1.0, 1001.0)
    assert r1.heard(1001.0, frame=True) == [CloseClient(closes.TOO_MANY_FRAMES)]
    # More bytes of a frame under way cost nothing.
    r2 = moved(s, 1.0, 1001.0)
    assert r2.heard(1001.0) == []
    # A quarter of a second later, five more frames (20 a second) are allowed.
    for _ in range(5):
        assert r2.heard(1001.25, frame=True) == []
    assert r2.heard(1001.25, frame=True) == [CloseClient(closes.TOO_MANY_FRAMES)]


def test_the_join_limit_moves_with_the_session() -> None:
    # A burst of 2 joins, then one per 2 s.
    rules = SessionRules(join_limit_count=2, join_limit_window_s=4.0, ping_interval_s=0, join_timeout_s=100)
    s = Session(rules, check_token, 0.0)
    s.receive_text(auth(), 0.0)
    assert s.receive_text(join(), 1.0) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(LEAVE, 1.0) == [LeaveRoom()]
    assert s.receive_text(join(room="den"), 1.0) == [JoinRoom("den", "alice")]
    assert s.receive_text(LEAVE, 1.0) == [LeaveRoom()]
    # Moved at 1.0 onto a clock at -300: the bucket is still full.
    refused = moved(s, 1.0, -300.0)
    assert refused.receive_text(join(), -299.0) == [CloseClient(closes.JOIN_LIMITED)]
    allowed = moved(s, 1.0, -300.0)
    assert allowed.receive_text(join(), -298.0) == [JoinRoom("lobby", "alice")]
    # And a fresh session on that clock would have joined at once.
    fresh = Session(rules, check_token, -300.0)
    fresh.receive_text(auth(), -300.0)
    assert fresh.receive_text(join(), -299.0) == [JoinRoom("lobby", "alice")]


def test_a_ping_in_flight_moves_with_the_session() -> None:
    rules = SessionRules(ping_interval_s=2.0, ping_timeout_s=3.0, rate_limit_count=0)
    s = Session(rules, check_token, 0.0)
    s.receive_text(auth(), 0.0)
    s.receive_text(join(), 0.5)
    assert s.timeout(2.5) == [SendPing()]
    assert s.deadline == 5.5
    r = moved(s, 3.0, 1003.0)
    assert r.deadline == 1005.5
    assert r.timeout(1004.0) == []  # no second ping while one is out
    assert r.timeout(1005.5) == [CloseClient(closes.PING_TIMEOUT)]
    # Answered after the move: the next ping is due an interval later.
    r = moved(s, 3.0, 1003.0)
    assert r.heard(1004.0) == []
    assert r.deadline == 1006.0
    assert r.timeout(1006.0) == [SendPing()]


def test_no_ping_in_flight_and_the_keepalive_deadline_moves() -> None:
    rules = SessionRules(ping_interval_s=2.0, ping_timeout_s=3.0)
    s = Session(rules, check_token, 0.0)
    s.receive_text(auth(), 0.25)
    r = moved(s, 1.0, 101.0)
    assert r.state is State.AWAIT_JOIN
    assert r.deadline == 102.25  # the join deadline (0.25 + 2), then the ping
    assert r.timeout(102.0) == []
    assert r.timeout(102.25) == [CloseClient(closes.JOIN_TIMEOUT)]


def test_the_idle_deadline_moves_with_the_session() -> None:
    rules = SessionRules(idle_timeout_s=10.0, ping_interval_s=0, rate_limit_count=0)
    s = Session(rules, check_token, 0.0)
    s.receive_text(auth(), 0.0)
    s.receive_text(join(), 0.0)
    s.receive_text(msg(), 3.0)
    s.heard(8.0)  # alive, not active
    r = moved(s, 9.0, -41.0)
    assert r.deadline == -37.0
    assert r.timeout(-37.0) == [CloseClient(closes.IDLE_TIMEOUT)]


def test_an_awaiting_auth_session_moves_and_still_asks_its_token_check() -> None:
    s = Session(SessionRules(ping_interval_s=0), check_token, 0.0)
    r = moved(s, 0.5, 50.5)
    assert r.state is State.AWAIT_AUTH and r.deadline == 52.0
    assert r.receive_text(auth("bad"), 51.0) == [CloseClient(closes.INVALID_TOKEN)]


def test_restore_uses_the_receivers_rules() -> None:
    s = Session(SessionRules(ping_interval_s=0), check_token, 0.0)
    s.receive_text(auth(), 0.0)
    s.receive_text(join(), 0.0)
    assert s.receive_text(msg(), 1.0) == [Publish("hello")]
    assert moved(s, 1.0, 1.0).receive_text(msg(), 1.0) == [CloseClient(closes.RATE_LIMITED)]
    # A receiver with no rate limit does not apply one.
    r = moved(s, 1.0, 1.0, rules=SessionRules(rate_limit_count=0, ping_interval_s=0))
    assert r.receive_text(msg(), 1.0) == [Publish("hello")]
    # One that allows a burst of 4 in 2 s takes a second message at once;
    # its idle timeout applies from the last message.
    rules = SessionRules(rate_limit_count=4, rate_limit_window_s=2.0, ping_interval_s=0, idle_timeout_s=9.0)
    r = moved(s, 1.0, 1.0, rules=rules)
    assert r.receive_text(msg(), 1.0) == [Publish("hello")]
    assert r.deadline == 10.0


def test_the_snapshot_is_plain_values() -> None:
    s = Session(SessionRules(ping_interval_s=0), check_token, 100.0)
    s.receive_text(auth(), 100.0)
    s.receive_text(join(), 100.5)
    s.receive_text(msg(), 101.0)
    snap = s.snapshot(102.0)
    # Times relative to the snapshot's: the rate limit's bucket drains 1 s
    # after the message, the join limit's 2 s after the join, the frame
    # budget is untouched since the start.
    assert snap == ("in_room", None, -1.0, -1.0, None, "lobby", "alice", 0.0, 0.5, -2.0)
    assert through_wire(session=snap)[0] == snap


VALID = ("in_room", None, -1.0, -1.0, None, "lobby", "alice", 0.0, 0.5, -2.0)


def test_the_valid_example_restores() -> None:
    r = Session.restore(SessionRules(), check_token, VALID, 0.0)
    assert (r.state, r.room, r.username) == (State.IN_ROOM, "lobby", "alice")


def with_field(index: int, value: Any) -> tuple[Any, ...]:
    return VALID[:index] + (value,) + VALID[index + 1:]


@pytest.mark.parametrize("snapshot", [
    (),
    VALID[:-1],
    VALID + (0.0,),
    None,
    5,
    "in_room",
    with_field(0, "closed"),  # a closed session does not move
    with_field(0, "bogus"),
    with_field(0, 1),
    with_field(0, None),
    with_field(1, "soon"),
    with_field(1, [1.0]),
    with_field(2, None),
    with_field(2, "x"),
    with_field(3, (1.0,)),
    with_field(4, {}),
    with_field(5, 5),
    with_field(5, b"lobby"),
    with_field(6, 7),
    with_field(6, ("alice",)),
    with_field(7, None),
    with_field(7, (0.0,)),
    with_field(7, "x"),
    with_field(8, None),
    with_field(8, "x"),
    with_field(9, None),
    with_field(9, [1.0]),
])
def test_restore_refuses_garbage(snapshot: Any) -> None:
    with pytest.raises(ValueError):
        Session.restore(SessionRules(), check_token, snapshot, 0.0)


def test_a_closed_session_is_refused_even_through_the_wire() -> None:
    s = Session(SessionRules(), check_token, 0.0)
    s.receive_text("nope", 0.0)
    assert s.state is State.CLOSED
    with pytest.raises(ValueError, match="closed"):
        moved(s, 0.0, 0.0)


# -- frame parsers ------------------------------------------------------------------

KEY = b"\x37\xfa\x21\x3d"
MAX = 1000


def frame(opcode: int, payload: bytes, fin: bool = True, key: bytes = KEY) -> bytes:
    """A masked client frame (7, 16 or 64-bit length as needed)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    return head + key + unmask(payload, key)


def text(s: str, fin: bool = True) -> bytes:
    return frame(1, s.encode(), fin)


def drain(parser: FrameParser) -> list[object]:
    out: list[object] = []
    while (event := parser.next_event()) is not None:
        out.append(event)
    return out


def messages(events: list[object]) -> list[object]:
    """Events without signs of life (parts of messages, pongs)."""
    return [e for e in events if not isinstance(e, Heard)]


SMILE = "🙂".encode()  # 4 bytes
STREAM = (
    text("héllo wörld 🙂")
    + frame(0x9, b"ping!")
    + text("frag-", fin=False)
    + frame(0xA, b"x")
    + frame(0, "mént ".encode() + SMILE[:1], fin=False)  # a character split across fragments
    + frame(0x9, b"")
    + frame(0, SMILE[1:3], fin=False)
    + frame(0, SMILE[3:] + b"end")
    + frame(2, b"bin", fin=False)
    + frame(0xA, b"")
    + frame(0, b"ary")
    + frame(2, b"")
    + text("ç" * 70 + "🙂" * 10)  # a 16-bit length
    + frame(1, b"", fin=False)
    + frame(0, "é".encode()[:1], fin=False, key=b"\x01\x02\x03\x04")
    + frame(0, "é".encode()[1:], key=b"\xff\x00\xff\x00")
    + text("last")
)
WANT = [
    "héllo wörld 🙂", Ping(b"ping!"), "frag-mént 🙂end", BINARY, BINARY, BINARY,
    "ç" * 70 + "🙂" * 10, "é", "last",
]


def test_the_stream_parses_as_expected() -> None:
    parser = FrameParser(MAX)
    parser.feed(STREAM)
    assert messages(drain(parser)) == [*WANT[:2], Ping(b""), *WANT[2:]]


def moved_parser(parser: FrameParser, max_chars: int = MAX) -> FrameParser:
    snap = parser.snapshot()
    _, received = through_wire(frames=snap)
    restored = FrameParser.restore(max_chars, received)
    assert restored.snapshot() == snap
    return restored


@pytest.mark.parametrize("data", [STREAM, STREAM + frame(8, struct.pack("!H", 1000) + b"bye") + text("late")])
def test_a_parser_moved_at_any_cut_gives_the_same_events(data: bytes) -> None:
    whole = FrameParser(MAX)
    whole.feed(data)
    want = messages(drain(whole))
    for cut in range(len(data) + 1):
        # The reference: one parser, fed the same two pieces.
        reference = FrameParser(MAX)
        reference.feed(data[:cut])
        first = drain(reference)
        reference.feed(data[cut:])
        second = drain(reference)

        parser = FrameParser(MAX)
        parser.feed(data[:cut])
        assert drain(parser) == first, cut
        restored = moved_parser(parser)
        restored.feed(data[cut:])
        assert drain(restored) == second, cut
        assert messages(first + second) == want, cut
        assert restored.snapshot() == reference.snapshot(), cut


def test_a_parser_moved_byte_by_byte_gives_the_same_messages() -> None:
    parser = FrameParser(MAX)
    events: list[object] = []
    for i in range(len(STREAM)):
        parser.feed(STREAM[i:i + 1])
        events.extend(drain(parser))
        parser = moved_parser(parser)
    assert messages(events) == [*WANT[:2], Ping(b""), *WANT[2:]]


PIECES = [
    text(""), text("a"), text("héllo 🙂"), text("x" * 130), frame(0x9, b"p1"), frame(0xA, b""),
    frame(2, b"\x00\x01"), frame(2, b"ab", fin=False) + frame(0, b"cd"),
    text("ab", fin=False) + frame(0, "ç🙂".encode(), fin=False) + frame(0, b"z"),
    text("x", fin=False) + frame(0x9, b"mid") + frame(0, SMILE[:2], fin=False) + frame(0, SMILE[2:]),
]


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 2000), max_size=5),
    small_reads=st.booleans(),
)
def test_a_parser_moved_several_times_gives_the_same_events(
    parts: list[bytes], cuts: list[int], small_reads: bool,
) -> None:
    data = b"".join(parts)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    reference = FrameParser(MAX)
    parser = FrameParser(MAX)
    for piece in pieces:
        reference.feed(piece)
        parser.feed(piece)
        # Sometimes only part of what was read is parsed before the move.
        limit = 1 if small_reads else None
        got: list[object] = []
        while (limit is None or len(got) < limit) and (event := parser.next_event()) is not None:
            got.append(event)
        want: list[object] = []
        while len(want) < len(got) and (event := reference.next_event()) is not None:
            want.append(event)
        assert got == want
        parser = moved_parser(parser)
    assert drain(parser) == drain(reference)
    assert parser.snapshot() == reference.snapshot()


def test_a_moved_parser_counts_the_bytes_received_before_the_move() -> None:
    parser = FrameParser(10)
    parser.feed(text("a" * 6, fin=False))
    assert drain(parser) == [HEARD_FRAME]
    ok = moved_parser(parser, max_chars=10)
    ok.feed(frame(0, b"a" * 4))
    assert drain(ok) == ["a" * 10]
    too_big = moved_parser(parser, max_chars=10)
    too_big.feed(frame(0, b"a" * 5))
    assert drain(too_big) == [closes.TOO_BIG_FRAME]
    # The receiver's limit applies.
    tighter = moved_parser(parser, max_chars=8)
    tighter.feed(frame(0, b"a" * 3))
    assert drain(tighter) == [closes.TOO_BIG_FRAME]


def test_a_moved_parser_counts_the_fragments_received_before_the_move() -> None:
    parser = FrameParser(MAX)
    parser.feed(text("a", fin=False) + b"".join(frame(0, b"a", fin=False) for _ in range(MAX_FRAGMENTS - 2)))
    assert drain(parser) == [HEARD_FRAME] * (MAX_FRAGMENTS - 1)
    last = moved_parser(parser)
    last.feed(frame(0, b"a"))
    assert drain(last) == ["a" * MAX_FRAGMENTS]
    one_more = moved_parser(parser)
    one_more.feed(frame(0, b"a", fin=False) + frame(0, b"a"))
    assert drain(one_more) == [HEARD_FRAME, closes.TOO_FRAGMENTED]


def test_a_moved_parser_that_had_stopped_stays_stopped() -> None:
    parser = FrameParser(MAX)
    parser.feed(frame(8, b"") + text("late"))
    assert drain(parser) == [PeerClosed(1005, "")]
    restored = moved_parser(parser)
    restored.feed(text("more"))
    assert drain(restored) == []


def test_a_moved_parser_keeps_a_huge_binary_frame_skipping() -> None:
    parser = FrameParser(MAX)
    parser.feed(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 40) + KEY + b"x" * 100)
    assert drain(parser) == [BINARY]
    restored = moved_parser(parser)
    restored.feed(b"y" * 100)
    assert drain(restored) == [HEARD]
    assert restored.snapshot()[0] == b""  # skipped, not kept


VALID_FRAMES: tuple[Any, ...] = (b"\x81", False, 3, KEY, True, 1, (b"\xf0\x9f", 0), b"ab", 1)


def test_the_valid_frames_example_restores() -> None:
    assert FrameParser.restore(MAX, VALID_FRAMES).snapshot() == VALID_FRAMES


def frames_with(index: int, value: Any) -> tuple[Any, ...]:
    return VALID_FRAMES[:index] + (value,) + VALID_FRAMES[index + 1:]


@pytest.mark.parametrize("snapshot", [
    (),
    VALID_FRAMES[:-1],
    VALID_FRAMES + (0,),
    None,
    b"\x81",
    frames_with(0, "text"),  # the buffer must be bytes
    frames_with(0, None),
    frames_with(2, None),
    frames_with(2, "many"),
    frames_with(3, "abcd"),  # the key must be bytes
    frames_with(3, b"abc"),  # of 0 or 4 bytes
    frames_with(5, 8),  # not a data message
    frames_with(5, 0),
    frames_with(5, None),  # between messages, yet a decoder
    frames_with(5, 2),  # binary, yet a decoder
    (b"", False, 0, b"", False, 1, None, None, 0),  # text without a decoder
    frames_with(6, (b"", 0, 0)),
    frames_with(6, b"\xf0"),
    frames_with(6, (b"", "x")),
    frames_with(7, "ab"),  # the message so far must be bytes
    frames_with(7, 5),
    frames_with(8, None),
    frames_with(8, "x"),
    frames_with(8, -1),
])
def test_frame_parser_restore_refuses_garbage(snapshot: Any) -> None:
    with pytest.raises(ValueError):
        FrameParser.restore(MAX, snapshot)


def test_frame_snapshots_travel_in_an_adopt() -> None:
    _, received = through_wire(frames=VALID_FRAMES)
    assert received == VALID_FRAMES
    assert FrameParser.restore(MAX, received).snapshot() == VALID_FRAMES


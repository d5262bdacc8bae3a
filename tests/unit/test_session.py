"""garin.session: the per-connection state machine, driven with explicit `now`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import closes
from garin.closes import Close
from garin.protocol import NameLimits
from garin.session import (
    CloseClient,
    JoinRoom,
    LeaveRoom,
    Publish,
    SendPing,
    Session,
    SessionRules,
    State,
)

GOOD = "good-token"


def check_token(token: str) -> Close | None:
    if token == GOOD:
        return None
    if token == "expired":
        return closes.TOKEN_EXPIRED
    return closes.INVALID_TOKEN


def auth(token: str = GOOD) -> str:
    return json.dumps({"type": "auth", "body": token})


def join(username: str = "alice", room: str = "lobby") -> str:
    return json.dumps({"type": "join", "username": username, "room": room})


def msg(body: str = "hello") -> str:
    return json.dumps({"type": "message", "body": body})


LEAVE = '{"type":"userleave"}'


def new(now: float = 0.0, **rules: object) -> Session:
    return Session(SessionRules(**rules), check_token, now)  # type: ignore[arg-type]


def authed(now: float = 0.0, **rules: object) -> Session:
    s = new(now, **rules)
    assert s.receive_text(auth(), now) == []
    return s


def in_room(now: float = 0.0, **rules: object) -> Session:
    s = authed(now, **rules)
    assert s.receive_text(join(), now) == [JoinRoom("lobby", "alice")]
    return s


def assert_closed(s: Session, actions: list[object], close: Close) -> None:
    assert actions == [CloseClient(close)]
    assert s.state is State.CLOSED
    assert s.close == close
    assert s.deadline is None


# --- the happy path ---------------------------------------------------------------


def test_defaults() -> None:
    rules = SessionRules()
    assert (rules.auth_timeout_s, rules.join_timeout_s) == (2.0, 2.0)
    assert (rules.rate_limit_count, rules.rate_limit_window_s) == (1, 1.0)
    assert rules.names == NameLimits()
    assert rules.max_body_chars == 4096
    assert (rules.ping_interval_s, rules.ping_timeout_s) == (20.0, 20.0)
    assert rules.idle_timeout_s == 0.0
    assert (rules.join_limit_count, rules.join_limit_window_s) == (10, 20.0)


@pytest.mark.parametrize("t0", [0.0, 12345.678, -50.0, 1e9])
def test_full_lifecycle(t0: float) -> None:
    # Keepalive off: here only the state's own deadlines (keepalive below).
    s = new(t0, rate_limit_count=0, ping_interval_s=0)
    assert s.state is State.AWAIT_AUTH
    assert s.deadline == t0 + 2.0
    assert s.room is None and s.close is None

    assert s.receive_text(auth(), t0 + 1.0) == []
    assert s.state is State.AWAIT_JOIN
    assert s.deadline == t0 + 3.0

    assert s.receive_text(join("alice", "lobby"), t0 + 2.5) == [JoinRoom("lobby", "alice")]
    assert s.state is State.IN_ROOM
    assert s.deadline is None
    assert (s.room, s.username) == ("lobby", "alice")

    assert s.receive_text(msg("hi"), t0 + 3) == [Publish("hi")]
    assert s.receive_text(msg("again"), t0 + 3) == [Publish("again")]

    assert s.receive_text(LEAVE, t0 + 10) == [LeaveRoom()]
    assert s.state is State.AWAIT_JOIN
    assert s.room is None
    assert s.deadline == t0 + 12

    assert s.receive_text(join("alicia", "den"), t0 + 11) == [JoinRoom("den", "alicia")]
    assert (s.state, s.room, s.username, s.deadline) == (State.IN_ROOM, "den", "alicia", None)

    assert_closed(s, s.receive_text(msg(""), t0 + 12), closes.BYE)


@pytest.mark.parametrize(("auth_s", "join_s"), [(2.0, 2.0), (0.5, 7.0), (0.01, 0.01)])
def test_deadlines_follow_rules(auth_s: float, join_s: float) -> None:
    s = new(100.0, auth_timeout_s=auth_s, join_timeout_s=join_s)
    assert s.deadline == 100.0 + auth_s
    s.receive_text(auth(), 100.0 + auth_s / 2)
    assert s.deadline == 100.0 + auth_s / 2 + join_s


def test_message_body_is_passed_verbatim() -> None:
    s = in_room(rate_limit_count=0, max_body_chars=10_000)
    for body in [" ", "x" * 10_000, "日本 😀", '{"type":"auth"}', "\n"]:
        assert s.receive_text(msg(body), 1.0) == [Publish(body)]


def test_check_token_gets_the_token() -> None:
    seen: list[str] = []

    def check(token: str) -> Close | None:
        seen.append(token)
        return None

    s = Session(SessionRules(), check, 0.0)
    s.receive_text(auth("a.b.c"), 0.0)
    assert seen == ["a.b.c"]
    s.receive_text(join(), 0.0)
    s.receive_text(auth("again"), 0.0)
    assert seen == ["a.b.c"]  # a second auth is refused without checking it


# --- timeouts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [(0.0, None), (1.999, None), (2.0, closes.AUTH_TIMEOUT), (2.001, closes.AUTH_TIMEOUT),
     (1e9, closes.AUTH_TIMEOUT)],
)
def test_auth_timeout(at: float, expected: Close | None) -> None:
    s = new(0.0)
    actions = s.timeout(at)
    if expected is None:
        assert actions == [] and s.state is State.AWAIT_AUTH and s.deadline == 2.0
    else:
        assert_closed(s, actions, expected)


@pytest.mark.parametrize(
    ("at", "expected"),
    [(1.0, None), (2.999, None), (3.0, closes.JOIN_TIMEOUT), (50.0, closes.JOIN_TIMEOUT)],
)
def test_join_timeout_after_auth(at: float, expected: Close | None) -> None:
    s = new(0.0)
    s.receive_text(auth(), 1.0)
    actions = s.timeout(at)
    if expected is None:
        assert actions == [] and s.state is State.AWAIT_JOIN
    else:
        assert_closed(s, actions, expected)


@pytest.mark.parametrize(
    ("at", "expected"),
    [(5.0, None), (6.999, None), (7.0, closes.JOIN_TIMEOUT), (8.0, closes.JOIN_TIMEOUT)],
)
def test_join_timeout_after_userleave(at: float, expected: Close | None) -> None:
    s = in_room(0.0)
    assert s.receive_text(LEAVE, 5.0) == [LeaveRoom()]
    assert s.deadline == 7.0
    actions = s.timeout(at)
    if expected is None:
        assert actions == [] and s.state is State.AWAIT_JOIN
    else:
        assert_closed(s, actions, expected)


@pytest.mark.parametrize("at", [0.0, 2.0, 3.0, 1e12])
def test_no_timeout_in_a_room(at: float) -> None:
    s = in_room(0.0, ping_interval_s=0)
    assert s.deadline is None
    assert s.timeout(at) == []
    assert s.state is State.IN_ROOM


def test_waking_early_does_nothing() -> None:
    s = new(0.0)
    for t in (0.5, 1.0, 1.5):
        assert s.timeout(t) == []
    assert s.state is State.AWAIT_AUTH


@pytest.mark.parametrize(
    ("setup", "frame", "at", "expected"),
    [
        # A frame that arrives at or after the deadline is too late, even if
        # the shell has not woken up for the timeout yet.
        ("new", auth(), 2.0, closes.AUTH_TIMEOUT),
        ("new", auth(), 3.0, closes.AUTH_TIMEOUT),
        ("new", auth("bad"), 3.0, closes.AUTH_TIMEOUT),
        ("new", "garbage", 3.0, closes.AUTH_TIMEOUT),
        ("new", join(), 3.0, closes.AUTH_TIMEOUT),
        ("authed", join(), 2.0, closes.JOIN_TIMEOUT),
        ("authed", join(), 9.0, closes.JOIN_TIMEOUT),
        ("authed", "garbage", 9.0, closes.JOIN_TIMEOUT),
        ("authed", msg(), 9.0, closes.JOIN_TIMEOUT),
    ],
)
def test_late_frames_time_out(setup: str, frame: str, at: float, expected: Close) -> None:
    s = new(0.0) if setup == "new" else authed(0.0)
    assert_closed(s, s.receive_text(frame, at), expected)


def test_late_auth_does_not_check_the_token() -> None:
    calls: list[str] = []

    def check(token: str) -> Close | None:
        calls.append(token)
        return None

    s = Session(SessionRules(), check, 0.0)
    assert s.receive_text(auth(), 5.0) == [CloseClient(closes.AUTH_TIMEOUT)]
    assert calls == []


def test_just_in_time_frames_are_accepted() -> None:
    s = new(0.0)
    assert s.receive_text(auth(), 1.999) == []
    assert s.receive_text(join(), 3.998) == [JoinRoom("lobby", "alice")]


# --- refusals by state --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "frame", "expected"),
    [
        ("new", join(), closes.NOT_AUTHENTICATED),
        ("new", msg(), closes.NOT_AUTHENTICATED),
        ("new", msg(""), closes.NOT_AUTHENTICATED),
        ("new", LEAVE, closes.NOT_AUTHENTICATED),
        ("new", auth("bad"), closes.INVALID_TOKEN),
        ("new", auth(""), closes.INVALID_TOKEN),
        ("new", auth("expired"), closes.TOKEN_EXPIRED),
        ("authed", auth(), closes.ALREADY_AUTHENTICATED),
        ("authed", auth("bad"), closes.ALREADY_AUTHENTICATED),
        ("authed", msg(), closes.NOT_IN_ROOM),
        ("authed", msg(""), closes.NOT_IN_ROOM),
        ("authed", LEAVE, closes.NOT_IN_ROOM),
        ("room", auth(), closes.ALREADY_AUTHENTICATED),
        ("room", join(), closes.ALREADY_JOINED),
        ("room", join("bob", "other"), closes.ALREADY_JOINED),
        ("room", msg(""), closes.BYE),
        ("left", msg(), closes.NOT_IN_ROOM),
        ("left", LEAVE, closes.NOT_IN_ROOM),
        ("left", auth(), closes.ALREADY_AUTHENTICATED),
    ],
)
def test_refusals(setup: str, frame: str, expected: Close) -> None:
    s = _setup(setup)
    assert_closed(s, s.receive_text(frame, 0.5), expected)


def _setup(name: str, **rules: object) -> Session:
    if name == "new":
        return new(0.0, **rules)
    if name == "authed":
        return authed(0.0, **rules)
    s = in_room(0.0, **rules)
    if name == "left":
        assert s.receive_text(LEAVE, 0.1) == [LeaveRoom()]
    return s


@pytest.mark.parametrize("setup", ["new", "authed", "room", "left"])
@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("not json", closes.INVALID_JSON),
        ("[]", closes.NOT_AN_OBJECT),
        ('{"type":"nope"}', closes.UNKNOWN_TYPE),
        ('{"type":"message","body":1}', closes.bad_field("body", "must be a string")),
        ('{"type":"auth","body":null}', closes.bad_field("body", "must be a string")),
        (join("al", "lobby"), closes.bad_field("username", "too short")),
        (join("alice", "r" * 65), closes.bad_field("room", "too long")),
    ],
)
def test_bad_frames_close_in_every_state(setup: str, frame: str, expected: Close) -> None:
    s = _setup(setup)
    actions = s.receive_text(frame, 0.5)
    assert len(actions) == 1 and isinstance(actions[0], CloseClient)
    close = actions[0].close
    assert_closed(s, actions, close)
    if expected in (closes.INVALID_JSON, closes.NOT_AN_OBJECT, closes.UNKNOWN_TYPE):
        assert close == expected
    else:
        # A well-shaped frame with a bad field may be refused for the field or
        # for arriving in the wrong state: either way a 1008 policy close.
        assert close in (expected, closes.NOT_AUTHENTICATED, closes.NOT_IN_ROOM,
                         closes.ALREADY_AUTHENTICATED, closes.ALREADY_JOINED)
    if setup == "room" and frame.startswith('{"type":"message"'):
        assert close == expected


@pytest.mark.parametrize("setup", ["new", "authed", "room", "left"])
def test_binary_frame_closes(setup: str) -> None:
    s = _setup(setup)
    assert_closed(s, s.receive_binary(0.5), closes.BINARY_FRAME)


def test_names_follow_the_rules() -> None:
    s = authed(0.0, names=NameLimits(1, 2, 1, 2))
    assert s.receive_text(join("ab", "cd"), 0.1) == [JoinRoom("cd", "ab")]
    s = authed(0.0, names=NameLimits(1, 2, 1, 2))
    assert_closed(s, s.receive_text(join("abc", "cd"), 0.1), closes.bad_field("username", "too long"))


@pytest.mark.parametrize("setup", ["new", "authed", "room", "left"])
@pytest.mark.parametrize("close", [closes.SHUTDOWN, closes.TOO_SLOW, closes.INTERNAL])
def test_end_from_the_shell(setup: str, close: Close) -> None:
    s = _setup(setup)
    assert_closed(s, s.end(close), close)
    assert s.end(closes.SHUTDOWN) == []
    assert s.close == close


# --- closed stays closed --------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    ["timeout", "binary", "bye", "bad", "end"],
)
def test_closed_sessions_ignore_everything(how: str) -> None:
    s = in_room(0.0, rate_limit_count=0)
    if how == "timeout":
        s = new(0.0)
        first = s.timeout(5.0)
    elif how == "binary":
        first = s.receive_binary(1.0)
    elif how == "bye":
        first = s.receive_text(msg(""), 1.0)
    elif how == "bad":
        first = s.receive_text("{", 1.0)
    else:
        first = s.end(closes.SHUTDOWN)
    assert len(first) == 1 and isinstance(first[0], CloseClient)
    close = first[0].close
    for frame in [auth(), join(), msg(), msg(""), LEAVE, "{"]:
        assert s.receive_text(frame, 10.0) == []
    assert s.receive_binary(10.0) == []
    assert s.timeout(1e9) == []
    assert s.end(closes.INTERNAL) == []
    assert s.state is State.CLOSED
    assert s.close == close
    assert s.deadline is None


# --- rate limit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "window", "times", "refused_at"),
    [
        (1, 1.0, [0.0, 0.74], 1),
        (1, 1.0, [0.0, 0.5], 1),
        (1, 1.0, [0.0, 1.0], None),
        (1, 1.0, [0.0, 1.0, 2.0, 3.0, 4.5], None),
        (1, 1.0, [0.0, 1.0, 1.5], 2),
        # A message may come a quarter of the spacing early ...
        (1, 1.0, [0.0, 0.75], None),
        # ... so a sender every 1.05 s whose one message was delayed 0.2 s
        # (the next one 0.85 s after it) is not an offender ...
        (1, 1.0, [0.0, 1.25, 2.1, 3.15, 4.2], None),
        # ... but one sending faster than the limit still is, soon.
        (1, 1.0, [0.0, 0.9, 1.8, 2.7, 3.6], 3),
        (3, 1.0, [0.0, 0.1, 0.2], None),
        (3, 1.0, [0.0, 0.0, 0.0], None),
        (3, 1.0, [0.0, 0.0, 0.0, 0.0], 3),
        (3, 1.0, [0.0, 0.0, 0.0, 0.2], 3),
        (3, 1.0, [0.0, 0.1, 0.2, 1.0], None),
        (3, 1.0, [0.0, 0.1, 0.2, 1.0, 1.05], None),
        (3, 1.0, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 6),
        (3, 1.0, [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 2.0, 2.1, 2.2], None),
        (2, 1.0, [0.9, 1.1, 1.2], 2),
        (2, 10.0, [0.0, 0.0, 3.0], 2),
        (2, 10.0, [0.0, 0.0, 3.8], None),
        (2, 10.0, [0.0, 5.0, 10.0, 15.0], None),
        (5, 0.5, [0.0] * 5 + [0.5] * 5 + [1.0] * 5, None),
        (5, 0.5, [0.0] * 5 + [0.07], 5),
        (5, 0.5, [0.0] * 5 + [0.08], None),
    ],
)
def test_rate_limit(count: int, window: float, times: list[float], refused_at: int | None) -> None:
    s = in_room(0.0, rate_limit_count=count, rate_limit_window_s=window)
    for i, t in enumerate(times):
        actions = s.receive_text(msg(f"m{i}"), t)
        if i == refused_at:
            assert_closed(s, actions, closes.RATE_LIMITED)
            return
        assert actions == [Publish(f"m{i}")], i
    assert refused_at is None
    assert s.state is State.IN_ROOM


def test_rate_limit_zero_means_unlimited() -> None:
    s = in_room(0.0, rate_limit_count=0)
    for i in range(5000):
        assert s.receive_text(msg("x"), 0.0) == [Publish("x")], i


def test_rate_limit_survives_leaving_and_rejoining() -> None:
    # Otherwise userleave + join would reset the limit.
    s = in_room(0.0, rate_limit_count=1, rate_limit_window_s=1.0)
    assert s.receive_text(msg(), 0.1) == [Publish("hello")]
    assert s.receive_text(LEAVE, 0.2) == [LeaveRoom()]
    assert s.receive_text(join(), 0.3) == [JoinRoom("lobby", "alice")]
    assert_closed(s, s.receive_text(msg(), 0.4), closes.RATE_LIMITED)


def test_only_messages_count_towards_the_rate_limit() -> None:
    s = in_room(0.0, rate_limit_count=1, rate_limit_window_s=1.0)
    for t in (0.1, 0.2, 0.3):
        assert s.receive_text(LEAVE, t) == [LeaveRoom()]
        assert s.receive_text(join(), t) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(msg(), 0.4) == [Publish("hello")]


# --- join limit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "window", "times", "refused_at"),
    [
        # A burst of `count`, then one join per window / count (1 s here).
        (3, 3.0, [0.0, 0.0, 0.0], None),
        (3, 3.0, [0.0, 0.0, 0.0, 0.0], 3),
        (3, 3.0, [0.0, 0.0, 0.0, 1.0], None),
        (3, 3.0, [0.0, 0.0, 0.0, 0.9], 3),
        (3, 3.0, [0.0, 0.0, 0.0, 1.0, 1.0], 4),
        (3, 3.0, [float(t) for t in range(30)], None),
        # 0.1 s faster than that: each join eats 0.1 s of the burst's 2 s of
        # slack, and the 22nd is refused.
        (3, 3.0, [t * 0.9 for t in range(30)], 21),
        # After a quiet window the whole burst is back.
        (3, 3.0, [0.0, 0.0, 0.0, 3.0, 3.0, 3.0], None),
        (3, 3.0, [0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0], 6),
        # The defaults: 10 at once, then one every 2 s.
        (10, 20.0, [0.0] * 10 + [2.0, 4.0, 6.0], None),
        (10, 20.0, [0.0] * 10 + [1.9], 10),
        # A spacing that floats cannot hold exactly.
        (3, 1.0, [0.0, 0.0, 0.0] + [k / 3 for k in range(1, 40)], None),
        (1, 0.5, [0.0, 0.5, 1.0, 1.5], None),
        (1, 0.5, [0.0, 0.5, 0.99], 2),
    ],
)
@pytest.mark.parametrize("t0", [0.0, -1e6, 1e6, 1e7, 1e9])
def test_join_limit(count: int, window: float, times: list[float], refused_at: int | None, t0: float) -> None:
    s = authed(t0, join_limit_count=count, join_limit_window_s=window, join_timeout_s=100.0)
    for i, t in enumerate(times):
        actions = s.receive_text(join(), t0 + t)
        if i == refused_at:
            assert_closed(s, actions, closes.JOIN_LIMITED)
            return
        assert actions == [JoinRoom("lobby", "alice")], i
        assert s.receive_text(LEAVE, t0 + t) == [LeaveRoom()]
    assert refused_at is None


def test_join_limit_zero_means_unlimited() -> None:
    s = authed(0.0, join_limit_count=0)
    for i in range(2000):
        assert s.receive_text(join(), 0.0) == [JoinRoom("lobby", "alice")], i
        assert s.receive_text(LEAVE, 0.0) == [LeaveRoom()]


def test_joins_and_messages_have_separate_limits() -> None:
    # A frontend joins and chats at once: neither limit sees the other.
    s = authed(0.0, rate_limit_count=1, rate_limit_window_s=1.0, join_limit_count=2, join_limit_window_s=10.0)
    assert s.receive_text(join(), 0.0) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(msg(), 0.0) == [Publish("hello")]
    assert s.receive_text(LEAVE, 0.5) == [LeaveRoom()]
    assert s.receive_text(join(), 0.5) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(msg(), 1.0) == [Publish("hello")]
    assert s.receive_text(LEAVE, 1.5) == [LeaveRoom()]
    assert_closed(s, s.receive_text(join(), 1.5), closes.JOIN_LIMITED)


def test_a_refused_join_leaves_no_room_behind() -> None:
    s = authed(0.0, join_limit_count=1, join_limit_window_s=10.0)
    assert s.receive_text(join(), 0.0) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(LEAVE, 0.1) == [LeaveRoom()]
    assert_closed(s, s.receive_text(join(room="other"), 0.2), closes.JOIN_LIMITED)
    assert s.room is None


def test_empty_body_says_bye_even_when_over_the_limit() -> None:
    s = in_room(0.0, rate_limit_count=1)
    assert s.receive_text(msg(), 0.0) == [Publish("hello")]
    assert_closed(s, s.receive_text(msg(""), 0.1), closes.BYE)


# --- body length -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "body", "ok"),
    [
        (4096, "x" * 4096, True),
        (4096, "x" * 4097, False),
        (5, "12345", True),
        (5, "123456", False),
        # Characters, not bytes: five emoji are 20 bytes of UTF-8.
        (5, "😀" * 5, True),
        (5, "😀" * 6, False),
        (1, "x", True),
        (0, "x" * 100_000, True),
    ],
)
def test_body_length_limit(limit: int, body: str, ok: bool) -> None:
    s = in_room(0.0, max_body_chars=limit, rate_limit_count=0)
    actions = s.receive_text(msg(body), 0.1)
    if ok:
        assert actions == [Publish(body)]
    else:
        assert_closed(s, actions, closes.BODY_TOO_LONG)


def test_body_too_long_is_a_bad_field_close() -> None:
    assert closes.BODY_TOO_LONG == closes.bad_field("body", "too long") == Close(1008, "body too long")


def test_body_limit_is_not_the_name_or_token_limit() -> None:
    # Only message bodies: a long token or room is judged by its own rules.
    s = new(0.0, max_body_chars=3)
    assert s.receive_text(auth(), 0.1) == []
    assert s.receive_text(join("alice", "lobby"), 0.2) == [JoinRoom("lobby", "alice")]
    assert s.receive_text(msg("abc"), 0.3) == [Publish("abc")]


def test_empty_body_is_still_bye_and_long_body_beats_the_rate_limit() -> None:
    s = in_room(0.0, max_body_chars=3, rate_limit_count=1)
    assert s.receive_text(msg("abc"), 0.1) == [Publish("abc")]
    # Over both limits: the body is judged first (it is the frame's own fault).
    assert_closed(s, s.receive_text(msg("abcd"), 0.2), closes.BODY_TOO_LONG)
    s = in_room(0.0, max_body_chars=3)
    assert_closed(s, s.receive_text(msg(""), 0.1), closes.BYE)


# --- keepalive --------------------------------------------------------------------------


def keepalive(now: float = 0.0, interval: float = 20.0, timeout: float = 20.0, **rules: object) -> Session:
    return in_room(now, ping_interval_s=interval, ping_timeout_s=timeout, rate_limit_count=0, **rules)


def test_keepalive_pings_a_silent_member_and_drops_it_if_nothing_comes() -> None:
    s = keepalive(0.0)
    assert s.deadline == 20.0
    assert s.timeout(19.999) == []
    assert s.timeout(20.0) == [SendPing()]
    assert s.deadline == 40.0
    # One ping at a time: waking again before the answer is due sends nothing.
    assert s.timeout(20.0) == [] and s.timeout(39.999) == []
    assert_closed(s, s.timeout(40.0), closes.PING_TIMEOUT)


@pytest.mark.parametrize("answer", ["pong", "message"])
def test_any_frame_answers_a_ping(answer: str) -> None:
    s = keepalive(0.0, interval=5.0, timeout=2.0)
    assert s.timeout(5.0) == [SendPing()]
    if answer == "pong":
        assert s.heard(6.5) == []
    else:
        assert s.receive_text(msg(), 6.5) == [Publish("hello")]
    # The next ping is due an interval after that frame, not after the ping.
    assert s.deadline == 11.5
    assert s.timeout(7.0) == [] and s.timeout(11.0) == []
    assert s.timeout(11.5) == [SendPing()]
    assert s.state is State.IN_ROOM


def test_frames_keep_a_member_from_being_pinged() -> None:
    s = keepalive(0.0, interval=1.0, timeout=1.0)
    for i in range(1, 50):
        # Its own pings (heard) and messages, each within the interval.
        actions = s.heard(i * 0.9) if i % 2 else s.receive_text(msg(), i * 0.9)
        assert SendPing() not in actions
        assert s.timeout(i * 0.9 + 0.5) == []
    assert s.state is State.IN_ROOM


def test_a_late_wake_pings_late_and_times_out_from_the_ping() -> None:
    s = keepalive(0.0, interval=5.0, timeout=2.0)
    assert s.timeout(9.0) == [SendPing()]  # the shell overslept: ping now ...
    assert s.deadline == 11.0  # ... and give the peer its full timeout
    assert s.timeout(10.999) == []
    assert_closed(s, s.timeout(11.0), closes.PING_TIMEOUT)


@pytest.mark.parametrize("late", ["pong", "message"])
def test_an_answer_after_the_ping_timeout_is_too_late(late: str) -> None:
    s = keepalive(0.0, interval=5.0, timeout=2.0)
    assert s.timeout(5.0) == [SendPing()]
    actions = s.heard(7.0) if late == "pong" else s.receive_text(msg(), 7.0)
    assert_closed(s, actions, closes.PING_TIMEOUT)


def test_unsolicited_pong_just_counts_as_life() -> None:
    s = keepalive(0.0, interval=5.0, timeout=2.0)
    assert s.heard(3.0) == []
    assert s.deadline == 8.0


@pytest.mark.parametrize("setup", ["new", "authed", "room", "left"])
def test_keepalive_off_never_pings(setup: str) -> None:
    s = _setup(setup, ping_interval_s=0, join_timeout_s=1e6, auth_timeout_s=1e6)
    for t in (1.0, 100.0, 1e5):
        assert s.timeout(t) == []
        assert s.heard(t) == []
    assert s.state is not State.CLOSED
    if setup == "room":
        assert s.deadline is None


@pytest.mark.parametrize("setup", ["new", "authed", "room", "left"])
def test_keepalive_runs_in_every_state(setup: str) -> None:
    s = _setup(setup, ping_interval_s=1.0, ping_timeout_s=1.0, join_timeout_s=100, auth_timeout_s=100)
    heard = 0.0 if setup in ("new", "authed", "room") else 0.1
    assert s.deadline == heard + 1.0
    assert s.timeout(heard + 1.0) == [SendPing()]
    assert_closed(s, s.timeout(heard + 2.0), closes.PING_TIMEOUT)


def test_state_deadline_and_keepalive_take_the_earliest() -> None:
    s = new(0.0, auth_timeout_s=2.0, ping_interval_s=0.5, ping_timeout_s=10.0)
    assert s.deadline == 0.5
    assert s.timeout(0.5) == [SendPing()]
    assert s.deadline == 2.0  # the auth timeout comes before the ping's answer
    assert s.heard(1.0) == []
    assert s.deadline == 1.5
    assert s.timeout(1.5) == [SendPing()]
    assert_closed(s, s.timeout(2.0), closes.AUTH_TIMEOUT)


@pytest.mark.parametrize(
    ("auth_s", "ping_timeout_s", "close"),
    [(2.0, 10.0, closes.AUTH_TIMEOUT), (20.0, 1.0, closes.PING_TIMEOUT), (1.5, 1.0, closes.AUTH_TIMEOUT)],
)
def test_an_overslept_timeout_closes_for_the_deadline_that_passed_first(
    auth_s: float, ping_timeout_s: float, close: Close
) -> None:
    # A ping at 0.5, then the shell wakes long after both the auth deadline
    # and the ping's: the earlier decides (the state's on a tie).
    s = new(0.0, auth_timeout_s=auth_s, ping_interval_s=0.5, ping_timeout_s=ping_timeout_s)
    assert s.timeout(0.5) == [SendPing()]
    assert_closed(s, s.timeout(100.0), close)


# --- idle ---------------------------------------------------------------------------------


def idle(now: float = 0.0, after: float = 5.0, **rules: object) -> Session:
    rules.setdefault("ping_interval_s", 0)
    return in_room(now, idle_timeout_s=after, rate_limit_count=0, **rules)


def test_idle_is_off_by_default() -> None:
    s = in_room(0.0, ping_interval_s=0)
    assert s.deadline is None
    assert s.timeout(1e9) == []


def test_idle_member_is_closed() -> None:
    s = idle(1.0, after=5.0)  # joined at 1.0
    assert s.deadline == 6.0
    assert s.timeout(5.999) == []
    assert_closed(s, s.timeout(6.0), closes.IDLE_TIMEOUT)


@pytest.mark.parametrize("frame", [msg(), LEAVE])
def test_frames_reset_idle(frame: str) -> None:
    s = idle(0.0, after=5.0)
    s.receive_text(frame, 4.0)
    if frame == LEAVE:
        # Out of the room: only the join timeout applies, not idle.
        assert s.deadline == 6.0
        assert s.receive_text(join(), 5.0) == [JoinRoom("lobby", "alice")]
        assert s.deadline == 10.0
    else:
        assert s.deadline == 9.0
    assert s.timeout(8.999) == []


def test_pings_and_pongs_do_not_reset_idle() -> None:
    s = idle(0.0, after=5.0, ping_interval_s=1.0, ping_timeout_s=1.0)
    t = 0.0
    for _ in range(100):  # bounded: a bug must fail this test, not hang it
        if s.state is State.CLOSED:
            break
        t = s.deadline
        assert t is not None
        actions = s.timeout(t)
        if actions == [SendPing()]:
            assert s.heard(t + 0.5) == []  # a perfect peer answers every ping
    assert s.close == closes.IDLE_TIMEOUT
    assert t == 5.0


def test_idle_applies_only_in_a_room() -> None:
    s = authed(0.0, idle_timeout_s=0.5, join_timeout_s=2.0, ping_interval_s=0)
    assert s.deadline == 2.0
    assert s.timeout(1.0) == []
    assert_closed(s, s.timeout(2.0), closes.JOIN_TIMEOUT)


def test_a_message_after_the_idle_deadline_is_too_late() -> None:
    s = idle(0.0, after=5.0)
    assert_closed(s, s.receive_text(msg(), 5.0), closes.IDLE_TIMEOUT)


@pytest.mark.parametrize(
    ("idle_s", "wake", "expected"),
    [
        # Ping at 10, unanswered by 15; idle at 12: idle passed first.
        (12.0, 20.0, closes.IDLE_TIMEOUT),
        # Idle at 20: the ping timeout (15) passed first.
        (20.0, 30.0, closes.PING_TIMEOUT),
        # Both at 15: keepalive wins the tie (a dead peer is the likelier truth).
        (15.0, 15.0, closes.PING_TIMEOUT),
    ],
)
def test_the_deadline_that_passed_first_decides(idle_s: float, wake: float, expected: Close) -> None:
    s = idle(0.0, after=idle_s, ping_interval_s=10.0, ping_timeout_s=5.0)
    assert s.timeout(10.0) == [SendPing()]
    assert_closed(s, s.timeout(wake), expected)


# --- properties ---------------------------------------------------------------------

FRAMES = st.one_of(
    st.sampled_from(
        [auth(), auth("bad"), auth("expired"), join(), join("bob", "den"), join("x", "lobby"),
         msg(), msg(""), LEAVE, "{", "[]", '{"type":"zzz"}', '{"type":"message"}']
    ),
    st.builds(msg, st.text(max_size=20)),
    st.builds(join, st.text(max_size=6), st.text(max_size=6)),
    st.text(max_size=40),
)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["text", "text", "text", "heard", "binary", "timeout", "timeout", "end"]),
        FRAMES,
        # Mostly short steps, so that several happen within one timer.
        st.one_of(st.sampled_from([0.0, 0.005, 0.05, 0.1, 0.25, 0.4]), st.floats(0.0, 3.0, allow_nan=False)),
    ),
    max_size=30,
)
RULES = st.builds(
    SessionRules,
    auth_timeout_s=st.sampled_from([0.01, 0.5, 2.0]),
    join_timeout_s=st.sampled_from([0.01, 0.5, 2.0]),
    rate_limit_count=st.integers(0, 3),
    rate_limit_window_s=st.sampled_from([0.001, 0.5, 1.0, 5.0]),
    names=st.just(NameLimits()),
    max_body_chars=st.sampled_from([0, 1, 5, 4096]),
    ping_interval_s=st.sampled_from([0.0, 0.3, 1.0, 20.0]),
    ping_timeout_s=st.sampled_from([0.01, 0.5, 2.0]),
    idle_timeout_s=st.sampled_from([0.0, 0.2, 1.5]),
    join_limit_count=st.integers(0, 3),
    join_limit_window_s=st.sampled_from([0.001, 1.0, 10.0]),
)
# Where a run starts: most interesting rules only apply once in a room, and
# random frames rarely get there on their own.
STARTS = st.sampled_from(["new", "authed", "room"])


@settings(max_examples=300, deadline=None)
@given(rules=RULES, start=STARTS, steps=STEPS, t0=st.floats(-1e6, 1e6, allow_nan=False))
def test_session_never_raises_and_stays_closed(
    rules: SessionRules, start: str, steps: list[tuple[str, str, float]], t0: float
) -> None:
    s = Session(rules, check_token, t0)
    if start != "new":
        assert s.receive_text(auth(), t0) == []
    if start == "room":
        assert s.receive_text(join(), t0) == [JoinRoom("lobby", "alice")]
    now = t0
    closed_with: Close | None = None
    # A model of the timers, kept by hand: the auth/join deadline, the last
    # frame of any kind, the last text frame, and the ping in flight.
    heard_at = sent_at = t0
    ping_at: float | None = None
    state_deadline: float | None = None if start == "room" else t0 + (
        rules.auth_timeout_s if start == "new" else rules.join_timeout_s
    )
    for kind, frame, dt in steps:
        now += dt
        state_before = s.state
        if kind == "text":
            actions = s.receive_text(frame, now)
        elif kind == "heard":
            actions = s.heard(now)
        elif kind == "binary":
            actions = s.receive_binary(now)
        elif kind == "timeout":
            actions = s.timeout(now)
        else:
            actions = s.end(closes.SHUTDOWN)

        if closed_with is not None:
            assert actions == []
            assert s.state is State.CLOSED and s.close == closed_with and s.deadline is None
            continue

        assert all(isinstance(a, (JoinRoom, Publish, LeaveRoom, SendPing, CloseClient)) for a in actions)
        assert len(actions) <= 1
        if actions and isinstance(actions[-1], CloseClient):
            close = actions[-1].close
            assert isinstance(close, Close)
            assert 1000 <= close.code <= 4999
            assert close.reason
            assert s.state is State.CLOSED and s.close == close and s.deadline is None
            # Timers never fire early, and when several have passed (the shell
            # overslept, or a frame came late), the one that passed first decides.
            timers: dict[Close, float] = {}
            if state_deadline is not None:
                late = closes.AUTH_TIMEOUT if state_before is State.AWAIT_AUTH else closes.JOIN_TIMEOUT
                timers[late] = state_deadline
            if ping_at is not None:
                timers[closes.PING_TIMEOUT] = ping_at + rules.ping_timeout_s
            if state_before is State.IN_ROOM and rules.idle_timeout_s > 0:
                timers[closes.IDLE_TIMEOUT] = sent_at + rules.idle_timeout_s
            passed = {c: t for c, t in timers.items() if t <= now}
            if kind in ("text", "heard", "timeout") and passed:
                assert close in passed and passed[close] == min(passed.values())
            else:
                assert close not in timers
            closed_with = close
            continue
        assert s.state is not State.CLOSED and s.close is None

        if actions == [SendPing()]:
            assert kind == "timeout" and ping_at is None and rules.ping_interval_s > 0
            assert now >= heard_at + rules.ping_interval_s
            ping_at = now
        if kind in ("text", "heard"):
            heard_at, ping_at = now, None
        if kind == "text":
            sent_at = now
        if s.state is not state_before:
            state_deadline = None if s.state is State.IN_ROOM else now + rules.join_timeout_s

        # The deadline is the earliest pending one, and it lies ahead.
        expected: list[float] = []
        if ping_at is not None:
            expected.append(ping_at + rules.ping_timeout_s)
        elif rules.ping_interval_s > 0:
            expected.append(heard_at + rules.ping_interval_s)
        if s.state is State.IN_ROOM:
            assert s.room is not None
            if rules.idle_timeout_s > 0:
                expected.append(sent_at + rules.idle_timeout_s)
        else:
            assert s.room is None
        deadline = s.deadline
        if s.state is State.IN_ROOM:
            assert deadline == min(expected, default=None)
        else:
            assert state_deadline is not None
            assert deadline == min(expected + [state_deadline])
        assert deadline is None or deadline > now
        for action in actions:
            if isinstance(action, JoinRoom):
                assert s.state is State.IN_ROOM and s.room == action.room
            elif isinstance(action, Publish):
                assert s.state is State.IN_ROOM and action.body
                assert rules.max_body_chars == 0 or len(action.body) <= rules.max_body_chars
            elif isinstance(action, LeaveRoom):
                assert s.state is State.AWAIT_JOIN


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(0.01, 100.0),
    timeout=st.floats(0.01, 100.0),
    answers=st.lists(st.floats(0.0, 0.999), max_size=20),
    t0=st.floats(-1e6, 1e6),
)
def test_a_peer_that_answers_in_time_is_only_dropped_when_it_stops(
    interval: float, timeout: float, answers: list[float], t0: float
) -> None:
    """A shell that always wakes at `deadline`, and a peer that answers each ping
    within the timeout (as a fraction of it) until it stops answering."""
    s = keepalive(t0, interval=interval, timeout=timeout)
    for fraction in answers:
        ping_at = s.deadline
        assert ping_at is not None
        assert s.timeout(ping_at) == [SendPing()]
        answered_at = ping_at + fraction * timeout
        if answered_at >= ping_at + timeout:
            break  # rounding: no longer "within the timeout"
        assert s.heard(answered_at) == []
        assert s.deadline == answered_at + interval
    # It stops answering: pinged (unless a ping is already out), then dropped.
    ping_at = s.deadline
    assert ping_at is not None
    actions = s.timeout(ping_at)
    if actions == [SendPing()]:
        dropped_at = s.deadline
        assert dropped_at == ping_at + timeout
        actions = s.timeout(dropped_at)
    assert_closed(s, actions, closes.PING_TIMEOUT)


# -- the frame budget ------------------------------------------------------------

from garin.session import FRAME_BURST, FRAMES_PER_S  # noqa: E402


@pytest.mark.parametrize("make", [authed, in_room])
def test_frames_past_the_budget_close_the_connection(make: object) -> None:
    s = make()  # type: ignore[operator]
    for _ in range(FRAME_BURST):
        assert s.heard(1.0, frame=True) == []
    assert s.heard(1.0, frame=True) == [CloseClient(closes.TOO_MANY_FRAMES)]


def test_the_frame_budget_refills_and_progress_within_a_frame_is_free() -> None:
    s = in_room()
    for _ in range(FRAME_BURST):
        assert s.heard(1.0, frame=True) == []
    assert s.heard(1.0) == []  # more bytes of a frame: not a frame
    # One more frame is allowed every 1 / FRAMES_PER_S seconds.
    now = 1.0
    for _ in range(50):
        now += 1 / FRAMES_PER_S
        assert s.heard(now, frame=True) == []
    assert s.heard(now, frame=True) == [CloseClient(closes.TOO_MANY_FRAMES)]


def test_a_keepalive_client_never_runs_out_of_frames() -> None:
    s = in_room(idle_timeout_s=0)
    for n in range(1000):
        assert s.heard(n * 0.5, frame=True) == []  # a pong twice a second: far above any keepalive

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


@pytest.mark.parametrize("t0", [0.0, 12345.678, -50.0, 1e9])
def test_full_lifecycle(t0: float) -> None:
    s = new(t0, rate_limit_count=0)
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
    s = in_room(rate_limit_count=0)
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
    s = in_room(0.0)
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


def _setup(name: str) -> Session:
    if name == "new":
        return new(0.0)
    if name == "authed":
        return authed(0.0)
    s = in_room(0.0)
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
        (1, 1.0, [0.0, 0.999], 1),
        (1, 1.0, [0.0, 0.5], 1),
        (1, 1.0, [0.0, 1.0], None),
        (1, 1.0, [0.0, 1.0, 2.0, 3.0, 4.5], None),
        (1, 1.0, [0.0, 1.0, 1.5], 2),
        (3, 1.0, [0.0, 0.1, 0.2], None),
        (3, 1.0, [0.0, 0.0, 0.0], None),
        (3, 1.0, [0.0, 0.0, 0.0, 0.0], 3),
        (3, 1.0, [0.0, 0.1, 0.2, 0.3], 3),
        (3, 1.0, [0.0, 0.1, 0.2, 1.0], None),
        # The window slides: 1.05 - 0.1 < 1 s, so 0.1, 0.2, 1.0 and 1.05 is four.
        (3, 1.0, [0.0, 0.1, 0.2, 1.0, 1.05], 4),
        (3, 1.0, [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 2.0, 2.1, 2.2], None),
        # Not a fixed per-second bucket: 0.9 and 1.1 are in one window.
        (2, 1.0, [0.9, 1.1, 1.2], 2),
        (2, 10.0, [0.0, 5.0, 9.9], 2),
        (2, 10.0, [0.0, 5.0, 10.0, 15.0], None),
        (5, 0.5, [0.0] * 5 + [0.5] * 5 + [1.0] * 5, None),
        (5, 0.5, [0.0] * 5 + [0.49], 5),
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


def test_empty_body_says_bye_even_when_over_the_limit() -> None:
    s = in_room(0.0, rate_limit_count=1)
    assert s.receive_text(msg(), 0.0) == [Publish("hello")]
    assert_closed(s, s.receive_text(msg(""), 0.1), closes.BYE)


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
        st.sampled_from(["text", "text", "text", "binary", "timeout", "end"]),
        FRAMES,
        st.floats(0.0, 3.0, allow_nan=False),
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
)


@settings(max_examples=200, deadline=None)
@given(rules=RULES, steps=STEPS, t0=st.floats(-1e6, 1e6, allow_nan=False))
def test_session_never_raises_and_stays_closed(
    rules: SessionRules, steps: list[tuple[str, str, float]], t0: float
) -> None:
    s = Session(rules, check_token, t0)
    now = t0
    closed_with: Close | None = None
    for kind, frame, dt in steps:
        now += dt
        if kind == "text":
            actions = s.receive_text(frame, now)
        elif kind == "binary":
            actions = s.receive_binary(now)
        elif kind == "timeout":
            actions = s.timeout(now)
        else:
            actions = s.end(closes.SHUTDOWN)

        if closed_with is not None:
            assert actions == []
            assert s.state is State.CLOSED and s.close == closed_with
            continue

        assert all(isinstance(a, (JoinRoom, Publish, LeaveRoom, CloseClient)) for a in actions)
        assert len(actions) <= 1
        if actions and isinstance(actions[-1], CloseClient):
            close = actions[-1].close
            assert isinstance(close, Close)
            assert 1000 <= close.code <= 4999
            assert close.reason
            assert s.state is State.CLOSED and s.close == close and s.deadline is None
            closed_with = close
            continue
        assert s.state is not State.CLOSED and s.close is None
        # Deadlines exist exactly in the waiting states, and lie ahead.
        if s.state is State.IN_ROOM:
            assert s.deadline is None and s.room is not None
        else:
            assert s.deadline is not None and s.deadline > now
            assert s.room is None
        for action in actions:
            if isinstance(action, JoinRoom):
                assert s.state is State.IN_ROOM and s.room == action.room
            elif isinstance(action, Publish):
                assert s.state is State.IN_ROOM and action.body
            elif isinstance(action, LeaveRoom):
                assert s.state is State.AWAIT_JOIN

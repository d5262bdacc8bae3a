"""The GarinChat client protocol, proved against real `garin run` processes.

Most tests share one 4-shard server (see conftest) and use their own rooms.
Ordering facts used to avoid sleeps: a shard orders each room's events and the
single router's link to a shard is one ordered stream, so if a member gets
event Y, it already got every earlier event of that room meant for it. To show
"X was NOT delivered" we therefore send a later marker and check the marker is
the next frame; `expect_quiet` (a short settle) is used only across rooms.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from garin.routing import shard_for

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import (
    ALLOWED_ORIGIN,
    AUTH_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    SHARDS,
    USERLEAVE,
    Clients,
    GarinServer,
    ServerFactory,
    abort,
    auth_frame,
    bad_token,
    expect_close,
    expect_join,
    expect_message,
    expect_quiet,
    expect_userleave,
    join_frame,
    members,
    message_frame,
    new_room,
    new_user,
    recv_json,
    room_on,
    running_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hard_cap")]

POLICY = 1008


# -- join ------------------------------------------------------------------------


@pytest.mark.parametrize("shard", range(SHARDS))
def test_join_broadcast_reaches_everyone_with_exact_counts(clients: Clients, shard: int) -> None:
    room = room_on(shard)
    joined: list[tuple[str, ClientConnection]] = []
    for n in range(1, 6):
        name = new_user(f"j{n}")
        ws = clients.join(name, room)  # consumes its own broadcast ...
        joined.append((name, ws))
        # ... which the helper checked by name; check the exact frame for all.
        for _, member in joined[:-1]:
            assert recv_json(member) == {"type": "join", "username": name, "totalUsers": n}
    # The newest member got exactly one frame (its own join); the others got
    # one join per later arrival and nothing else.
    expect_quiet([ws for _, ws in joined], settle=0.2)


def test_joiner_own_broadcast_is_exact(clients: Clients) -> None:
    room = new_room()
    ws = clients.authed("alice-" + new_user())
    ws.send(join_frame("ålîçé 👋", room))
    assert recv_json(ws) == {"type": "join", "username": "ålîçé 👋", "totalUsers": 1}


def test_names_at_the_length_limits_are_accepted(clients: Clients) -> None:
    # Defaults: usernames 3..32, rooms 3..64 characters (characters, not bytes).
    for username, room in [
        ("abc", "r" + new_user()[:2]),
        ("u" * 32, ("q" * 52) + new_user()[2:]),
        ("🙂🙂🙂", "🚪" + new_user()),
    ]:
        assert 3 <= len(room) <= 64
        ws = clients.authed(username)
        ws.send(join_frame(username, room))
        assert recv_json(ws) == {"type": "join", "username": username, "totalUsers": 1}
    room64 = ("z" * 50) + new_user()[:14].ljust(14, "z")
    assert len(room64) == 64
    ws = clients.authed("edge")
    ws.send(join_frame("edge", room64))
    assert recv_json(ws) == {"type": "join", "username": "edge", "totalUsers": 1}


# -- messages ----------------------------------------------------------------------

BODIES = {
    "ascii": "hello, room",
    "unicode": "grüße, ça va? Ελληνικά, 日本語, עברית",
    "emoji": "👋🏽 family: 👨‍👩‍👧‍👦 flag: 🇺🇦 ok",
    "quotes": "she said \"hi\" and 'bye' \\o/ `tick`",
    "newlines": "line one\nline two\r\n\ttabbed\n",
    "json-lookalike": '{"type":"join","username":"evil","totalUsers":99}',
    "control": "nul\u0000bell\u0007esc\u001b del\u007f",
    "html": "<script>alert('x')</script> &amp; </br>",
    "one-char": "x",
    "spaces": "   ",
    "long": "long " * 700,
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_message_reaches_everyone_but_the_sender_verbatim(clients: Clients, body: str) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b), (c, ws_c) = members(clients, room, 3)
    ws_a.send(message_frame(body))
    for ws in (ws_b, ws_c):
        got = recv_json(ws)
        assert got == {"type": "message", "username": a, "body": body}
        assert list(got) == ["type", "username", "body"]
    # The sender gets nothing: B's later message is A's very next frame
    # (an echo of A's own message would have come first).
    ws_b.send(message_frame("marker"))
    expect_message(ws_a, b, "marker")
    expect_message(ws_c, b, "marker")
    expect_quiet([ws_a, ws_b, ws_c], settle=0.1)


def test_message_username_comes_from_the_join_not_the_frame(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    # Unknown extra fields are ignored; a "username" in a message cannot spoof.
    ws_a.send(json.dumps({"type": "message", "body": "hi", "username": "mallory", "extra": [1, 2]}))
    expect_message(ws_b, a, "hi")


def test_message_frame_at_the_size_limit_is_relayed(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    overhead = len(message_frame(""))
    body = "y" * (MAX_MESSAGE_BYTES - overhead)
    frame = message_frame(body)
    assert len(frame) == MAX_MESSAGE_BYTES
    ws_a.send(frame)
    expect_message(ws_b, a, body)


def test_fragmented_message_is_reassembled(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    frame = message_frame("pieces: ünïcödé 👋 across fragments")
    ws_a.send([frame[:7], frame[7:20], frame[20:]])
    expect_message(ws_b, a, "pieces: ünïcödé 👋 across fragments")


# -- leaving -----------------------------------------------------------------------


@pytest.mark.parametrize("shard", range(SHARDS))
def test_userleave_keeps_the_connection_and_allows_joining_another_shard(clients: Clients, shard: int) -> None:
    first, second = room_on(shard), room_on((shard + 1) % SHARDS)
    assert shard_for(first, SHARDS) != shard_for(second, SHARDS)
    (a, ws_a), (b, ws_b), (c, ws_c) = members(clients, first, 3)
    (d, ws_d), = members(clients, second, 1, prefix="d")

    ws_a.send(USERLEAVE)
    expect_userleave(ws_b, a, 2)
    expect_userleave(ws_c, a, 2)

    # Still open: A joins a room on another shard and gets that room's events.
    ws_a.send(join_frame(a, second))
    expect_join(ws_a, a, 2)
    expect_join(ws_d, a, 2)
    ws_d.send(message_frame("from d"))
    expect_message(ws_a, d, "from d")
    ws_a.send(message_frame("from a"))
    expect_message(ws_d, a, "from a")

    # ... and none of the old room's: B's message reaches C but not A
    # (D's later marker is A's next frame).
    ws_b.send(message_frame("old room"))
    expect_message(ws_c, b, "old room")
    ws_d.send(message_frame("marker"))
    expect_message(ws_a, d, "marker")

    # The old room counts only B and C now.
    e = new_user("e")
    ws_e = clients.join(e, first, total=3)
    expect_join(ws_b, e, 3)
    expect_join(ws_c, e, 3)
    expect_quiet([ws_a, ws_b, ws_c, ws_d, ws_e], settle=0.1)


def test_userleave_then_rejoin_the_same_room(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    ws_a.send(USERLEAVE)
    expect_userleave(ws_b, a, 1)
    ws_a.send(join_frame(a, room))
    expect_join(ws_a, a, 2)
    expect_join(ws_b, a, 2)
    ws_b.send(message_frame("welcome back"))
    expect_message(ws_a, b, "welcome back")


def test_userleave_with_a_new_name(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    ws_a.send(USERLEAVE)
    expect_userleave(ws_b, a, 1)
    renamed = new_user("renamed")
    ws_a.send(join_frame(renamed, room))
    expect_join(ws_a, renamed, 2)
    expect_join(ws_b, renamed, 2)
    ws_a.send(message_frame("new me"))
    expect_message(ws_b, renamed, "new me")


def _depart(kind: str, ws: ClientConnection) -> None:
    """Make the member on `ws` leave its room in one of the ways a member can."""
    if kind == "userleave":
        ws.send(USERLEAVE)
    elif kind == "empty-body":
        ws.send(message_frame(""))
        expect_close(ws, 1000, "bye")
    elif kind == "client-close":
        ws.close()
    elif kind == "abrupt":
        abort(ws)
    elif kind == "rule-break":
        ws.send("this is not json")
        expect_close(ws, POLICY, "invalid json")
    else:
        raise AssertionError(kind)


DEPARTURES = ["userleave", "empty-body", "client-close", "abrupt", "rule-break"]


@pytest.mark.parametrize("kind", DEPARTURES)
def test_userleave_broadcast_when_a_member_departs(clients: Clients, kind: str) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b), (c, ws_c), (d, ws_d) = members(clients, room, 4)
    _depart(kind, ws_b)
    for ws in (ws_a, ws_c, ws_d):
        expect_userleave(ws, b, 3)
    _depart(kind, ws_c)
    for ws in (ws_a, ws_d):
        expect_userleave(ws, c, 2)
    # The room goes on for those who stayed.
    ws_a.send(message_frame("still here"))
    expect_message(ws_d, a, "still here")
    ws_e = clients.join(new_user("e"), room, total=3)
    assert recv_json(ws_a)["totalUsers"] == 3
    assert recv_json(ws_d)["totalUsers"] == 3
    expect_quiet([ws_a, ws_d, ws_e], settle=0.1)


@pytest.mark.parametrize("kind", ["userleave", "empty-body", "client-close", "abrupt"])
def test_empty_room_is_dropped(clients: Clients, kind: str) -> None:
    room = new_room()
    shard = shard_for(room, SHARDS)
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    _depart(kind, ws_a)
    expect_userleave(ws_b, a, 1)
    _depart(kind, ws_b)
    # Make sure the router has passed B's leave on before the next join.
    if kind == "userleave":
        # The router handles B's frames in order and its link to the shard is
        # ordered: once B's join elsewhere on that shard is answered, its
        # leave was applied.
        ws_b.send(join_frame(b, room_on(shard)))
        expect_join(ws_b, b, 1)
    elif kind == "abrupt":
        time.sleep(0.5)  # nothing to wait on: the router notices the EOF
    clients.join(new_user("fresh"), room, total=1)


def test_room_emptied_by_userleave_restarts_its_count(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), = members(clients, room, 1)
    for round_ in range(3):
        ws_a.send(USERLEAVE)
        ws_a.send(join_frame(a, room))
        expect_join(ws_a, a, 1)


# -- rooms never leak ---------------------------------------------------------------


@pytest.mark.cap(40)
def test_rooms_never_leak_across_many_rooms_and_all_shards(clients: Clients) -> None:
    rooms = [room_on(i % SHARDS, "leak") for i in range(24)]
    assert {shard_for(r, SHARDS) for r in rooms} == set(range(SHARDS))
    per_room: dict[str, list[tuple[str, ClientConnection]]] = {}
    for i, room in enumerate(rooms):
        # Rooms of different sizes: 2, 3 or 4 members.
        per_room[room] = members(clients, room, 2 + i % 3, prefix=f"r{i}-")
    for room, group in per_room.items():
        for name, ws in group:
            ws.send(message_frame(f"{room}|{name}"))
    for room, group in per_room.items():
        for name, ws in group:
            expected = sorted(f"{room}|{other}" for other, _ in group if other != name)
            got = []
            for _ in expected:
                frame = recv_json(ws)
                assert frame["type"] == "message", frame
                assert frame["body"].startswith(room + "|"), f"{name} in {room} got {frame}"
                assert frame["body"] == f"{room}|{frame['username']}", frame
                got.append(frame["body"])
            assert sorted(got) == expected
    expect_quiet([ws for group in per_room.values() for _, ws in group], settle=0.3)


# -- closes: timeouts ---------------------------------------------------------------


def test_auth_timeout(clients: Clients) -> None:
    ws = clients.open()
    took = expect_close(ws, POLICY, "auth timeout", timeout=AUTH_TIMEOUT_S + 3)
    assert took >= AUTH_TIMEOUT_S * 0.8, f"closed after {took:.2f} s, before the auth timeout"


def test_join_timeout_after_auth(clients: Clients) -> None:
    ws = clients.open()
    time.sleep(AUTH_TIMEOUT_S * 0.6)
    ws.send(auth_frame(clients.server.token(new_user())))  # in time for auth ...
    took = expect_close(ws, POLICY, "join timeout", timeout=JOIN_TIMEOUT_S + 3)
    # ... and the join timeout counts from the auth, not from connecting.
    assert took >= JOIN_TIMEOUT_S * 0.8, f"closed {took:.2f} s after auth"


def test_join_timeout_after_userleave(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    ws_a.send(USERLEAVE)
    expect_userleave(ws_b, a, 1)
    took = expect_close(ws_a, POLICY, "join timeout", timeout=JOIN_TIMEOUT_S + 3)
    assert took >= JOIN_TIMEOUT_S * 0.5
    expect_quiet([ws_b], settle=0.1)


def test_a_member_in_a_room_is_not_timed_out(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    time.sleep(max(AUTH_TIMEOUT_S, JOIN_TIMEOUT_S) + 0.5)
    ws_a.send(message_frame("still here"))
    expect_message(ws_b, a, "still here")
    ws_b.send(message_frame("me too"))
    expect_message(ws_a, b, "me too")


# -- closes: every rule break ---------------------------------------------------------

Stage = str  # "connected" | "authed" | "joined"
Frame = str | bytes | Callable[[GarinServer], str]


def _at_stage(clients: Clients, stage: Stage) -> ClientConnection:
    if stage == "connected":
        return clients.open()
    if stage == "authed":
        return clients.authed()
    assert stage == "joined"
    return clients.join(new_user(), new_room())


def _valid_auth(server: GarinServer) -> str:
    return auth_frame(server.token(new_user()))


CASES: list[tuple[str, Stage, Frame, int, str | None]] = [
    # order of the conversation
    ("join-before-auth", "connected", join_frame("alice", "lobby"), POLICY, "not authenticated"),
    ("message-before-auth", "connected", message_frame("hi"), POLICY, "not authenticated"),
    ("empty-message-before-auth", "connected", message_frame(""), POLICY, "not authenticated"),
    ("userleave-before-auth", "connected", USERLEAVE, POLICY, "not authenticated"),
    ("message-before-join", "authed", message_frame("hi"), POLICY, "not in a room"),
    ("empty-message-before-join", "authed", message_frame(""), POLICY, "not in a room"),
    ("userleave-before-join", "authed", USERLEAVE, POLICY, "not in a room"),
    ("second-auth", "authed", _valid_auth, POLICY, "already authenticated"),
    ("second-auth-bad-token", "authed", auth_frame("garbage"), POLICY, "already authenticated"),
    ("second-auth-in-room", "joined", _valid_auth, POLICY, "already authenticated"),
    ("second-join", "joined", join_frame("someone", "elsewhere"), POLICY, "already joined"),
    # unknown or missing type
    *[
        (f"unknown-type-{name}-{stage}", stage, frame, POLICY, "unknown type")
        for stage in ("connected", "authed", "joined")
        for name, frame in [
            ("nope", '{"type":"nope"}'),
            ("case", '{"type":"Message","body":"x"}'),
            ("missing", '{"body":"x"}'),
            ("empty-object", "{}"),
            ("number", '{"type":5}'),
            ("null", '{"type":null}'),
            ("list", '{"type":["auth"]}'),
        ]
    ],
    # not JSON
    *[
        (f"invalid-json-{name}-{stage}", stage, frame, POLICY, "invalid json")
        for stage in ("connected", "joined")
        for name, frame in [
            ("text", "hello"),
            ("empty", ""),
            ("truncated", '{"type":"auth"'),
            ("single-quotes", "{'type': 'auth'}"),
            ("trailing-comma", '{"type":"auth","body":"x",}'),
            ("two-objects", '{"type":"userleave"}{"type":"userleave"}'),
        ]
    ],
    # JSON, not an object
    *[
        (f"not-object-{name}-{stage}", stage, frame, POLICY, "not a json object")
        for stage in ("connected", "joined")
        for name, frame in [
            ("array", '[{"type":"auth","body":"x"}]'),
            ("number", "42"),
            ("string", '"auth"'),
            ("null", "null"),
            ("true", "true"),
        ]
    ],
    # fields of the wrong type
    *[
        (f"auth-body-{name}", "connected", json.dumps({"type": "auth", **value}), POLICY, "body must be a string")
        for name, value in [("int", {"body": 1}), ("null", {"body": None}), ("missing", {}),
                            ("list", {"body": ["a.b.c"]}), ("object", {"body": {}}), ("bool", {"body": True})]
    ],
    *[
        (f"join-username-{name}", "authed", json.dumps({"type": "join", "room": "lobby", **value}), POLICY,
         "username must be a string")
        for name, value in [("int", {"username": 123}), ("null", {"username": None}), ("missing", {}),
                            ("list", {"username": ["bob"]})]
    ],
    *[
        (f"join-room-{name}", "authed", json.dumps({"type": "join", "username": "bob", **value}), POLICY,
         "room must be a string")
        for name, value in [("int", {"room": 7}), ("null", {"room": None}), ("missing", {}),
                            ("object", {"room": {"name": "lobby"}})]
    ],
    ("join-both-wrong", "authed", json.dumps({"type": "join", "username": 1, "room": 2}), POLICY,
     "username must be a string"),
    *[
        (f"message-body-{name}", "joined", json.dumps({"type": "message", **value}), POLICY, "body must be a string")
        for name, value in [("int", {"body": 0}), ("null", {"body": None}), ("missing", {}),
                            ("bool", {"body": False}), ("list", {"body": []})]
    ],
    # name lengths (defaults: 3..32 and 3..64 characters)
    ("username-empty", "authed", join_frame("", "lobby"), POLICY, "username too short"),
    ("username-too-short", "authed", join_frame("ab", "lobby"), POLICY, "username too short"),
    ("username-too-long", "authed", join_frame("u" * 33, "lobby"), POLICY, "username too long"),
    ("room-empty", "authed", join_frame("bob", ""), POLICY, "room too short"),
    ("room-too-short", "authed", join_frame("bob", "ab"), POLICY, "room too short"),
    ("room-too-long", "authed", join_frame("bob", "r" * 65), POLICY, "room too long"),
    ("emoji-room-too-short", "authed", join_frame("bob", "🚪🚪"), POLICY, "room too short"),
    ("both-too-short", "authed", join_frame("ab", "cd"), POLICY, "username too short"),
    # transport rules
    *[
        (f"binary-{stage}", stage, b'{"type":"auth","body":"x"}', 1003, "binary frames not supported")
        for stage in ("connected", "authed", "joined")
    ],
    *[
        (f"too-big-{stage}", stage, "x" * (MAX_MESSAGE_BYTES + 1), 1009, "message too big")
        for stage in ("connected", "authed", "joined")
    ],
    ("too-big-valid-message", "joined", message_frame("z" * MAX_MESSAGE_BYTES), 1009, "message too big"),
]


@pytest.mark.parametrize(("stage", "frame", "code", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_break_closes(clients: Clients, stage: Stage, frame: Frame, code: int, reason: str) -> None:
    ws = _at_stage(clients, stage)
    if callable(frame):
        frame = frame(clients.server)
    ws.send(frame)
    expect_close(ws, code, reason)


def _token_cases() -> list[tuple[str, Callable[[GarinServer], str], str]]:
    other_secret = "another-secret-that-is-long-enough-for-hs256-and-hs512-keys-0123456789"
    now = int(time.time())
    return [
        ("bad-signature", lambda s: bad_token(other_secret, "alice"), "invalid token"),
        ("tampered-payload", lambda s: _tamper(s.token("alice")), "invalid token"),
        ("expired", lambda s: s.token("alice", ttl_s=-5), "token expired"),
        ("expired-long-ago", lambda s: bad_token(s.secret, "alice", exp=now - 86400), "token expired"),
        ("alg-none", lambda s: jwt.encode({"sub": "alice", "exp": now + 3600}, None, algorithm="none"), "invalid token"),
        ("alg-none-with-signature", lambda s: _alg_none_signed(s), "invalid token"),
        ("hs512-when-hs256", lambda s: bad_token(s.secret, "alice", algorithm="HS512"), "invalid token"),
        ("hs384-when-hs256", lambda s: bad_token(s.secret, "alice", algorithm="HS384"), "invalid token"),
        ("garbage", lambda s: "garbage", "invalid token"),
        ("empty", lambda s: "", "invalid token"),
        ("three-dots", lambda s: "a.b.c", "invalid token"),
        ("not-yet-valid", lambda s: bad_token(s.secret, "alice", nbf=now + 3600), "invalid token"),
        ("exp-not-a-number", lambda s: bad_token(s.secret, "alice", exp="tomorrow"), "invalid token"),
        ("bearer-prefix", lambda s: "Bearer " + s.token("alice"), "invalid token"),
    ]


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["sub"] = claims["name"] = "mallory"
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


def _alg_none_signed(server: GarinServer) -> str:
    header, payload, signature = server.token("alice").split(".")
    none_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    return f"{none_header}.{payload}.{signature}"


TOKEN_CASES = _token_cases()


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in TOKEN_CASES], ids=[c[0] for c in TOKEN_CASES])
def test_bad_token_closes(clients: Clients, make: Callable[[GarinServer], str], reason: str) -> None:
    ws = clients.open()
    ws.send(auth_frame(make(clients.server)))
    expect_close(ws, POLICY, reason)


def test_valid_token_without_exp_is_accepted(clients: Clients) -> None:
    name = new_user()
    ws = clients.open()
    ws.send(auth_frame(clients.server.token(name, ttl_s=None)))
    ws.send(join_frame(name, new_room()))
    expect_join(ws, name, 1)


def test_fragmented_frame_over_the_limit_closes(clients: Clients) -> None:
    ws = _at_stage(clients, "joined")
    half = MAX_MESSAGE_BYTES // 2 + 1
    try:
        ws.send(["a" * half, "b" * half])
    except ConnectionClosed:
        # The server may close as soon as it has read past the limit, while
        # the rest of the second fragment is still on its way: a race, not a
        # failure. The close frame it got is checked below all the same.
        pass
    expect_close(ws, 1009, "message too big")


def test_invalid_utf8_text_frame_closes_1007(clients: Clients) -> None:
    ws = _at_stage(clients, "joined")
    ws.send(b'{"type":"message","body":"\xff\xfe"}', text=True)
    expect_close(ws, 1007, None)


def test_lone_surrogate_in_a_field_closes(clients: Clients) -> None:
    ws = _at_stage(clients, "joined")
    ws.send('{"type":"message","body":"\\ud800"}')
    expect_close(ws, POLICY, "body must be valid unicode")


# -- rule breakers and the room -----------------------------------------------------

BREAKS: dict[str, tuple[Frame, int, str]] = {
    "invalid-json": ("{nope", POLICY, "invalid json"),
    "not-object": ("[]", POLICY, "not a json object"),
    "unknown-type": ('{"type":"shout"}', POLICY, "unknown type"),
    "second-join": (join_frame("again", "other-room"), POLICY, "already joined"),
    "second-auth": (_valid_auth, POLICY, "already authenticated"),
    "body-not-string": ('{"type":"message","body":42}', POLICY, "body must be a string"),
    "binary": (b"\x00\x01", 1003, "binary frames not supported"),
    "too-big": ("x" * (MAX_MESSAGE_BYTES + 1), 1009, "message too big"),
}


@pytest.mark.parametrize("frame, code, reason", BREAKS.values(), ids=BREAKS.keys())
def test_rule_breaker_is_removed_and_the_server_keeps_serving(
    clients: Clients, frame: Frame, code: int, reason: str
) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b), (c, ws_c) = members(clients, room, 3)
    if callable(frame):
        frame = frame(clients.server)
    ws_b.send(frame)
    expect_close(ws_b, code, reason)
    expect_userleave(ws_a, b, 2)
    expect_userleave(ws_c, b, 2)
    # The server still serves this room and new clients.
    d = new_user("d")
    ws_d = clients.join(d, room, total=3)
    expect_join(ws_a, d, 3)
    expect_join(ws_c, d, 3)
    ws_d.send(message_frame("hello after the fight"))
    expect_message(ws_a, d, "hello after the fight")
    expect_message(ws_c, d, "hello after the fight")
    ws_a.send(message_frame("hi d"))
    expect_message(ws_c, a, "hi d")
    expect_message(ws_d, a, "hi d")
    expect_quiet([ws_a, ws_c, ws_d], settle=0.1)


# -- origin ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [None, "http://evil.test", "https://allowed.test", "http://allowed.test:8080", "http://sub.allowed.test",
     "http://allowed.test.evil", "null"],
    ids=["missing", "other-host", "other-scheme", "other-port", "subdomain", "suffix", "null"],
)
def test_origin_not_allowed_is_refused_with_403(garin: GarinServer, origin: str | None) -> None:
    with pytest.raises(InvalidStatus) as refused:
        with garin.connect(origin=origin):
            pass
    assert refused.value.response.status_code == 403


def test_allowed_origin_connects_and_chats(clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    ws_a.send(message_frame("origin ok"))
    expect_message(ws_b, a, "origin ok")


def test_wrong_path_is_refused_with_404(garin: GarinServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        with garin.connect(path="/chat"):
            pass
    assert refused.value.response.status_code == 404


@pytest.mark.cap(40)
def test_wildcard_origin_allows_any_origin(garin_factory: ServerFactory) -> None:
    server = garin_factory(ALLOWED_ORIGINS="*")
    room = new_room()
    names = []
    with (
        server.connect(origin=None) as ws_none,
        server.connect(origin="http://anything.example:1234") as ws_other,
        server.connect(origin=ALLOWED_ORIGIN) as ws_allowed,
    ):
        for n, ws in enumerate((ws_none, ws_other, ws_allowed), 1):
            name = new_user(f"w{n}")
            names.append(name)
            ws.send(auth_frame(server.token(name)))
            ws.send(join_frame(name, room))
            expect_join(ws, name, n)
        expect_join(ws_none, names[1], 2)
        expect_join(ws_none, names[2], 3)
        expect_join(ws_other, names[2], 3)
        ws_none.send(message_frame("no origin at all"))
        expect_message(ws_other, names[0], "no origin at all")
        expect_message(ws_allowed, names[0], "no origin at all")


# -- rate limit -----------------------------------------------------------------------


JOIN_BURST = 3


@pytest.fixture(scope="module")
def rate_limited() -> Any:
    with running_server(
        GARIN_RATE_LIMIT_COUNT="1", GARIN_RATE_LIMIT_WINDOW="1",
        # 3 joins at once, then one per 10 s: nothing refills during a test.
        GARIN_JOIN_LIMIT_COUNT=str(JOIN_BURST), GARIN_JOIN_LIMIT_WINDOW="30",
        GARIN_AUTH_TIMEOUT="2", GARIN_JOIN_TIMEOUT="2",
    ) as server:
        yield server


def test_join_limit_closes_a_client_that_keeps_rejoining(rate_limited: GarinServer, clients: Clients) -> None:
    # Each join and userleave is announced to the whole room: a client
    # alternating them would keep every member busy, so joins are limited.
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2, server=rate_limited)
    for _ in range(JOIN_BURST - 1):  # B's first join was one of the burst
        ws_b.send(USERLEAVE)
        expect_userleave(ws_a, b, 1)
        ws_b.send(join_frame(b, room))
        expect_join(ws_b, b, 2)
        expect_join(ws_a, b, 2)
    ws_b.send(USERLEAVE)
    expect_userleave(ws_a, b, 1)
    ws_b.send(join_frame(b, room))
    expect_close(ws_b, POLICY, "join limit exceeded")
    expect_quiet([ws_a])  # the refused join was never announced
    # The room and the server go on; A's own limits were untouched.
    c = new_user("c")
    ws_c = clients.join(c, room, total=2, server=rate_limited)
    expect_join(ws_a, c, 2)
    ws_a.send(message_frame("still here"))
    expect_message(ws_c, a, "still here")


def test_rate_limit_closes_a_burst(rate_limited: GarinServer, clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2, server=rate_limited)
    ws_a.send(message_frame("one"))
    ws_a.send(message_frame("two"))
    expect_close(ws_a, POLICY, "rate limit exceeded")
    expect_message(ws_b, a, "one")  # the first was within the limit
    expect_userleave(ws_b, a, 1)  # the second was not relayed; A was removed


@pytest.mark.cap(40)
def test_rate_limit_lets_a_paced_member_talk(rate_limited: GarinServer, clients: Clients) -> None:
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2, server=rate_limited)
    for n in range(4):
        if n:
            time.sleep(1.1)
        ws_a.send(message_frame(f"paced {n}"))
        expect_message(ws_b, a, f"paced {n}")
    # B, who also spoke only once, is fine too, and A is still open.
    ws_b.send(message_frame("heard you"))
    expect_message(ws_a, b, "heard you")


# -- many members at once ---------------------------------------------------------------


@pytest.mark.cap(40)
def test_25_members_sending_at_once_get_everything_once_in_order(clients: Clients) -> None:
    size, per_sender = 25, 20
    room = new_room("crowd")
    group = members(clients, room, size, prefix="c")
    names = [name for name, _ in group]
    barrier = threading.Barrier(size)
    received: dict[str, list[tuple[str, str]]] = {}
    errors: list[BaseException] = []

    def run(name: str, ws: ClientConnection) -> None:
        try:
            barrier.wait(timeout=10)
            for n in range(per_sender):
                ws.send(message_frame(f"{name}#{n}"))
            got: list[tuple[str, str]] = []
            deadline = time.monotonic() + 15
            while len(got) < (size - 1) * per_sender:
                frame = recv_json(ws, timeout=max(0.1, deadline - time.monotonic()))
                assert frame["type"] == "message", frame
                got.append((frame["username"], frame["body"]))
            received[name] = got
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in group]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a member thread hung"
    assert not errors, errors[:3]
    for name in names:
        got = received[name]
        assert all(sender != name for sender, _ in got), f"{name} got its own message"
        for sender in names:
            if sender == name:
                continue
            bodies = [body for who, body in got if who == sender]
            assert bodies == [f"{sender}#{n}" for n in range(per_sender)], (
                f"{name} got {sender}'s messages as {bodies}"
            )
    expect_quiet([ws for _, ws in group], settle=0.2)


# -- shutdown -------------------------------------------------------------------------


def test_sigterm_closes_clients_with_1001_and_exits_cleanly(garin_factory: ServerFactory) -> None:
    server = garin_factory()
    room = new_room()
    with server.connect() as ws_a, server.connect() as ws_b, server.connect() as ws_c:
        a, b = new_user("a"), new_user("b")
        ws_a.send(auth_frame(server.token(a)))
        ws_a.send(join_frame(a, room))
        expect_join(ws_a, a, 1)
        ws_b.send(auth_frame(server.token(b)))
        ws_b.send(join_frame(b, room))
        expect_join(ws_b, b, 2)
        expect_join(ws_a, b, 2)
        ws_c.send(auth_frame(server.token(new_user("c"))))  # authed, not joined
        assert server.stop() == 0  # exit code 0, socket dir removed
        for ws in (ws_a, ws_b, ws_c):
            expect_close(ws, 1001, "server shutting down")

"""Abusive and broken clients, against real `garin run` processes.

Each group of tests has a server with short timers (keepalive 0.5 s, idle
1 s, ...), so the rules show within a second or two. Waits are bounded by
receive timeouts; no test asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SHARED_ENV,
    Clients,
    GarinServer,
    RawClient,
    ServerFactory,
    auth_frame,
    close_of,
    expect_close,
    expect_join,
    expect_message,
    expect_quiet,
    expect_userleave,
    join_frame,
    message_frame,
    new_room,
    new_user,
    running_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hard_cap")]

PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 0.5
MAX_BODY_CHARS = 100
# Room for 100,000-deep JSON in one frame.
BIG_FRAME_CHARS = 256 * 1024


def module_server(**env: str) -> contextlib.AbstractContextManager[GarinServer]:
    """Like `garin_factory`, for a server that a whole group of tests shares."""
    return running_server(**{**SHARED_ENV, **env})


@pytest.fixture(scope="module")
def keepalive_server() -> Iterator[GarinServer]:
    with module_server(
        GARIN_PING_INTERVAL=str(PING_INTERVAL_S),
        GARIN_PING_TIMEOUT=str(PING_TIMEOUT_S),
        GARIN_MAX_BODY_CHARS=str(MAX_BODY_CHARS),
        GARIN_MAX_MESSAGE_BYTES=str(BIG_FRAME_CHARS),
    ) as server:
        yield server


@pytest.fixture
def clients(keepalive_server: GarinServer) -> Iterator[Clients]:
    with contextlib.ExitStack() as stack:
        yield Clients(stack, keepalive_server)


def raw_member(server: GarinServer, username: str, room: str) -> RawClient:
    """A hand-made client that authenticates and joins, reading its own join."""
    raw = RawClient(server.port)
    raw.send_text(auth_frame(server.token(username)))
    raw.send_text(join_frame(username, room))
    while True:
        frame = raw.recv_frame()
        assert frame is not None, "closed before the join broadcast"
        if frame[0] == OP_TEXT:
            assert json.loads(frame[1])["username"] == username
            return raw


# -- keepalive -----------------------------------------------------------------------


def test_a_client_that_never_answers_pings_is_dropped(clients: Clients) -> None:
    room = new_room()
    a = new_user("a")
    ws_a = clients.join(a, room, total=1)
    mute = new_user("mute")
    raw = raw_member(clients.server, mute, room)
    expect_join(ws_a, mute, 2)
    try:
        # It reads (so it is not "too slow") but never answers: pinged, then closed.
        pings = 0
        while True:
            frame = raw.recv_frame()
            assert frame is not None, "hung up without a close frame"
            if frame[0] == OP_PING:
                pings += 1
                continue
            assert close_of(frame) == (1011, "keepalive ping timeout")
            break
        assert pings == 1
        assert raw.recv_frame() is None  # then the server hangs up
    finally:
        raw.close()
    expect_userleave(ws_a, mute, 1)


def test_a_websockets_client_answers_pings_and_stays(clients: Clients) -> None:
    # websockets answers pings by itself (its own pings are off: ping_interval=None).
    room = new_room()
    a, b = new_user("a"), new_user("b")
    ws_a = clients.join(a, room, total=1)
    ws_b = clients.join(b, room, total=2)
    expect_join(ws_a, b, 2)
    # Silent for four ping intervals (without answers it would be dropped
    # after two): each is pinged and answers.
    expect_quiet([ws_a, ws_b], settle=4 * PING_INTERVAL_S)
    ws_a.send(message_frame("still here"))
    expect_message(ws_b, a, "still here")


def test_a_pong_by_hand_counts_and_so_do_its_own_pings(clients: Clients) -> None:
    room = new_room()
    a = new_user("a")
    ws_a = clients.join(a, room, total=1)
    polite, chatty = new_user("polite"), new_user("chatty")
    # `polite` answers every ping with a pong; `chatty` never answers, but
    # pings the server itself more often than the server would ping it:
    # without its pings counting it would be dropped within two intervals.
    raw_polite = raw_member(clients.server, polite, room)
    expect_join(ws_a, polite, 2)
    raw_chatty = raw_member(clients.server, chatty, room)
    expect_join(ws_a, chatty, 3)
    try:
        raw_polite.sock.settimeout(0.05)
        raw_chatty.sock.settimeout(0.05)
        pinged = 0
        end = time.monotonic() + 6 * PING_INTERVAL_S
        while time.monotonic() < end:
            raw_chatty.send_frame(OP_PING, b"hello?")
            for name, raw in (("polite", raw_polite), ("chatty", raw_chatty)):
                try:
                    frame = raw.recv_frame()
                except AssertionError:
                    continue  # nothing within 0.05 s
                assert frame is not None, f"{name} was dropped"
                assert frame[0] != OP_CLOSE, f"{name} was closed: {close_of(frame)}"
                if frame[0] == OP_PING and name == "polite":
                    pinged += 1
                    raw.send_frame(OP_PONG, frame[1])
                elif frame[0] == OP_PONG:
                    assert (name, frame[1]) == ("chatty", b"hello?")
            time.sleep(PING_INTERVAL_S / 5)
        assert pinged >= 2
    finally:
        raw_polite.close()
        raw_chatty.close()


# -- idle ------------------------------------------------------------------------------

IDLE_TIMEOUT_S = 1.0


def test_a_silent_member_is_closed_for_idling_though_it_answers_pings(garin_factory: ServerFactory) -> None:
    server = garin_factory(
        GARIN_IDLE_TIMEOUT=str(IDLE_TIMEOUT_S), GARIN_PING_INTERVAL="0.3", GARIN_PING_TIMEOUT="1"
    )
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = new_room()
        silent, talker = new_user("silent"), new_user("talker")
        ws_silent = clients.join(silent, room, total=1)
        ws_talker = clients.join(talker, room, total=2)
        expect_join(ws_silent, talker, 2)
        # The talker sends every 0.25 s and stays; the silent one only answers
        # pings (websockets does that by itself), which do not count.
        give_up = time.monotonic() + 10 * IDLE_TIMEOUT_S
        while True:
            assert time.monotonic() < give_up, "the silent member was never closed"
            ws_talker.send(message_frame("talking"))
            try:
                got = ws_silent.recv(timeout=0.25)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, "no close frame"
                assert (exc.rcvd.code, exc.rcvd.reason) == (1001, "idle timeout")
                break
            assert json.loads(got) == {"type": "message", "username": talker, "body": "talking"}
            time.sleep(0.1)
        expect_userleave(ws_talker, silent, 1)
        newcomer = new_user("new")
        clients.join(newcomer, room, total=2)
        expect_join(ws_talker, newcomer, 2)


# -- body length ----------------------------------------------------------------------


def test_body_length_is_counted_in_characters(clients: Clients) -> None:
    room = new_room()
    a, b = new_user("a"), new_user("b")
    ws_a = clients.join(a, room, total=1)
    ws_b = clients.join(b, room, total=2)
    expect_join(ws_a, b, 2)
    at_limit = "😀" * MAX_BODY_CHARS  # 400 bytes of UTF-8, 100 characters
    ws_a.send(message_frame(at_limit))
    expect_message(ws_b, a, at_limit)
    ws_a.send(message_frame("x" * (MAX_BODY_CHARS + 1)))
    expect_close(ws_a, 1008, "body too long")
    expect_userleave(ws_b, a, 1)

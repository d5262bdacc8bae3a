"""Abusive and broken clients, against real `garin run` processes.

Most tests share one module server with short timers (keepalive 0.5 s, a 1 s
handshake timeout), a 100-character body limit and frames big enough for
100,000-deep JSON; the idle and connection-limit tests start their own with
`garin_factory`. The rules show within a second or two. Every wait is bounded;
no test asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RECV_TIMEOUT_S,
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
    members,
    message_frame,
    new_room,
    new_user,
    recv_json,
    running_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hard_cap")]

PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 0.5
MAX_BODY_CHARS = 100
# Room for 100,000-deep JSON in one frame.
BIG_FRAME_CHARS = 256 * 1024


@pytest.fixture(scope="module")
def abuse_server() -> Iterator[GarinServer]:
    """The module's shared server (garin_factory's settings, plus these)."""
    env = {
        **SHARED_ENV,
        "GARIN_PING_INTERVAL": str(PING_INTERVAL_S),
        "GARIN_PING_TIMEOUT": str(PING_TIMEOUT_S),
        "GARIN_MAX_BODY_CHARS": str(MAX_BODY_CHARS),
        "GARIN_MAX_MESSAGE_BYTES": str(BIG_FRAME_CHARS),
        "GARIN_HANDSHAKE_TIMEOUT": "1",
    }
    with running_server(**env) as server:
        yield server


@pytest.fixture
def clients(abuse_server: GarinServer) -> Iterator[Clients]:
    with contextlib.ExitStack() as stack:
        yield Clients(stack, abuse_server)


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
    (a, ws_a), (b, ws_b) = members(clients, new_room(), 2)
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
                except TimeoutError:
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
        (silent, ws_silent), (talker, ws_talker) = members(clients, room, 2)
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
    (a, ws_a), (b, ws_b) = members(clients, new_room(), 2)
    at_limit = "😀" * MAX_BODY_CHARS  # 400 bytes of UTF-8, 100 characters
    ws_a.send(message_frame(at_limit))
    expect_message(ws_b, a, at_limit)
    ws_a.send(message_frame("x" * (MAX_BODY_CHARS + 1)))
    expect_close(ws_a, 1008, "body too long")
    expect_userleave(ws_b, a, 1)


# -- connection limits ------------------------------------------------------------------


def admitted(clients: Clients, source: str) -> ClientConnection:
    """A member connected from `source` that the router admitted.

    A refused connection is closed 1013 right after its handshake. Refusals
    are retried (bounded): the router frees a connection's slot when its
    handler ends, a moment after the peer has seen the socket close.
    """
    give_up = time.monotonic() + RECV_TIMEOUT_S
    while True:
        ws = clients.open(source_address=(source, 0))
        name = new_user()
        try:
            ws.send(auth_frame(clients.server.token(name)))
            ws.send(join_frame(name, new_room()))
            got = ws.recv(timeout=RECV_TIMEOUT_S)
        except ConnectionClosed as exc:
            close = exc.rcvd
            assert close is not None and close.code == 1013, f"refused with {close!r}"
            assert time.monotonic() < give_up, f"still refused: {close.reason}"
            time.sleep(0.05)
            continue
        assert json.loads(got) == {"type": "join", "username": name, "totalUsers": 1}
        return ws


def half_handshake(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(RECV_TIMEOUT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    return sock


def dropped(sock: socket.socket) -> bool:
    """True once the server hung up; False if it sent anything first."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        raise AssertionError(f"not dropped within {RECV_TIMEOUT_S} s") from None


def test_connection_limits_per_address_and_per_router(garin_factory: ServerFactory) -> None:
    # Clients play different addresses: 127.0.0.2, .3, ... (the probes that
    # check the server is up come from 127.0.0.1).
    server = garin_factory(
        GARIN_MAX_CONNECTIONS="4", GARIN_MAX_CONNECTIONS_PER_IP="2", GARIN_HANDSHAKE_TIMEOUT="1"
    )
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, server)

        # Per address: the third is refused, another address is not.
        first = admitted(clients, "127.0.0.2")
        admitted(clients, "127.0.0.2")
        expect_close(clients.open(source_address=("127.0.0.2", 0)), 1013, "too many connections")
        admitted(clients, "127.0.0.3")
        admitted(clients, "127.0.0.3")

        # Per router: four held, the fifth is refused whatever its address.
        expect_close(clients.open(source_address=("127.0.0.4", 0)), 1013, "server full")
        # Refusals are not counted, and a departure frees a slot.
        first.close()
        admitted(clients, "127.0.0.4")
        expect_close(clients.open(source_address=("127.0.0.5", 0)), 1013, "server full")


def test_the_per_address_limit_counts_every_router(garin_factory: ServerFactory) -> None:
    # Two routers accept from one socket, so one address's connections
    # spread over both: the limit is for the host, not per router. Clients
    # keep connecting from one address until both routers have refused one
    # (each then had the address's connections counted, its own and the
    # other's); never more than the limit may have been admitted.
    server = garin_factory(GARIN_ROUTERS="2", GARIN_MAX_CONNECTIONS_PER_IP="2")
    # Ready means one router answered: wait until both accept.
    deadline = time.monotonic() + 10
    while len(re.findall(r"router \d listening on", server.log_path.read_text(errors="replace"))) < 2:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    refused_by: set[str] = set()
    held = []
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ws = clients.open(source_address=("127.0.0.11", 0))
            name = new_user()
            try:
                ws.send(auth_frame(server.token(name)))
                ws.send(join_frame(name, new_room()))
                assert json.loads(ws.recv(timeout=RECV_TIMEOUT_S)) == {"type": "join", "username": name, "totalUsers": 1}
                held.append(ws)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == (1013, "too many connections")
                log = server.log_path.read_text(errors="replace")
                refused_by = set(re.findall(r"(router\.\d)\[\d+\] INFO conn - \(127\.0\.0\.11:\d+\): closing 1013", log))
            assert len(held) <= 2, f"{len(held)} connections admitted from one address, limit 2"
            if len(refused_by) == 2:
                break
        assert refused_by == {"router.0", "router.1"}, "the kernel handed every connection to one router"
        assert len(held) == 2
        # A departure frees a slot on the host, whichever router held it.
        held.pop().close()
        admitted(clients, "127.0.0.11")


def test_unfinished_handshakes_hold_a_slot_until_they_are_dropped(garin_factory: ServerFactory) -> None:
    server = garin_factory(GARIN_MAX_CONNECTIONS_PER_IP="2", GARIN_HANDSHAKE_TIMEOUT="1")
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        stalled = [half_handshake(server.port, "127.0.0.6") for _ in range(2)]
        try:
            # A whole session from another address, accepted after them,
            # proves the router has accepted (and counted) both by now.
            admitted(clients, "127.0.0.7").close()
            expect_close(clients.open(source_address=("127.0.0.6", 0)), 1013, "too many connections")
            assert all(dropped(sock) for sock in stalled)
        finally:
            for sock in stalled:
                sock.close()
        admitted(clients, "127.0.0.6")


# -- broken handshakes ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["half-request", "trickle"])
def test_a_handshake_that_never_completes_is_dropped(abuse_server: GarinServer, how: str) -> None:
    sock = half_handshake(abuse_server.port, "127.0.0.1")
    try:
        if how == "half-request":
            assert dropped(sock)
        else:
            # A slow-loris: a header byte every 0.1 s does not extend the timeout.
            give_up = time.monotonic() + RECV_TIMEOUT_S
            while True:
                assert time.monotonic() < give_up, "a trickling handshake was never dropped"
                try:
                    sock.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(1024) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    break
                raise AssertionError("the server answered an unfinished request")
    finally:
        sock.close()
    # And the router still serves.
    with abuse_server.connect() as ws:
        name = new_user()
        ws.send(auth_frame(abuse_server.token(name)))
        ws.send(join_frame(name, new_room()))
        expect_join(ws, name, 1)


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20_000,  # never ends: 16 KiB cap
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["oversize-unfinished", "oversize", "not-an-upgrade"],
)
def test_a_bad_request_head_is_answered_400(abuse_server: GarinServer, request_head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", abuse_server.port), timeout=RECV_TIMEOUT_S) as sock:
        sock.sendall(request_head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer == b"HTTP/1.1 400 \r\ncontent-length: 0\r\n\r\n"


# -- hostile JSON ---------------------------------------------------------------------------

DEEP = 100_000
HOSTILE_JSON = {
    # 200,000 characters: within the module server's frame limit.
    "nested-arrays": ("[" * DEEP + "]" * DEEP, "invalid json"),
    "unclosed-arrays": ("[" * DEEP * 2, "invalid json"),
    "nested-in-a-message": (
        '{"type":"message","body":"hi","x":' + "[" * DEEP + "]" * DEEP + "}", "invalid json"),
    "nested-objects": ('{"":' * (DEEP // 2) + "1" + "}" * (DEEP // 2), "invalid json"),
    # Numbers are read as floats: a huge one is a number, not an object.
    "huge-number": ("9" * DEEP, "not a json object"),
    "wide-array": ("[" + "0," * (DEEP - 1) + "0]", "not a json object"),
    "many-keys": (
        "{" + ",".join(f'"k{i}":0' for i in range(DEEP // 10)) + ',"type":"message","body":"x"}',
        None,  # valid: relayed
    ),
}


@pytest.mark.parametrize("frame, reason", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_is_refused_and_the_router_survives(clients: Clients, frame: str, reason: str | None) -> None:
    assert len(frame) <= BIG_FRAME_CHARS
    room = new_room()
    (a, ws_a), (b, ws_b) = members(clients, room, 2)
    ws_a.send(frame)
    if reason is None:
        expect_message(ws_b, a, "x")
        return
    expect_close(ws_a, 1008, reason)
    expect_userleave(ws_b, a, 1)
    # The same router (b's connection outlived it) still chats.
    c = new_user("c")
    ws_c = clients.join(c, room, total=2)
    expect_join(ws_b, c, 2)
    ws_c.send(message_frame("still up"))
    expect_message(ws_b, c, "still up")


def test_behind_a_trusted_proxy_the_limit_applies_to_each_real_client(garin_factory: ServerFactory) -> None:
    """127.0.0.1 is a trusted proxy by default (GARIN_FORWARDED_ALLOW_IPS):
    its X-Forwarded-For names the client the per-address limit counts. From
    an untrusted peer the same header is ignored."""
    server = garin_factory(GARIN_MAX_CONNECTIONS_PER_IP="2")
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, server)

        def via_proxy(client_ip: str) -> ClientConnection:
            return clients.open(additional_headers={"X-Forwarded-For": f"{client_ip}, 127.0.0.1"})

        # Many users behind the proxy (more than the limit in all) ...
        for n in range(5):
            for ws in (via_proxy(f"198.51.100.{n}"), via_proxy(f"198.51.100.{n}")):
                ws.send(auth_frame(server.token(new_user())))
                ws.send(join_frame(new_user(), new_room()))
                assert recv_json(ws)["type"] == "join"
        # ... but each one is held to the limit.
        expect_close(via_proxy("198.51.100.0"), 1013, "too many connections")
        # The header from an untrusted peer (127.0.0.8) names nobody.
        for _ in range(2):
            admitted(clients, "127.0.0.8")
        spoofed = clients.open(source_address=("127.0.0.8", 0), additional_headers={"X-Forwarded-For": "203.0.113.1"})
        expect_close(spoofed, 1013, "too many connections")

"""Hostile and unusual clients against several hosts sharing rooms through Redis.

What one host already withstands is tested in test_hostile.py and
test_abuse.py; here is what Redis adds: every room event travels as text
through Redis (`j`/`l`/`m` events built by the Lua scripts and
garin/shard/cluster_rooms.py), room names become Redis keys and channels,
counts live in Redis, and a shard process reads one subscription for all
its rooms. Each test runs real hosts (`garin run`) on a real redis-server
and real WebSocket clients, and checks what is left in Redis afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from garin_bench.wsframe import client_frame

from conftest import (
    OP_TEXT,
    SHARED_ENV,
    USERLEAVE,
    Clients,
    GarinServer,
    RawClient,
    abort,
    auth_frame,
    expect_close,
    expect_join,
    expect_message,
    expect_quiet,
    expect_userleave,
    join_frame,
    message_frame,
    new_room,
    new_user,
    recv_json,
    room_on,
)
from test_redis import (  # noqa: F401  (fixtures)
    DEAD_AFTER_S,
    REDIS_SERVER,
    Hosts,
    RedisServer,
    hosts,
    join_all,
    kill_host,
    people,
    redis,
    wait_for,
)

from garin.protocol import message_text
from garin.shard.cluster import BACKOFF_MAX_S, HEARTBEAT_S, MAX_MESSAGE_TEXT_BYTES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("hard_cap"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


# -- reading Redis ------------------------------------------------------------------


def _resp(data: bytes, at: int = 0) -> tuple[Any, int]:
    """One RESP2 value from `data` at `at`: (value, where the next starts).
    Bulk strings by their length (keys may hold newlines)."""
    kind, end = data[at:at + 1], data.index(b"\r\n", at)
    head = data[at + 1:end]
    if kind == b"*":
        items, at = [], end + 2
        for _ in range(int(head)):
            item, at = _resp(data, at)
            items.append(item)
        return items, at
    if kind == b"$":
        size = int(head)
        return (None, end + 2) if size < 0 else (data[end + 2:end + 2 + size], end + 4 + size)
    if kind == b":":
        return int(head), end + 2
    if kind in (b"+", b"-"):
        return head.decode(), end + 2
    raise AssertionError(f"not RESP: {data[at:at + 40]!r}")


def ask(redis: RedisServer, *args: str) -> Any:
    """One command, its whole reply parsed."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            data += sock.recv(1 << 20)
            try:
                value, end = _resp(data)
            except (ValueError, IndexError):
                continue  # not all of it yet
            if end == len(data):
                return value


def room_keys(redis: RedisServer) -> list[bytes]:
    """garin's keys of rooms and members (rosters, owned hashes): none may be
    left once every member has gone."""
    keys = ask(redis, "KEYS", "garin:*")
    return sorted(k for k in keys if k.startswith((b"garin:roster:", b"garin:owned:")))


def room_channels(redis: RedisServer) -> list[bytes]:
    return sorted(c for c in ask(redis, "PUBSUB", "CHANNELS") if c.startswith(b"garin:room:"))


def roster(redis: RedisServer, room: str) -> list[bytes]:
    """The usernames Redis counts in `room`."""
    return sorted(ask(redis, "HVALS", "garin:roster:" + room))


def newcomer_then_all_leave(
    people: Clients, room: str, host: GarinServer, present: list[ClientConnection], total: int
) -> None:
    """A newcomer on `host` is counted `total` (by Redis) and everyone
    `present` hears it; then they and the newcomer leave."""
    late = new_user("late")
    wl = people.join(late, room, total=total, server=host)
    for ws in present:
        expect_join(ws, late, total)
        ws.close()
    wl.close()


def nothing_left(redis: RedisServer) -> None:
    """No roster, no owned hash, no subscribed room channel (the shards
    unsubscribe a little after their last member's leave)."""
    wait_for(lambda: not room_keys(redis) and not room_channels(redis),
             "Redis to hold nothing of the rooms", timeout=10)


# -- what members see, byte for byte ---------------------------------------------------


def raw_frame(ws: ClientConnection) -> str:
    try:
        data = ws.recv(timeout=5)
    except TimeoutError:
        raise AssertionError("nothing received within 5 s") from None
    assert isinstance(data, str), data
    return data


def play(people: Clients, room: str, placed: list[tuple[str, GarinServer]], bodies: list[str]) -> dict[str, list[str]]:
    """Everyone in `placed` joins `room` in turn, each sends every body, the
    second leaves (userleave), the third sends an empty body (which leaves
    and closes), the first is left alone. Every frame each member gets, as
    the server sent it (the text, not its JSON meaning)."""
    seen: dict[str, list[str]] = {name: [] for name, _ in placed}
    present: list[tuple[str, ClientConnection]] = []

    def everyone_but(sender: str | None) -> None:
        for name, ws in present:
            if name != sender:
                seen[name].append(raw_frame(ws))

    for name, server in placed:
        ws = people.authed(name, server=server)
        ws.send(join_frame(name, room))
        present.append((name, ws))
        everyone_but(None)
    for name, ws in list(present):
        for body in bodies:
            ws.send(json.dumps({"type": "message", "body": body}, ensure_ascii=False))
            everyone_but(name)
    second, third = present[1], present[2]
    second[1].send(USERLEAVE)
    present.remove(second)
    everyone_but(None)
    third[1].send(message_frame(""))
    expect_close(third[1], 1000, "bye")
    present.remove(third)
    everyone_but(None)
    expect_quiet([ws for _, ws in present] + [second[1]], settle=0.05)
    second[1].close()
    present[0][1].close()
    return seen


# The longest frame the test hosts take is MAX_MESSAGE_BYTES (4096) bytes
# of UTF-8, of which the message's JSON around the body takes these.
_FRAME_AROUND_BODY = len('{"type": "message", "body": ""}')

CASES: dict[str, tuple[tuple[str, str, str], str, list[str]]] = {
    # (three usernames, the room, bodies)
    "spaces": (("a b", " lead", "trail "), " r o o m ", [" ", "  two  ", "m x 1 2 hi"]),
    # What looks like garin's own channel events, in names and bodies.
    "event-lookalikes": (
        ("j x 1 2 y", "l 0 0 0 z", "m 1 1 a"), "l a 1 2 b",
        ["j inst 1 99 mallory", "l inst 1 0 bob", "m inst 1 {\"type\":\"join\"}"],
    ),
    "newlines-and-controls": (("a\nb", "\r\n\r\n", "\tz\x00"), "r\nx\r\n", ["line1\nline2", "\r\n", "\x00\x1b[2J"]),
    "unicode": (
        ("🙂🙂🙂", "e\u0301\u0301\u0301", "日本語"), "𝕽𝖔𝖔𝖒 ☃",
        ["🙂" * 100, "a\u0301\u0302\u0303\u0304", "\u2028\u2029\ufeff", "\U0010ffff\U0001f3f3\ufe0f\u200d\U0001f308"],
    ),
    "quotes-and-escapes": (('"a"', "\\\\\\", "\\u0041"), '"{room}"', ['"', "\\", "\\u0000", "</script>"]),
    "shortest": (("abc", "x y", "\x00\x00\x00"), "r\x00m", ["x"]),
    "longest": (
        ("🙂" * 32, "e\u0301" * 16, "x" * 32), "𝕽" * 64,
        ["🙂" * ((4096 - _FRAME_AROUND_BODY) // 4), "x" * (4096 - _FRAME_AROUND_BODY)],
    ),
    # Names of garin's own keys and channels, and Redis pattern characters.
    "garin-key-names": (("garin:alive:x", "garin:owned:x", "garin:roster:x"), "garin:roster:garin:room:x", ["*"]),
    "patterns": (("*?*", "?[a]", "{x}"), "*?[]{}\\*", ["*", "?"]),
}


class Deployment:
    """One host without Redis (the reference) and two hosts on one Redis,
    shared by the cases of this module."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.redis = RedisServer().start()
        stack.callback(self.redis.cleanup)
        self.hosts = Hosts(self.redis, stack)
        self.a, self.b = self.hosts.start(shards=2), self.hosts.start(shards=2)
        self.single = GarinServer(env_overrides=SHARED_ENV, shards=2)
        stack.callback(self.hosts._stop, self.single)
        self.single.start()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    with contextlib.ExitStack() as stack:
        yield Deployment(stack)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_names_and_bodies_reach_both_hosts_exactly_as_one_host_sends_them(
    deployment: Deployment, case: tuple[tuple[str, str, str], str, list[str]]
) -> None:
    """Usernames, rooms and bodies with spaces, newlines, NULs, quotes,
    astral characters and combining marks, shaped like garin's own channel
    events or keys, the shortest and the longest the limits allow: every
    member, on either host, gets exactly the frames one host sends."""
    (alice, bob, carol), room, bodies = case
    d = deployment
    with contextlib.ExitStack() as stack:
        people = Clients(stack, d.single)
        one_host = play(people, room, [(alice, d.single), (bob, d.single), (carol, d.single)], bodies)
        # Alice and Carol on host a (one shard process), Bob on host b.
        two_hosts = play(people, room, [(alice, d.a), (bob, d.b), (carol, d.a)], bodies)
    assert two_hosts == one_host
    # The reference is what it should be (the frames decode to the names).
    assert json.loads(one_host[alice][0]) == {"type": "join", "username": alice, "totalUsers": 1}
    assert json.loads(one_host[alice][-1]) == {"type": "userleave", "username": carol, "totalUsers": 1}
    nothing_left(d.redis)  # alice left last (her socket closed)


# -- the largest messages ---------------------------------------------------------------


def join_unbounded(people: Clients, name: str, room: str, total: int, server: GarinServer) -> ClientConnection:
    """A member whose client takes frames of any size."""
    ws = people.open(server=server, max_size=None)
    ws.send(auth_frame(server.token(name)))
    ws.send(join_frame(name, room))
    expect_join(ws, name, total)
    return ws


@pytest.mark.cap(90)
def test_a_message_too_large_for_redis_closes_its_sender_1009_and_every_link_stays_up(
    hosts: Hosts, people: Clients
) -> None:
    """Redis drops a subscriber past `client-output-buffer-limit pubsub`
    (32 MiB at once by default): one message that large cut every host's
    link for the room, and was lost (a 34 MB one did, on both hosts). With
    the limits at their largest, a text up to 8 MiB of UTF-8 goes through;
    past that its sender is closed 1009 `message too big` and everyone else
    chats on."""
    big = {"GARIN_MAX_MESSAGE_BYTES": "16777216", "GARIN_MAX_BODY_CHARS": "0", "GARIN_MAX_OUTBOX_BYTES": "67108864"}
    a, b = hosts.start(shards=1, **big), hosts.start(shards=1, **big)
    room = new_room("huge")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    wa = people.join(alice, room, total=1, server=a)
    wb = join_unbounded(people, bob, room, 2, b)
    expect_join(wa, bob, 2)
    wc = join_unbounded(people, carol, room, 3, a)
    expect_join(wa, carol, 3)
    expect_join(wb, carol, 3)
    # A text of exactly the bound (bytes of UTF-8, not characters), then one byte more.
    fits = "🙂" * 1_000_000
    fits += "x" * (MAX_MESSAGE_TEXT_BYTES - len(message_text(alice, fits)))
    wa.send(json.dumps({"type": "message", "body": fits}, ensure_ascii=False))
    for ws in (wb, wc):
        assert json.loads(ws.recv(timeout=30)) == {"type": "message", "username": alice, "body": fits}
    wa.send(json.dumps({"type": "message", "body": fits + "x"}, ensure_ascii=False))
    expect_close(wa, 1009, "message too big", timeout=30)
    expect_userleave(wb, alice, 2)
    expect_userleave(wc, alice, 2)
    wb.send(message_frame("still here"))
    expect_message(wc, bob, "still here")
    expect_quiet([wb, wc], settle=0.1)
    for host in (a, b):
        log = host.log_path.read_text()
        assert "Redis link down" not in log and log.count("Redis link up") == 1, log


# -- rooms named like garin's keys, on a host that dies ------------------------------------


ODD_ROOMS = ["garin:roster:x y", "garin:owned:*?[a]", "r\nx {🙂}", "garin:room:garin:alive:x"]


@pytest.mark.cap(90)
def test_odd_room_names_survive_a_link_made_again_and_a_killed_host_s_reaping(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """The Lua scripts build key and channel names from the rooms they find
    (REGISTER after a link is made again, REAP after a host died): rooms
    named like garin's own keys, or holding newlines and pattern
    characters, come out whole: the roster keeps exactly its members, the
    dead host's members are announced gone by name with the right count,
    and nothing is left in Redis."""
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    pairs = {room: join_all(people, room, [(f"a {n}\n", a), (f"b {n}🙂", b)]) for n, room in enumerate(ODD_ROOMS)}
    # Every shard process's link cut: each registers its members again.
    killed = ask(redis, "CLIENT", "KILL", "TYPE", "pubsub")
    assert killed == 4, killed
    for host in (a, b):
        wait_for(lambda: host.log_path.read_text().count("Redis link up") >= 4, "every link made again")
    for n, room in enumerate(ODD_ROOMS):
        assert roster(redis, room) == sorted([f"a {n}\n".encode(), f"b {n}🙂".encode()])
    kill_host(b)
    # Host a, back from its cut, reaps nobody for a while (BACKOFF_MAX_S +
    # GARIN_REDIS_DEAD_AFTER + 1 s: README "Several hosts").
    reaped_within = BACKOFF_MAX_S + HEARTBEAT_S + 2 * DEAD_AFTER_S + 5
    for n, (room, (wa, _)) in enumerate(pairs.items()):
        assert recv_json(wa, timeout=reaped_within) == {"type": "userleave", "username": f"b {n}🙂", "totalUsers": 1}
        assert roster(redis, room) == [f"a {n}\n".encode()]
        newcomer_then_all_leave(people, room, a, [wa], total=2)
    nothing_left(redis)


# -- storms of joins, leaves and moves ---------------------------------------------------


def until_quiet(ws: ClientConnection, quiet_s: float = 1.5) -> list[dict[str, Any]]:
    """What `ws` gets until nothing more comes for `quiet_s`."""
    events = []
    with contextlib.suppress(AssertionError):
        while True:
            events.append(recv_json(ws, timeout=quiet_s))
    return events


def check_counts(events: list[dict[str, Any]], start: int) -> int:
    """Joins and leaves only, each moving totalUsers by one from `start`,
    every leave of someone who joined; the last count."""
    total, inside = start, set()
    for event in events:
        kind, name = event["type"], event["username"]
        assert kind in ("join", "userleave"), event
        total += 1 if kind == "join" else -1
        assert event["totalUsers"] == total, (event, events)
        if kind == "join":
            assert name not in inside, (event, events)
            inside.add(name)
        else:
            inside.remove(name)
    return total


@pytest.mark.cap(90)
def test_a_storm_of_joins_leaves_and_moves_across_hosts_keeps_every_count(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """Eight clients on two hosts move between two rooms (of different
    shards) as fast as the join limiter lets them (9 joins each), some
    leaving before their own join came back, then half drop their TCP
    connection and half leave. Two watchers per room (both hosts' in one,
    host b's in the other) see the same events in the same order, counts
    moving by one and back to 2;
    Redis counts just the watchers, and nothing once they are gone."""
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    rooms = [room_on(0, "storm", shards=2), room_on(1, "storm", shards=2)]
    # The second room's watchers are both on host b: host a's shard process
    # subscribes to it and drops it again as the movers come and go.
    watchers = {
        rooms[0]: join_all(people, rooms[0], [(new_user("wa"), a), (new_user("wb"), b)]),
        rooms[1]: join_all(people, rooms[1], [(new_user("wb"), b), (new_user("wb"), b)]),
    }
    movers = [(new_user(f"mv{i}"), a if i % 2 else b) for i in range(8)]
    sockets = [people.authed(name, server=host) for name, host in movers]
    joins = {room: 0 for room in rooms}
    sure = {room: 0 for room in rooms}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def storm(i: int, name: str, ws: ClientConnection) -> None:
        try:
            for n in range(9):
                room = rooms[(n + i) % 2]
                ws.send(join_frame(name, room))
                waits = i % 4 < 2  # for its own join; the others do not
                with lock:
                    joins[room] += 1
                    # Surely handled: what a client sent just before it
                    # vanished may be dropped (as on one host).
                    sure[room] += waits or i % 2 == 0
                if waits:
                    while recv_json(ws) != {"type": "join", "username": name, "totalUsers": ANY}:
                        pass
                if n < 8:
                    ws.send(USERLEAVE)
            if i % 2:
                abort(ws)
            else:
                ws.send(USERLEAVE)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=storm, args=(i, name, ws)) for i, ((name, _), ws) in enumerate(zip(movers, sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    for room in rooms:
        # Every join that was read came back, and was undone.
        seen = [until_quiet(watchers[room][0]), until_quiet(watchers[room][1], quiet_s=0.3)]
        assert seen[0] == seen[1]
        assert check_counts(seen[0], start=2) == 2
        assert 2 * sure[room] <= len(seen[0]) <= 2 * joins[room], (sure, joins, seen[0])
        assert len(roster(redis, room)) == 2
    for room in rooms:
        newcomer_then_all_leave(people, room, a, watchers[room], total=3)
    for ws in sockets:
        with contextlib.suppress(Exception):
            ws.close()
    nothing_left(redis)


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY: Any = _Any()


# -- a member that never reads ---------------------------------------------------------------


@pytest.mark.cap(90)
def test_a_member_that_never_reads_is_closed_too_slow_and_its_shard_reads_on(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """A member on host a stops reading while a sender on host b fills the
    room: its outbox fills and it is closed 1013 `too slow`, while host a's
    shard process (one subscription for all its rooms) keeps delivering
    every message to the room's other member on a, and a chat in another
    room of the same process goes on within a second."""
    env = {"GARIN_MAX_OUTBOX_BYTES": "65536", "GARIN_MAX_MESSAGE_BYTES": "65536", "GARIN_MAX_BODY_CHARS": "0"}
    a, b = hosts.start(shards=1, **env), hosts.start(shards=1, **env)
    room, other = new_room("slow"), new_room("other")
    sender, reader = new_user("sender"), new_user("reader")
    ws_sender, ws_reader = join_all(people, room, [(sender, b), (reader, a)])
    stalled = RawClient(a.port, rcvbuf=4096)
    stalled.send_text(auth_frame(a.token("stalled")))
    stalled.send_text(join_frame("stalled", room))
    expect_join(ws_sender, "stalled", 3)
    expect_join(ws_reader, "stalled", 3)
    carol, dave = new_user("carol"), new_user("dave")
    wc, wd = join_all(people, other, [(carol, a), (dave, b)])

    body = "x" * 8000
    left = False
    for n in range(1500):  # 12 MB: far past kernel buffers and the 64 KiB outbox
        ws_sender.send(message_frame(f"{n}:{body}"))
        event = recv_json(ws_reader, timeout=5)
        if event["type"] == "userleave":
            assert event == {"type": "userleave", "username": "stalled", "totalUsers": 2}
            left = True
            event = recv_json(ws_reader, timeout=5)
        assert event == {"type": "message", "username": sender, "body": f"{n}:{body}"}
        if n % 50 == 0:
            started = time.monotonic()
            wd.send(message_frame(f"ping {n}"))
            expect_message(wc, dave, f"ping {n}")
            assert time.monotonic() - started < 1.0, "the other room waited"
        if left and n > 50:
            break
    assert left, "the stalled member was never closed"
    expect_userleave(ws_sender, "stalled", 2)
    assert roster(redis, room) == sorted([sender.encode(), reader.encode()])
    assert "closing 1013 too slow" in a.log_path.read_text()
    stalled.close()
    expect_quiet([ws_sender, ws_reader, wc, wd], settle=0.1)


# -- a connection reset in the middle of its join ---------------------------------------------


def reset(raw: RawClient) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed client's host does."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.sock.close()


@pytest.mark.cap(60)
def test_clients_reset_in_the_middle_of_their_join_leave_no_ghost(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """24 clients on host a send their join and reset the connection at
    once or a few milliseconds later (before, while and after their join
    goes through Redis), or halfway through the join frame. A watcher on
    host b sees each join that was counted undone, counts back to 1;
    Redis counts only the watcher; a newcomer gets totalUsers 2."""
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    room = new_room("reset")
    watcher = new_user("watcher")
    ww = people.join(watcher, room, total=1, server=b)
    delays = [0.0, 0.0005, 0.002, 0.005, 0.01, 0.03]
    for n in range(24):
        raw = RawClient(a.port)
        name = new_user(f"rst{n}")
        join = client_frame(OP_TEXT, join_frame(name, room).encode())
        halfway = n % 8 == 7
        raw.sock.sendall(client_frame(OP_TEXT, auth_frame(a.token(name)).encode()) + join[:len(join) // 2 if halfway else None])
        time.sleep(delays[n % len(delays)])
        reset(raw)
    events = until_quiet(ww)
    assert check_counts(events, start=1) == 1
    assert roster(redis, room) == [watcher.encode()]
    newcomer_then_all_leave(people, room, a, [ww], total=2)
    nothing_left(redis)

"""The load generator's connect phase (scripts/garin_bench/storm.py, `bench.py
--client lean`) against a real garin: members connect, upgrade, auth and join
through one epoll loop, failures are named as the trio clients name them, and
what the server sends right behind a member's own join reaches the
LeanWebSocket that takes the socket over.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from conftest import ALLOWED_ORIGIN, GarinServer, auth_frame, join_frame, new_room, new_user
from garin_bench.bench import broadcast, gather, start_workers, stop_workers
from garin_bench.server import free_port
from garin_bench.storm import JOINED, Job, Storm
from garin_bench.worker import MemberSpec, Times, WorkerPlan, _error_kind
from garin_bench.wsframe import frame_at

pytestmark = pytest.mark.usefixtures("hard_cap")


def join_events(data: bytes) -> list[str]:
    """The usernames of the join events framed in `data` (whole frames only)."""
    names, pos = [], 0
    while (frame := frame_at(data, pos)) is not None:
        _, start, pos = frame
        event = json.loads(data[start:pos])
        assert event["type"] == "join", event
        names.append(event["username"])
    return names


def read_joins(sock: socket.socket, data: bytes, count: int) -> list[str]:
    """`data` and what the socket gives after it, until `count` join events."""
    sock.settimeout(5.0)
    while len(join_events(data)) < count:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    return join_events(data)


def test_the_storm_joins_members_names_failures_and_keeps_what_follows_a_join(garin: GarinServer) -> None:
    room = new_room("storm")
    names = [new_user("storm") for _ in range(6)]
    joiners = [Job(garin.url, name, (auth_frame(garin.token(name)), join_frame(name, room))) for name in names]
    silent = socket.socket()  # accepts TCP (its backlog) but never answers the upgrade
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed_port = free_port()
    idle, refused = new_user("idle"), new_user("refused")
    failing = [
        Job(garin.url + "nope", "x", ()),  # HTTP 404
        Job(f"ws://127.0.0.1:{closed_port}/", "x", ()),  # nothing listens
        Job(f"ws://127.0.0.1:{silent.getsockname()[1]}/", "x", ()),  # no upgrade: connect timeout
        Job(garin.url, idle, (auth_frame(garin.token(idle)),)),  # never joins: join timeout
        Job(garin.url, refused, (auth_frame("not-a-token"), join_frame(refused, room))),  # a close frame
    ]
    # One at a time: each joined member is still held by the storm when the
    # next one's join reaches it, right behind its own.
    storm = Storm(joiners[:2] + failing + joiners[2:], ALLOWED_ORIGIN, 1, connect_timeout_s=0.5, join_timeout_s=0.5)
    settled = []
    try:
        storm.run(time.monotonic() + 10)
        assert storm.pending == 0
        settled = storm.take()
        assert [m.index for m in settled] == list(range(len(names) + len(failing)))
        errors = [_error_kind(m.error) for m in settled if m.error is not None]
        assert errors == [
            "rejected: HTTP 404 not found: the chat WebSocket is at /",
            f"connect failed: all attempts to connect to 127.0.0.1:{closed_port} failed",
            "connect timeout",
            "join timeout (own join broadcast never came)",
            "closed 1008 invalid token",
        ]
        joined = [m for m in settled if m.state == JOINED]
        assert [m.job.username for m in joined] == names
        assert storm.events == {"join (connect phase)": len(names)}
        for m in joined:
            assert m.t0 <= m.t1 <= m.t2 and m.sock is not None and m.sock.getblocking() is False
        # The first members got later joins while the storm still held them.
        assert join_events(joined[0].leftover) != []
        for i, m in enumerate(joined):
            assert m.sock is not None
            later = names[i + 1:]
            assert read_joins(m.sock, m.leftover, len(later)) == later
    finally:
        for m in settled:
            if m.sock is not None:
                m.sock.close()
        storm.close()
        silent.close()


def plan(garin: GarinServer, rooms: list[str], members: int, stray_url: str) -> WorkerPlan:
    specs = []
    for r, room in enumerate(rooms):
        for i in range(members):
            name = new_user(f"w{r}")
            specs.append(MemberSpec(r, room, name, garin.token(name), r * 2 + i if i < 2 else -1))
    name = new_user("lost")
    specs.insert(3, MemberSpec(len(rooms), new_room("lost"), name, garin.token(name), -1, url=stray_url))
    return WorkerPlan(
        index=0, url=garin.url, origin=ALLOWED_ORIGIN, members=tuple(specs), interval_s=0.01, body_pad=0,
        connect_concurrency=4, connect_timeout_s=5.0, close_timeout_s=3.0,
        hard_deadline=time.monotonic() + 30, client="lean",
    )


def test_a_lean_worker_hands_its_joined_members_over_and_they_get_the_messages(garin: GarinServer) -> None:
    rooms, members = [new_room("wstorm") for _ in range(3)], 6
    worker_plan = plan(garin, rooms, members, garin.url + "nope")
    handles = start_workers([worker_plan])
    try:
        gather(handles, "ready", 20)
        t_connect = time.monotonic() + 0.1
        broadcast(handles, ("connect", t_connect))
        [joins] = gather(handles, "joined", 20)
        assert joins["joined"] == len(rooms) * members
        assert joins["errors"] == {"rejected: HTTP 404 not found: the chat WebSocket is at /": 1}
        assert joins["joined_by_room"] == {r: members for r in range(len(rooms))}
        assert t_connect <= joins["first_start"] <= joins["last_joined"]
        start = time.monotonic() + 0.1
        times = Times(start, start + 0.2, start + 0.8, start + 1.0)
        broadcast(handles, ("go", times))
        [result] = gather(handles, "result", 20)
    finally:
        broadcast(handles, ("close",))
        stop_workers(handles, 5)
    r: dict[str, Any] = result
    # Every join behind a member's own (from the storm's leftover or read
    # later) was received: in a room of n, n(n-1)/2 of them.
    assert r["events"] == {
        "join (connect phase)": len(rooms) * members, "join": len(rooms) * members * (members - 1) // 2,
    }
    assert r["disconnects"] == {} and r["duplicates"] == 0 and r["late_joins"] == 0
    # Two senders a room: every member, senders too, receives; nothing lost.
    for room in range(len(rooms)):
        sent = r["sent_by_room"][room][1]
        assert sent > 0 and r["received_by_room"][room] == sent * (members - 1)

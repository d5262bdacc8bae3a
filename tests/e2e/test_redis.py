"""Several garin hosts sharing rooms through a real Redis (GARIN_REDIS_URL).

Each "host" is its own `garin run` (own port, socket directory, metrics);
they share one `redis-server` started here on a free loopback port. Skipped
with a reason when Debian's redis-server is not installed (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from conftest import (
    SHARDS,
    SHARED_ENV,
    Clients,
    GarinServer,
    abort,
    expect_close,
    expect_join,
    expect_message,
    expect_quiet,
    expect_userleave,
    free_port,
    message_frame,
    new_room,
    new_user,
    recv_json,
    room_on,
)

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("hard_cap"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

DEAD_AFTER_S = 2.0


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        with open(self.dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not self.ping():
            assert self.process.poll() is None, (self.dir / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw reply (enough for the checks here)."""
        import socket

        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


class Hosts:
    """garin hosts on one Redis, sharing a token secret; stopped afterwards."""

    def __init__(self, redis: RedisServer, stack: contextlib.ExitStack) -> None:
        self.redis = redis
        self.secret = secrets.token_urlsafe(48)
        self.stack = stack
        self.all: list[GarinServer] = []

    def start(self, shards: int = SHARDS, **env: str) -> GarinServer:
        server = GarinServer(
            env_overrides={
                **SHARED_ENV,
                "GARIN_REDIS_URL": self.redis.url,
                "GARIN_REDIS_DEAD_AFTER": str(DEAD_AFTER_S),
                "GARIN_SHARD_HOLD_TIMEOUT": "5",
                **env,
            },
            secret=self.secret,
            shards=shards,
        )
        server.start()
        self.all.append(server)
        self.stack.callback(self._stop, server)
        return server

    def _stop(self, server: GarinServer) -> None:
        if server.process is not None and server.process.poll() is None:
            server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def hosts(redis: RedisServer) -> Iterator[Hosts]:
    with contextlib.ExitStack() as stack:
        yield Hosts(redis, stack)


@pytest.fixture
def people(hosts: Hosts) -> Iterator[Clients]:
    with contextlib.ExitStack() as stack:
        yield Clients(stack, None)  # type: ignore[arg-type]  # every call names its server


def join_all(people: Clients, room: str, placed: list[tuple[str, GarinServer]]) -> list[ClientConnection]:
    """Each (name, host) joins `room` in turn; everyone sees each join with the right count."""
    joined: list[ClientConnection] = []
    for n, (name, host) in enumerate(placed, 1):
        ws = people.join(name, room, total=n, server=host)
        for earlier in joined:
            expect_join(earlier, name, n)
        joined.append(ws)
    return joined


# -- chat across hosts ---------------------------------------------------------------


def test_members_on_two_hosts_chat_in_rooms_of_every_shard(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(), hosts.start()
    for shard in range(SHARDS):
        room = room_on(shard, "x")
        alice, bob = new_user("alice"), new_user("bob")
        wa, wb = join_all(people, room, [(alice, a), (bob, b)])
        wa.send(message_frame("hi bob"))
        expect_message(wb, alice, "hi bob")
        wb.send(message_frame("hello alice"))
        expect_message(wa, bob, "hello alice")
        expect_quiet([wa, wb], settle=0.1)
        wb.send(json.dumps({"type": "userleave"}))
        expect_userleave(wa, bob, 1)


def test_total_users_counts_both_hosts_through_joins_and_leaves(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    room = new_room("count")
    names = [new_user(f"p{i}") for i in range(6)]
    placed = [(name, a if i % 2 == 0 else b) for i, name in enumerate(names)]
    sockets = join_all(people, room, placed)
    # Leaves from both hosts, in turn: the others see counts 5, 4, 3.
    present = list(range(6))
    for gone, expected in ((1, 5), (2, 4), (5, 3)):
        sockets[gone].send(message_frame(""))  # an empty body leaves and closes
        expect_close(sockets[gone], 1000, "bye")
        present.remove(gone)
        for i in present:
            expect_userleave(sockets[i], names[gone], expected)
    late = new_user("late")
    ws = people.join(late, room, total=4, server=b)
    for i in (0, 3, 4):
        expect_join(sockets[i], late, 4)
    expect_quiet([ws, sockets[0], sockets[3], sockets[4]], settle=0.1)


@pytest.mark.cap(90)
def test_25_senders_over_three_hosts_every_message_once_in_order(hosts: Hosts, people: Clients) -> None:
    three = [hosts.start(shards=2), hosts.start(shards=2), hosts.start(shards=2)]
    room = new_room("busy")
    names = [new_user(f"s{i:02d}") for i in range(25)]
    sockets = join_all(people, room, [(name, three[i % 3]) for i, name in enumerate(names)])
    per_sender = 20
    errors: list[BaseException] = []

    def send(ws: ClientConnection, name: str) -> None:
        try:
            for n in range(per_sender):
                ws.send(message_frame(f"{name} {n}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(ws, name)) for ws, name in zip(sockets, names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    expected = per_sender * (len(names) - 1)
    for ws, me in zip(sockets, names):
        seen: dict[str, int] = {}
        for _ in range(expected):
            got = recv_json(ws, timeout=15)
            assert got["type"] == "message" and got["username"] != me, got
            sender, n = got["body"].split()
            assert got["username"] == sender
            assert int(n) == seen.get(sender, -1) + 1, f"{sender}'s message {n} after {seen.get(sender)}"
            seen[sender] = int(n)
        assert all(v == per_sender - 1 for v in seen.values()) and len(seen) == len(names) - 1
    expect_quiet(sockets, settle=0.2)

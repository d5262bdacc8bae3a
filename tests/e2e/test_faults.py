"""Process faults, proved against real processes: kill -9, crash loops, SIGTERM.

What is promised (README "Failure behaviour"):
- the supervisor replaces a dead child in its slot, and gives up with one
  clear line (exit 1) when a child keeps dying right after start;
- a shard killed takes its own members' connections (they live in it) and
  nobody else's; it is restarted at once and they can join and chat again;
- joins to a dead shard's rooms wait up to GARIN_SHARD_HOLD_TIMEOUT, then
  close 1013 "room unavailable";
- a router killed while chats go on: they go on (members live in shards);
- a member that joins a room of another shard moves there, in order;
- under honcho, SIGTERM to any process stops everything gracefully.

Waits poll with a bound; nothing here asserts on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from garin.auth import make_token

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import (
    USERLEAVE,
    Clients,
    GarinServer,
    ServerFactory,
    auth_frame,
    expect_close,
    expect_join,
    expect_message,
    join_frame,
    message_frame,
    new_user,
    paused,
    recv_json,
    room_on,
)
from test_metrics import get
from garin_bench.wsframe import OP_CLOSE, OP_TEXT, client_frame, frame_at, upgrade_request
from test_processes import (
    ORIGIN,
    SECRET,
    base_env,
    descendants,
    finish,
    free_port,
    join,
    start,
    start_honcho,
    stop,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hard_cap")]

T = TypeVar("T")
GARIN = [sys.executable, "-m", "garin"]
UNAVAILABLE = (1013, "room unavailable")


# -- helpers -------------------------------------------------------------------


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def roles(root: int) -> dict[str, int]:
    """garin processes under `root` by role: {"shard 0": pid, "router 1": pid, "router": pid}."""
    found: dict[str, int] = {}
    for pid in descendants(root):
        try:
            args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue  # gone meanwhile
        for role, flag in (("shard", "--index"), ("router", "--router-id")):
            if role in args:
                rest = args[args.index(role) + 1:]
                slot = rest[rest.index(flag) + 1] if flag in rest else ""
                found[f"{role} {slot}".strip()] = pid
    return found


def gone(pid: int) -> bool:
    """The process has exited and been reaped, so its sockets are closed.

    A zombie is not enough: SIGKILL turns the main thread into a zombie while
    the other threads (trio's worker thread), which share its sockets, may
    still be exiting; a busy machine stretches that to milliseconds."""
    return not os.path.exists(f"/proc/{pid}")


def replaced(server: GarinServer, role: str, old: int) -> int:
    """Wait until the supervisor has a new process in `role`'s slot; its pid."""
    assert server.process is not None
    root = server.process.pid
    return wait_until(lambda: (pid := roles(root).get(role)) != old and pid, f"a new {role}")


def member_socket(port: int, name: str, room: str) -> ClientConnection:
    """Connect, auth and send a join without waiting for its confirmation."""
    ws = connect(f"ws://127.0.0.1:{port}/", origin=ORIGIN, open_timeout=5, close_timeout=3, proxy=None).__enter__()
    ws.send(auth_frame(make_token(SECRET, name, time.time(), 60)))
    ws.send(join_frame(name, room))
    return ws


def join_members(clients: Clients, room: str, names: list[str]) -> list[ClientConnection]:
    """`names` join `room` one by one; everyone's join broadcasts are consumed."""
    joined: list[ClientConnection] = []
    for name in names:
        ws = clients.join(name, room, total=len(joined) + 1)
        for earlier in joined:
            expect_join(earlier, name, len(joined) + 1)
        joined.append(ws)
    return joined


def expect_dropped(ws: ClientConnection) -> None:
    """The connection ends with no close frame: its router died."""
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=10)
    assert info.value.rcvd is None, info.value.rcvd


@contextlib.contextmanager
def log_on_failure(server: GarinServer) -> Iterator[None]:
    """A failed assertion also shows what the server logged."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- garin log ---\n{server.log_tail(80)}") from None


# -- the supervisor --------------------------------------------------------------


def test_supervisor_replaces_a_killed_shard_and_a_killed_router_in_their_slots(
    garin_factory: ServerFactory,
) -> None:
    server = garin_factory()
    assert server.process is not None
    before = roles(server.process.pid)
    assert set(before) == {"shard 0", "shard 1", "shard 2", "shard 3", "router 0"}, before
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = room_on(2)
        alice = clients.join("alice", room, total=1)

        os.kill(before["shard 2"], signal.SIGKILL)
        shard = replaced(server, "shard 2", before["shard 2"])
        # alice lived in shard 2: gone with it. Once it is back, the room is new.
        expect_dropped(alice)
        alice = reconnect_within(server, clients, "alice", room, 1, bound=10)
        bob = clients.join("bobby", room, total=2)
        expect_join(alice, "bobby", 2)
        bob.send(message_frame("after the shard came back"))
        expect_message(alice, "bobby", "after the shard came back")

        os.kill(before["router 0"], signal.SIGKILL)
        router = replaced(server, "router 0", before["router 0"])
        # Members live in their shards: the router's death costs them nothing.
        bob.send(message_frame("router? what router"))
        expect_message(alice, "bobby", "router? what router")
        # The new router serves every shard.
        for index in range(4):
            clients.join(new_user(), room_on(index), total=1)
        clients.join("carol", room, total=3)

    after = roles(server.process.pid)
    assert after == {**before, "shard 2": shard, "router 0": router}, after
    log = server.log_tail(200)
    assert "shard 2 exited with code -9" in log and "router 0 exited with code -9" in log, log


def test_child_that_always_dies_at_start_stops_run_with_one_clear_line(tmp_path: Path) -> None:
    # A socket directory whose socket paths are too long for AF_UNIX (108
    # bytes): the shard cannot bind. (One it cannot create, `garin run`
    # refuses before starting any child.)
    env = base_env(free_port(), str(tmp_path / ("s" * 120)))
    proc = start([*GARIN, "run", "--shards", "1"], env, tmp_path)
    try:
        code = proc.wait(timeout=40)
    finally:
        output = finish(proc)
    assert code == 1, output
    giving_up = [line for line in output.splitlines() if "giving up" in line]
    assert len(giving_up) == 1, output
    assert "ERROR shard 0 exited with code 2 5 times right after start; giving up" in giving_up[0]
    assert "AF_UNIX path too long" in output  # the shard's own reason, once per attempt
    assert "Traceback" not in output
    assert "garin stopped" in output.splitlines()[-1]


def test_second_run_on_the_same_socket_dir_fails_with_one_line_and_leaves_the_first_alone(
    socket_dir: str, tmp_path: Path,
) -> None:
    port = free_port()
    first = start([*GARIN, "run", "--shards", "2"], base_env(port, socket_dir), tmp_path)
    try:
        ws = join(port, "first", "first-room")
        second = subprocess.run(
            [*GARIN, "run", "--shards", "2"], env=base_env(free_port(), socket_dir), cwd=tmp_path,
            capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another garin" in lines[0], second.stderr
        assert "GARIN_SOCKET_DIR" in lines[0]
        # The first server keeps its sockets and serves on.
        assert sorted(os.listdir(socket_dir)) == ["shard-0.sock", "shard-1.sock"]
        later = join(port, "later", "first-room")
        assert recv_json(ws) == {"type": "join", "username": "later", "totalUsers": 2}
        later.close()
        ws.close()
        assert stop(first) == 0
    finally:
        output = finish(first)
    assert "Traceback" not in output


# -- a shard dies ----------------------------------------------------------------


def reconnect_within(server: GarinServer, clients: Clients, name: str, room: str, total: int, bound: float) -> ClientConnection:
    """Join `room` again as a client would after its connection dropped:
    retry until joined; fail if that takes longer than `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return clients.join(name, room, total=total)
        except (ConnectionClosed, OSError, AssertionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_shard_killed_takes_only_its_own_members_who_reconnect_and_chat(garin_factory: ServerFactory) -> None:
    server = garin_factory(GARIN_ROUTERS="2")
    assert server.process is not None
    pids = roles(server.process.pid)
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room, calm_room = room_on(1, "busy"), room_on(0, "calm")
        alice, bobby = join_members(clients, room, ["alice", "bobby"])
        calm_a, calm_b = join_members(clients, calm_room, ["calm-a", "calm-b"])

        os.kill(pids["shard 1"], signal.SIGKILL)
        # The kernel closes the dead shard's sockets: no close frame.
        expect_dropped(alice)
        expect_dropped(bobby)
        # The other shard's members notice nothing.
        calm_a.send(message_frame("unaffected"))
        expect_message(calm_b, "calm-a", "unaffected")
        # Restarted at once; the members come back and chat (the README's
        # promise: within 2 s of the kill on an idle host; a bound with slack here).
        alice = reconnect_within(server, clients, "alice", room, 1, bound=10)
        bobby = clients.join("bobby", room, total=2)
        expect_join(alice, "bobby", 2)
        bobby.send(message_frame("back"))
        expect_message(alice, "bobby", "back")
        calm_b.send(message_frame("still"))
        expect_message(calm_a, "calm-b", "still")
    replaced(server, "shard 1", pids["shard 1"])


def start_shard(index: int, settings: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return start([*GARIN, "shard", "--index", str(index)], settings, cwd)


def test_joins_to_a_dead_shards_rooms_wait_then_close_1013(socket_dir: str, tmp_path: Path) -> None:
    """Shards and router as separate processes (the Procfile way), so that a
    killed shard stays down until the test starts it again."""
    port = free_port()
    settings = base_env(port, socket_dir, GARIN_SHARDS="2", GARIN_SHARD_HOLD_TIMEOUT="1.5")
    procs = {"shard 0": start_shard(0, settings, tmp_path), "shard 1": start_shard(1, settings, tmp_path)}
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    opened: list[ClientConnection] = []

    def member(name: str, room: str) -> ClientConnection:
        ws = join(port, name, room)
        opened.append(ws)
        return ws

    try:
        room, calm_room = room_on(1, "held", shards=2), room_on(0, "calm", shards=2)
        calm_a = member("calm-a", calm_room)
        calm_b = member("calm-b", calm_room)
        assert recv_json(calm_a)["username"] == "calm-b"
        alice = member("alice", room)

        shard = procs["shard 1"]
        shard.kill()
        shard.wait(timeout=10)
        finish(shard)
        expect_dropped(alice)
        # A join there waits for the shard, up to GARIN_SHARD_HOLD_TIMEOUT ...
        started = time.monotonic()
        carol = member_socket(port, "carol", room)
        opened.append(carol)
        expect_close(carol, *UNAVAILABLE)
        assert time.monotonic() - started >= 1.0
        # ... while other shards serve on.
        calm_a.send(message_frame("other shards serve on"))
        assert recv_json(calm_b) == {"type": "message", "username": "calm-a", "body": "other shards serve on"}

        # A join made while the shard is down goes through once it is back.
        dave = member_socket(port, "davey", room)
        opened.append(dave)
        procs["shard 1"] = start_shard(1, settings, tmp_path)
        assert recv_json(dave, timeout=10) == {"type": "join", "username": "davey", "totalUsers": 1}
        erin = member("erin", room)
        assert recv_json(dave) == {"type": "join", "username": "erin", "totalUsers": 2}
        erin.send(message_frame("flowing again"))
        assert recv_json(dave) == {"type": "message", "username": "erin", "body": "flowing again"}
        for name in ("router", "shard 0", "shard 1"):
            assert stop(procs[name]) == 0, name
    finally:
        for ws in opened:
            ws.close()
        outputs = {name: finish(proc) for name, proc in procs.items()}
    assert "Traceback" not in "".join(outputs.values()), outputs


def test_sigterm_closes_a_join_waiting_for_a_dead_shard_1001(socket_dir: str, tmp_path: Path) -> None:
    """A client whose join waits for its shard is still the router's: when
    the router stops, it gets 1001 at once, not 1013 after the hold nor a
    dropped connection after the grace."""
    port = free_port()
    settings = base_env(port, socket_dir, GARIN_SHARDS="2", GARIN_SHARD_HOLD_TIMEOUT="60")
    procs = {"shard 0": start_shard(0, settings, tmp_path)}  # shard 1 never starts
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    try:
        calm = join(port, "calm", room_on(0, "calm", shards=2))  # the router is up
        waiting = member_socket(port, "waiting", room_on(1, "held", shards=2))
        time.sleep(0.5)  # its join has reached the router, which waits for shard 1
        os.kill(procs["router"].pid, signal.SIGTERM)
        assert expect_close(waiting, 1001, "server shutting down", timeout=5) < 5
        assert procs["router"].wait(timeout=15) == 0
        calm.close()
        assert stop(procs["shard 0"]) == 0
    finally:
        outputs = {name: finish(proc) for name, proc in procs.items()}
    assert "Traceback" not in "".join(outputs.values()), outputs


@pytest.mark.parametrize("over_limit", [False, True], ids=["admitted", "over-the-limit"])
def test_sigterm_answers_a_client_still_in_its_handshake_503(socket_dir: str, tmp_path: Path, over_limit: bool) -> None:
    """No WebSocket yet, so no close frame: an HTTP 503, at once. Also to a
    connection over a limit (answered with a close frame once its upgrade is
    in), not nothing after the refusal's 2 s."""
    port = free_port()
    limit = {"GARIN_MAX_CONNECTIONS": "1"} if over_limit else {}
    settings = base_env(port, socket_dir, GARIN_SHARDS="1", GARIN_HANDSHAKE_TIMEOUT="60", **limit)
    procs = {"shard 0": start_shard(0, settings, tmp_path)}
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    holder = None
    try:
        join(port, "calm", "calm-room").close()  # the router is up
        if over_limit:
            time.sleep(0.3)  # and has heard from the shard that "calm" ended
            holder = socket.create_connection(("127.0.0.1", port), timeout=5)  # the one connection allowed
            time.sleep(0.3)  # accepted and counted: the next is over the limit
        request = upgrade_request("127.0.0.1", port, "/", ORIGIN)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw.sendall(request[: len(request) // 2])
        time.sleep(0.3)  # the router has read it and waits for the rest
        os.kill(procs["router"].pid, signal.SIGTERM)
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        raw.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 503 Service Unavailable", answer
        assert b"connection: close" in [line.lower() for line in lines[1:]], answer
        assert body == b"server shutting down\n", answer
        assert procs["router"].wait(timeout=15) == 0
        assert stop(procs["shard 0"]) == 0
    finally:
        if holder is not None:
            holder.close()
        outputs = {name: finish(proc) for name, proc in procs.items()}
    assert "Traceback" not in "".join(outputs.values()), outputs
    # The stop answered the handshake of the connection meant (a refusal's is "conn -").
    conn = "-" if over_limit else r"\d+"
    assert re.search(rf"conn {conn} \(127\.0\.0\.1:\d+\): router stopping, answered 503", outputs["router"]), outputs


def test_sigterm_closes_a_member_moving_to_a_dead_shard_1001(socket_dir: str, tmp_path: Path) -> None:
    """A member passed on through the router (a room of another shard) that
    waits there for its shard is the router's too: 1001 when it stops."""
    port = free_port()
    settings = base_env(port, socket_dir, GARIN_SHARDS="2", GARIN_SHARD_HOLD_TIMEOUT="60")
    procs = {"shard 0": start_shard(0, settings, tmp_path)}  # shard 1 never starts
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    try:
        mover = join(port, "mover", room_on(0, "here", shards=2))
        mover.send(USERLEAVE)
        mover.send(join_frame("mover", room_on(1, "there", shards=2)))
        time.sleep(0.5)  # shard 0 has passed it to the router, which waits for shard 1
        os.kill(procs["router"].pid, signal.SIGTERM)
        assert expect_close(mover, 1001, "server shutting down", timeout=5) < 5
        assert procs["router"].wait(timeout=15) == 0
        assert stop(procs["shard 0"]) == 0
    finally:
        outputs = {name: finish(proc) for name, proc in procs.items()}
    assert "Traceback" not in "".join(outputs.values()), outputs


def sockets_of(pid: int) -> int:
    """How many sockets process `pid` has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed meanwhile
    return count


def joiner_with_a_big_message_begun(port: int, name: str, room: str) -> socket.socket:
    """A raw client that authenticates, joins `room` and, in the same write,
    begins a 60 KB message: what the router read of it travels with the
    hand-off, so a few such hand-offs fill a link nobody reads."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(upgrade_request("127.0.0.1", port, "/", ORIGIN))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    big = client_frame(OP_TEXT, b"x" * 60_000)
    sock.sendall(
        client_frame(OP_TEXT, auth_frame(make_token(SECRET, name, time.time(), 60)).encode())
        + client_frame(OP_TEXT, join_frame(name, room).encode())
        + big[: len(big) - 100]
    )
    return sock


def first_frame(sock: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """The first frame `sock` receives as (opcode, payload); None if the
    server hung up first. TimeoutError if none came within `timeout`."""
    sock.settimeout(timeout)
    buffer = b""
    while (frame := frame_at(buffer)) is None:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buffer += chunk
    first, start, end = frame
    return first & 0x0F, buffer[start:end]


def test_a_router_stops_within_its_grace_though_a_hand_off_waits_on_a_stopped_shard(
    socket_dir: str, tmp_path: Path,
) -> None:
    """A link send is shielded (half a message would corrupt the link) for up
    to 30 s; a stopping router bounds it by GARIN_SHUTDOWN_TIMEOUT. The client
    whose hand-off that cuts short is still the router's: it gets 1001 too."""
    port = free_port()
    grace = 1.0
    settings = base_env(port, socket_dir, GARIN_SHARDS="2", GARIN_SHUTDOWN_TIMEOUT=str(grace))
    procs = {"shard 0": start_shard(0, settings, tmp_path), "shard 1": start_shard(1, settings, tmp_path)}
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    raw: list[socket.socket] = []
    closed = 0
    try:
        room = room_on(1, "stuck", shards=2)
        join(port, "first", room).close()  # both up and linked
        with paused(procs["shard 1"].pid):
            # Within the 10 s before the router takes it for down: hand-offs
            # go on into the link until it is full, and the next one waits.
            raw = [joiner_with_a_big_message_begun(port, f"joiner-{n}", room) for n in range(10)]
            time.sleep(1.0)
            started = time.monotonic()
            os.kill(procs["router"].pid, signal.SIGTERM)
            try:
                code = procs["router"].wait(timeout=grace + 5)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the router still runs {grace + 5} s after SIGTERM") from None
            assert code == 0
            assert time.monotonic() - started < grace + 5
            # Each client the router still held gets 1001; the others went
            # whole into the link (the stopped shard holds them: nothing yet).
            closed = 0
            for n, sock in enumerate(raw):
                try:
                    frame = first_frame(sock, 0.5)
                except TimeoutError:
                    continue
                assert frame == (OP_CLOSE, (1001).to_bytes(2, "big") + b"server shutting down"), (n, frame)
                closed += 1
        for name in ("shard 0", "shard 1"):
            assert stop(procs[name]) == 0, name
    finally:
        for sock in raw:
            sock.close()
        outputs = {name: finish(proc) for name, proc in procs.items()}
    assert "Traceback" not in "".join(outputs.values()), outputs
    held = re.search(r"stopping: closing (\d+) clients", outputs["router"])
    assert held is not None and closed == int(held[1]), (closed, outputs["router"])
    # The case this test is for happened: a send cut at the deadline.
    assert "hand-off not sent (stopping:" in outputs["router"], outputs["router"]


def test_a_stopped_shard_is_reported_and_gets_no_new_clients_until_it_runs_again(
    garin_factory: ServerFactory,
) -> None:
    metrics_port = free_port()
    server = garin_factory(GARIN_METRICS_PORT=str(metrics_port), GARIN_SHARD_HOLD_TIMEOUT="1")
    assert server.process is not None
    pids = roles(server.process.pid)
    health = f"http://127.0.0.1:{metrics_port}/health"
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = room_on(2, "stopped")
        alice = clients.join("alice", room, total=1)
        with paused(pids["shard 2"]):
            # Stopped, its sockets stay open: only its silence on the link shows.
            wait_until(lambda: get(health)[0] == 503, "/health to report the stopped shard", timeout=25)
            assert json.loads(get(health)[1])["shards"]["2"] is False
            carol = clients.authed("carol")
            carol.send(join_frame("carol", room))
            expect_close(carol, *UNAVAILABLE)
            # Other shards serve on.
            clients.join(new_user(), room_on(1, "fine"), total=1)
        wait_until(lambda: get(health)[0] == 200, "/health to recover")
        clients.join("bobby", room, total=2)
        expect_join(alice, "bobby", 2)


# -- a router dies -----------------------------------------------------------------


def test_router_killed_while_chats_go_on_they_go_on(garin_factory: ServerFactory) -> None:
    server = garin_factory(GARIN_ROUTERS="2")
    assert server.process is not None
    pids = roles(server.process.pid)
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        rooms = [room_on(index, "r") for index in (0, 3)]
        members = {room: join_members(clients, room, [f"{room[:6]}-{n}" for n in range(3)]) for room in rooms}
        # Chats under way while both routers are killed in turn.
        for victim in ("router 0", "router 1"):
            os.kill(pids[victim], signal.SIGKILL)
            wait_until(lambda victim=victim: gone(pids[victim]), f"{victim} to die")
            for room, (first, *others) in members.items():
                first.send(message_frame(f"after {victim}"))
                for ws in others:
                    expect_message(ws, f"{room[:6]}-0", f"after {victim}")
            pids[victim] = replaced(server, victim, pids[victim])
        # Nobody left: a newcomer is counted with everyone.
        for room, joined in members.items():
            clients.join(new_user(), room, total=len(joined) + 1)


# -- moving between shards ------------------------------------------------------------


def test_a_member_moving_to_another_shards_room_keeps_order_and_its_old_room_sees_it_leave(
    garin_factory: ServerFactory,
) -> None:
    server = garin_factory()
    assert server.process is not None
    router = roles(server.process.pid)["router 0"]
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        here, there = room_on(0, "here"), room_on(3, "there")
        sockets_before = sockets_of(router)
        mover, stayer = join_members(clients, here, ["mover", "stayer"])
        (host,) = join_members(clients, there, ["host"])
        # Leave, join elsewhere and talk, all in one go: nothing may be lost
        # or reordered on the way from one shard to the other.
        mover.send(message_frame("m0"))
        mover.send('{"type":"userleave"}')
        mover.send(join_frame("mover", there))
        for n in range(1, 20):
            mover.send(message_frame(f"m{n}"))
        expect_message(stayer, "mover", "m0")
        assert recv_json(stayer) == {"type": "userleave", "username": "mover", "totalUsers": 1}
        expect_join(mover, "mover", 2)
        expect_join(host, "mover", 2)
        for n in range(1, 20):
            expect_message(host, "mover", f"m{n}")
        # And back again, twice, still chatting both ways.
        left = host
        for room, other, name in ((here, stayer, "stayer"), (there, host, "host")):
            mover.send('{"type":"userleave"}')
            mover.send(join_frame("mover", room))
            assert recv_json(left) == {"type": "userleave", "username": "mover", "totalUsers": 1}
            expect_join(mover, "mover", 2)
            expect_join(other, "mover", 2)
            other.send(message_frame("welcome back"))
            expect_message(mover, name, "welcome back")
            mover.send(message_frame("thanks"))
            expect_message(other, "mover", "thanks")
            left = other
        # The router passed the member on three times and kept no socket.
        # (Only sockets: the ban list's SQLite file comes and goes.)
        assert sockets_of(router) <= sockets_before


# -- SIGTERM under honcho ------------------------------------------------------------


@pytest.mark.parametrize("target", ["honcho", "router", "shard 2"])
def test_sigterm_under_honcho_stops_every_process_gracefully(target: str, socket_dir: str, tmp_path: Path) -> None:
    """Ctrl-C makes honcho SIGTERM every process; a process that stops on its
    own SIGTERM makes honcho stop the rest. Either way all stop cleanly."""
    port = free_port()
    proc = start_honcho(port, socket_dir, tmp_path)
    opened: list[ClientConnection] = []
    try:
        for index in range(4):
            opened.append(join(port, f"user{index}", room_on(index, "h"), timeout=20))
        children = roles(proc.pid)
        assert set(children) == {"router", "shard 0", "shard 1", "shard 2", "shard 3"}, children
        os.kill(proc.pid if target == "honcho" else children[target], signal.SIGTERM)
        for ws in opened:
            expect_close(ws, 1001, "server shutting down", timeout=15)
        proc.wait(timeout=20)  # honcho's own code is 143 when it got the SIGTERM
    finally:
        for ws in opened:
            ws.close()
        output = finish(proc)
    for name in ("router.1", "shard0.1", "shard1.1", "shard2.1", "shard3.1"):
        assert f"{name} stopped (rc=0)" in output, output
    assert "Traceback" not in output, output
    assert not list(Path(socket_dir).glob("*.sock")), output

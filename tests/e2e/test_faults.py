"""Process faults, proved against real processes: kill -9, crash loops, SIGTERM.

What is promised (README "Failure behaviour"):
- the supervisor replaces a dead child in its slot, and gives up with one
  clear line (exit 1) when a child keeps dying right after start;
- a shard killed under traffic costs no client its connection: routers hold
  that shard's events, relink, replay their members and then send what they
  held, so nothing sent after the shard died is lost and counts stay right;
- the hold is bounded in bytes and time; past it the shard's clients are
  closed 1013 "room unavailable" and its rooms refuse joins until it is back;
- a router killed next to another: the shards drop its members and every room
  hears `userleave` for them, while the other router keeps serving;
- under honcho, SIGTERM to any process stops everything gracefully.

Waits poll with a bound; nothing here asserts on timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from garin.auth import make_token
from shard.server import REVOKE_TIMEOUT_S

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import (
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
    recv_json,
    room_on,
)
from test_metrics import eventually, get, sample
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


def router_pid(ws: ClientConnection, port: int, pids: list[int]) -> int:
    """Which of the router processes `pids` holds the server end of `ws`."""
    mine = ws.socket.getsockname()[1]
    inodes = [
        fields[9]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if fields[1].endswith(f":{port:04X}") and fields[2].endswith(f":{mine:04X}")
    ]
    assert len(inodes) == 1, inodes
    target = f"socket:[{inodes[0]}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    raise AssertionError(f"no router among {pids} holds the connection from port {mine}")


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


@contextlib.contextmanager
def only_router(chosen: int, routers: list[int]) -> Iterator[None]:
    """New connections reach only `chosen`: the other routers sleep (SIGSTOP)
    meanwhile, since a shared listening socket gives each connection to
    whichever router accepts first, and on a busy machine that is often the
    same one."""
    others = [pid for pid in routers if pid != chosen]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def members_on_both(
    clients: Clients, server: GarinServer, room: str, routers: list[int], each: int, prefix: str
) -> dict[int, list[tuple[str, ClientConnection]]]:
    """`each` members of `room` on every router, joined in turn; by router pid.
    Everyone's join broadcasts are consumed."""
    by_router: dict[int, list[tuple[str, ClientConnection]]] = {pid: [] for pid in routers}
    everyone: list[ClientConnection] = []
    for n in range(each):
        for pid in routers:
            name = f"{prefix}{n}-{uuid.uuid4().hex[:6]}"
            with only_router(pid, routers):
                ws = clients.authed(name)
                ws.send(join_frame(name, room))
            # Confirmed only once the others run: a join to a room that is
            # solo on another router waits for that router to release it.
            expect_join(ws, name, len(everyone) + 1)
            assert router_pid(ws, server.port, routers) == pid
            for earlier in everyone:
                expect_join(earlier, name, len(everyone) + 1)
            everyone.append(ws)
            by_router[pid].append((name, ws))
    return by_router


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
        # Served again, and nobody was disconnected: the room still counts alice.
        bob = clients.join("bobby", room, total=2)
        expect_join(alice, "bobby", 2)
        bob.send(message_frame("after the shard came back"))
        expect_message(alice, "bobby", "after the shard came back")

        os.kill(before["router 0"], signal.SIGKILL)
        router = replaced(server, "router 0", before["router 0"])
        expect_dropped(alice)
        expect_dropped(bob)
        # The new router serves every shard; the old router's members are gone.
        for index in range(4):
            clients.join(new_user(), room_on(index), total=1)
        carol = clients.join("carol", room, total=1)
        carol.send(message_frame("still here"))

    after = roles(server.process.pid)
    assert after == {**before, "shard 2": shard, "router 0": router}, after
    log = server.log_tail(200)
    assert "shard 2 exited with code -9" in log and "router 0 exited with code -9" in log, log


def test_child_that_always_dies_at_start_stops_run_with_one_clear_line(tmp_path: Path) -> None:
    # A socket directory the shard cannot create: its parent is a plain file.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = base_env(free_port(), str(blocker / "s"))
    proc = start([*GARIN, "run", "--shards", "1"], env, tmp_path)
    try:
        code = proc.wait(timeout=40)
    finally:
        output = finish(proc)
    assert code == 1, output
    giving_up = [line for line in output.splitlines() if "giving up" in line]
    assert len(giving_up) == 1, output
    assert "ERROR shard 0 exited with code 2 5 times right after start; giving up" in giving_up[0]
    assert "Not a directory" in output  # the shard's own reason, once per attempt
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


class Chatter(threading.Thread):
    """Sends numbered messages from one client until stopped: traffic across the kill."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        # Numbers are taken before sending: a message numbered `next` or
        # later had not been sent when `next` was read.
        self.next = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.01):
                number = self.next
                self.next = number + 1
                self.ws.send(message_frame(f"m{number}"))
        except BaseException as exc:  # reported by the test
            self.error = exc


def chat_until(ws: ClientConnection, sender: str, last: str) -> list[Any]:
    """Everything `ws` receives up to the message `last` from `sender`: message
    numbers as ints, any other event as its dict."""
    got: list[Any] = []
    while True:
        event = recv_json(ws)
        if event.get("type") == "message" and event.get("username") == sender:
            if event["body"] == last:
                return got
            got.append(int(event["body"][1:]))
        else:
            got.append(event)


def test_shard_killed_under_traffic_loses_no_client_and_no_held_message(
    garin_factory: ServerFactory,
) -> None:
    server = garin_factory(GARIN_ROUTERS="2")
    assert server.process is not None
    pids = roles(server.process.pid)
    routers = [pids["router 0"], pids["router 1"]]
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = room_on(1, "busy")
        by_router = members_on_both(clients, server, room, routers, 2, "m")
        members = [member for group in by_router.values() for member in group]
        (sender, talker), *listeners = members
        calm_room = room_on(0, "calm")
        calm_a, calm_b = join_members(clients, calm_room, ["calm-a", "calm-b"])

        chatter = Chatter(talker)
        chatter.start()
        stack.callback(chatter.stopping.set)
        for _, ws in listeners:
            wait_until(lambda ws=ws: recv_json(ws).get("body") == "m5", "traffic before the kill")

        os.kill(pids["shard 1"], signal.SIGKILL)
        wait_until(lambda: gone(pids["shard 1"]), "shard 1 to die")
        # Everything from here on must arrive: nothing can be written into
        # the dead shard's socket any more, so the routers hold it.
        first_held = chatter.next
        # The other shard serves on; a newcomer's join is held.
        calm_a.send(message_frame("unaffected"))
        expect_message(calm_b, "calm-a", "unaffected")
        newcomer_name = "newcomer"
        newcomer = clients.authed(newcomer_name)
        newcomer.send(join_frame(newcomer_name, room))

        replaced(server, "shard 1", pids["shard 1"])
        # Messages flow again, and the join counts every router's members.
        expect_join(newcomer, newcomer_name, len(members) + 1)
        chatter.stopping.set()
        chatter.join(timeout=10)
        assert chatter.error is None, chatter.error
        talker.send(message_frame("end"))

        for name, ws in listeners:
            got = chat_until(ws, sender, "end")
            numbers = [n for n in got if isinstance(n, int)]
            events = [e for e in got if not isinstance(e, int)]
            assert events == [{"type": "join", "username": newcomer_name, "totalUsers": len(members) + 1}], (name, events)
            assert numbers == sorted(set(numbers)), f"{name}: duplicated or reordered"
            # What was in flight when the shard died may be lost, nothing after.
            assert numbers[-1] == chatter.next - 1, (name, numbers[-1], chatter.next)
            assert set(range(first_held, chatter.next)) <= set(numbers), (
                f"{name} missed held messages {sorted(set(range(first_held, chatter.next)) - set(numbers))[:10]} "
                f"(held from {first_held}; router {router_pid(ws, server.port, routers)} of {routers}; "
                f"got {[n for n in numbers if first_held - 5 <= n <= first_held + 5]} around it)"
            )
        chat_until(newcomer, sender, "end")
        expect_join(talker, newcomer_name, len(members) + 1)

        # The next join after the restart is counted right, and everyone is still here.
        late = clients.join("latecomer", room, total=len(members) + 2)
        for _, ws in [*members, ("newcomer", newcomer)]:
            expect_join(ws, "latecomer", len(members) + 2)
        late.send(message_frame("hello all"))
        for _, ws in [*members, ("newcomer", newcomer)]:
            expect_message(ws, "latecomer", "hello all")


def start_shard(index: int, settings: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return start([*GARIN, "shard", "--index", str(index)], settings, cwd)


def test_hold_is_bounded_in_bytes_and_time_then_the_shard_serves_again(socket_dir: str, tmp_path: Path) -> None:
    """Shards and router as separate processes (the Procfile way), so that a
    killed shard stays down until the test starts it again."""
    port = free_port()
    settings = base_env(port, socket_dir, GARIN_SHARDS="2", GARIN_SHARD_HOLD_BYTES="2048", GARIN_SHARD_HOLD_TIMEOUT="1.5")
    procs = {"shard 0": start_shard(0, settings, tmp_path), "shard 1": start_shard(1, settings, tmp_path)}
    procs["router"] = start([*GARIN, "router"], settings, tmp_path)
    opened: list[ClientConnection] = []

    def member(name: str, room: str) -> ClientConnection:
        ws = join(port, name, room)
        opened.append(ws)
        return ws

    def restart_shard_1() -> None:
        procs["shard 1"] = start_shard(1, settings, tmp_path)
        # Joins are refused until the router relinks: let the shard listen first.
        wait_until(lambda: os.path.exists(f"{socket_dir}/shard-1.sock"), "shard 1 to listen")

    def kill_shard_1() -> None:
        shard = procs["shard 1"]
        shard.kill()
        shard.wait(timeout=10)
        finish(shard)

    try:
        room, calm_room = room_on(1, "held", shards=2), room_on(0, "calm", shards=2)
        calm_a = member("calm-a", calm_room)
        calm_b = member("calm-b", calm_room)
        assert recv_json(calm_a)["username"] == "calm-b"
        alice = member("alice", room)
        bobby = member("bobby", room)
        assert recv_json(alice)["username"] == "bobby"

        # Bytes: more than GARIN_SHARD_HOLD_BYTES held closes the room's clients at once.
        kill_shard_1()
        alice.send(message_frame("x" * 3000))
        expect_close(alice, *UNAVAILABLE)
        expect_close(bobby, *UNAVAILABLE)
        # ... and its rooms refuse joins until the shard is back.
        with contextlib.closing(member_socket(port, "carol", room)) as carol:
            expect_close(carol, *UNAVAILABLE)
        calm_a.send(message_frame("other shards serve on"))
        assert recv_json(calm_b) == {"type": "message", "username": "calm-a", "body": "other shards serve on"}

        restart_shard_1()
        dave = member("davey", room)  # retries until the router has relinked
        erin = member("erin", room)
        assert recv_json(dave) == {"type": "join", "username": "erin", "totalUsers": 2}
        erin.send(message_frame("flowing again"))
        assert recv_json(dave) == {"type": "message", "username": "erin", "body": "flowing again"}

        # Time: a shard down longer than GARIN_SHARD_HOLD_TIMEOUT closes its
        # members and the clients still waiting for their join there.
        kill_shard_1()
        frank = member_socket(port, "frank", room)
        opened.append(frank)
        expect_close(dave, *UNAVAILABLE)
        expect_close(erin, *UNAVAILABLE)
        expect_close(frank, *UNAVAILABLE)
        calm_b.send(message_frame("still serving"))
        assert recv_json(calm_a) == {"type": "message", "username": "calm-b", "body": "still serving"}

        restart_shard_1()
        member("grace", room)
        for name in ("router", "shard 0", "shard 1"):
            assert stop(procs[name]) == 0, name
    finally:
        for ws in opened:
            ws.close()
        outputs = {name: finish(proc) for name, proc in procs.items()}
    router_log = outputs["router"]
    assert "shard 1 unreachable, more than 2048 bytes held for it: closing its 2 clients with 1013" in router_log
    assert "shard 1 unreachable, down for 1.5 s: closing its" in router_log
    assert "Traceback" not in "".join(outputs.values()), outputs


# -- a router dies -----------------------------------------------------------------


def test_router_killed_next_to_another_its_members_leave_every_room(garin_factory: ServerFactory) -> None:
    server = garin_factory(GARIN_ROUTERS="2")
    assert server.process is not None
    pids = roles(server.process.pid)
    victim, survivor = pids["router 0"], pids["router 1"]
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        rooms_by_index = {index: room_on(index, "r") for index in (0, 3)}
        rooms = {index: members_on_both(clients, server, room, [victim, survivor], 2, f"s{index}-")
                 for index, room in rooms_by_index.items()}

        os.kill(victim, signal.SIGKILL)
        for by_router in rooms.values():
            for _, ws in by_router[victim]:
                expect_dropped(ws)
        for index, by_router in rooms.items():
            gone_names = {name for name, _ in by_router[victim]}
            stay = by_router[survivor]
            total = len(gone_names) + len(stay)
            for name, ws in stay:
                leaves = [recv_json(ws) for _ in gone_names]
                assert {e["username"] for e in leaves} == gone_names, (index, name, leaves)
                assert [e["totalUsers"] for e in leaves] == list(range(total - 1, len(stay) - 1, -1)), leaves
                assert all(e["type"] == "userleave" for e in leaves), leaves
            # The other router serves on: its members talk, a newcomer is counted right.
            (speaker, voice), *others = stay
            voice.send(message_frame(f"still here in {index}"))
            for _, ws in others:
                expect_message(ws, speaker, f"still here in {index}")
            # Wherever a newcomer lands (the survivor or the victim's
            # replacement), the room counts only the survivors.
            newcomer = new_user()
            clients.join(newcomer, rooms_by_index[index], total=len(stay) + 1)
            for _, ws in stay:
                expect_join(ws, newcomer, len(stay) + 1)
        replaced(server, "router 0", victim)


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


# -- solo rooms: a room whose members are all on one router ------------------------------


def with_metrics(garin_factory: ServerFactory, **env: str) -> tuple[GarinServer, str, dict[str, int]]:
    """A server with its metrics port on: it, its metrics URL, its pids by role."""
    port = free_port()
    server = garin_factory(GARIN_METRICS_PORT=str(port), **env)
    assert server.process is not None
    return server, f"http://127.0.0.1:{port}/metrics", roles(server.process.pid)


@dataclass
class SoloRoom:
    server: GarinServer
    metrics: str
    routers: list[int]
    stack: contextlib.ExitStack
    clients: Clients
    room: str
    talker: ClientConnection
    listener: ClientConnection


@contextlib.contextmanager
def solo_room_on_two_routers(garin_factory: ServerFactory, shard: int, name: str) -> Iterator[SoloRoom]:
    """A server with two routers and its metrics on, where "talker" and
    "listener" have created a room of `shard` on the first router: it is solo there."""
    server, metrics, pids = with_metrics(garin_factory, GARIN_ROUTERS="2")
    routers = [pids["router 0"], pids["router 1"]]
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = room_on(shard, name)
        with only_router(routers[0], routers):
            talker = clients.join("talker", room, total=1)
            listener = clients.join("listener", room, total=2)
        expect_join(talker, "listener", 2)
        assert router_pid(talker, server.port, routers) == router_pid(listener, server.port, routers) == routers[0]
        yield SoloRoom(server, metrics, routers, stack, clients, room, talker, listener)


def test_a_join_through_another_router_takes_a_solo_room_back_without_losing_a_message(
    garin_factory: ServerFactory,
) -> None:
    with solo_room_on_two_routers(garin_factory, 0, "solo") as solo:
        server, metrics, routers, stack, clients, room = (
            solo.server, solo.metrics, solo.routers, solo.stack, solo.clients, solo.room
        )
        talker, listener = solo.talker, solo.listener
        b = routers[1]
        eventually(lambda: sample(get(metrics)[1], "garin_solo_rooms", shard="0") == 1)
        chatter = Chatter(talker)
        chatter.start()
        stack.callback(chatter.stopping.set)
        wait_until(lambda: recv_json(listener).get("body") == "m5", "traffic before the join")

        with only_router(b, routers):
            newcomer = clients.authed("newcomer")
            newcomer.send(join_frame("newcomer", room))
        assert router_pid(newcomer, server.port, routers) == b
        expect_join(newcomer, "newcomer", 3)
        joined_at = chatter.next
        wait_until(lambda: chatter.next > joined_at + 20, "traffic after the join")
        chatter.stopping.set()
        chatter.join(timeout=10)
        assert chatter.error is None, chatter.error
        talker.send(message_frame("end"))

        heard = chat_until(listener, "talker", "end")
        seen = chat_until(newcomer, "talker", "end")
        announced = heard.index({"type": "join", "username": "newcomer", "totalUsers": 3})
        after = [n for n in heard[announced + 1:] if isinstance(n, int)]
        assert heard[:announced] + heard[announced + 1:] == list(range(6, chatter.next)), "listener lost messages"
        # Everything the room heard after the join reached the newcomer, in
        # order, without a gap: router a stopped fanning out before it showed.
        assert after and set(after) <= set(seen), sorted(set(after) - set(seen))[:10]
        assert seen == list(range(seen[0], chatter.next))
        expect_join(talker, "newcomer", 3)

        # The room now goes through the shard both ways.
        newcomer.send(message_frame("from b"))
        expect_message(talker, "newcomer", "from b")
        expect_message(listener, "newcomer", "from b")
        eventually(lambda: (text := get(metrics)[1]) and sample(text, "garin_solo_rooms", shard="0") == 0
                   and sample(text, "garin_solo_revokes_total") == 1)


def test_a_stopped_router_holding_a_solo_room_is_unlinked_and_comes_back(
    garin_factory: ServerFactory,
) -> None:
    with solo_room_on_two_routers(garin_factory, 1, "stuck") as solo:
        server, metrics, routers, clients, room = solo.server, solo.metrics, solo.routers, solo.clients, solo.room
        talker, listener = solo.talker, solo.listener
        a, b = routers

        os.kill(a, signal.SIGSTOP)
        try:
            newcomer = clients.authed("newcomer")
            newcomer.send(join_frame("newcomer", room))
            # Router a cannot answer the Revoke: the join waits, then (after
            # shard.server.REVOKE_TIMEOUT_S) the shard unlinks a, whose members
            # leave with it, and the newcomer is alone in the room.
            got = recv_json(newcomer, timeout=REVOKE_TIMEOUT_S * 3)
            assert got == {"type": "join", "username": "newcomer", "totalUsers": 1}
        finally:
            os.kill(a, signal.SIGCONT)
        assert router_pid(newcomer, server.port, routers) == b
        # Router a relinks and replays its members (not announced); the room
        # is b's alone no longer, and messages flow both ways again.
        def both_hear(n: int) -> bool:
            talker.send(message_frame(f"ping{n}"))
            try:
                got = recv_json(newcomer, timeout=0.5)
            except AssertionError:
                return False
            return got == {"type": "message", "username": "talker", "body": f"ping{n}"}

        tries = iter(range(100))
        wait_until(lambda: both_hear(next(tries)), "router a to relink")
        newcomer.send(message_frame("from b"))
        expect_message(talker, "newcomer", "from b")
        for event in iter(lambda: recv_json(listener), {"type": "message", "username": "newcomer", "body": "from b"}):
            assert event.get("username") == "talker", event
        # Taken back from a (unlinked), then from b when a replayed its members.
        eventually(lambda: (text := get(metrics)[1]) and sample(text, "garin_solo_unlinks_total") == 1
                   and sample(text, "garin_solo_revokes_total") == 2)


def test_a_room_is_solo_again_after_its_shard_restarts(garin_factory: ServerFactory) -> None:
    server, metrics, pids = with_metrics(garin_factory)  # one router
    with log_on_failure(server), contextlib.ExitStack() as stack:
        clients = Clients(stack, server)
        room = room_on(0, "phoenix")
        talker = clients.join("talker", room, total=1)
        listener = clients.join("listener", room, total=2)
        expect_join(talker, "listener", 2)
        eventually(lambda: sample(get(metrics)[1], "garin_solo_rooms", shard="0") == 1)

        os.kill(pids["shard 0"], signal.SIGKILL)
        wait_until(lambda: gone(pids["shard 0"]), "shard 0 to die")
        replaced(server, "shard 0", pids["shard 0"])
        # The new shard rebuilds the room from the router's replay, offers it
        # back, and the router takes it: solo again, without a rejoin.
        eventually(lambda: sample(get(metrics)[1], "garin_solo_rooms", shard="0") == 1, timeout=15)
        for n in range(20):
            talker.send(message_frame(f"m{n}"))
        for n in range(20):
            expect_message(listener, "talker", f"m{n}")
        # Still a room like any other: a newcomer is counted and hears it.
        newcomer = clients.join("newcomer", room, total=3)
        talker.send(message_frame("after"))
        expect_message(newcomer, "talker", "after")

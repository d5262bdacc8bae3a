"""The processes as an operator runs them: `garin run`, honcho, the CLI, stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import shutil
import time
from pathlib import Path

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from garin.auth import make_token
from garin.routing import shard_for

# tests/e2e is on sys.path (pytest's default "prepend" import mode).
from conftest import RawClient, free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SECRET = "processes-test-secret-0123456789abcdef"
ORIGIN = "http://allowed.test"
BIN = Path(sys.executable).parent


def base_env(port: int, socket_dir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARIN_", "JWT_", "ALLOWED_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        JWT_DECODE_SECRET=SECRET,
        ALLOWED_ORIGINS=ORIGIN,
        GARIN_HOST="127.0.0.1",
        PORT=str(port),
        GARIN_SOCKET_DIR=socket_dir,
        GARIN_RATE_LIMIT_COUNT="0",
    )
    env.update(extra)
    return env


def join(port: int, username: str, room: str, timeout: float = 10.0):
    """Connect, auth and join, retrying until the server is up; returns the open client."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws = connect(f"ws://127.0.0.1:{port}/", origin=ORIGIN, open_timeout=2).__enter__()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        ws.send(json.dumps({"type": "auth", "body": make_token(SECRET, username, time.time(), 60)}))
        ws.send(json.dumps({"type": "join", "username": username, "room": room}))
        try:
            event = json.loads(ws.recv(timeout=3))
        except (TimeoutError, ConnectionClosed):
            # Shards still linking: the join may be held; try again.
            ws.close()
            if time.monotonic() > deadline:
                raise
            continue
        assert event["type"] == "join" and event["username"] == username
        return ws


def recv_json(ws, timeout: float = 3.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def start(argv: list[str], env: dict[str, str], cwd) -> subprocess.Popen:
    # Own session, so a failed test can kill the whole tree by group.
    return subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> str:
    """Kill whatever is left of the tree and return its output."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_run_serves_all_shards_and_sigterm_closes_clients_with_1001(socket_dir, tmp_path):
    port = free_port()
    proc = start([sys.executable, "-m", "garin", "run", "--shards", "4"], base_env(port, socket_dir), tmp_path)
    try:
        rooms = {}
        for n in range(200):
            rooms.setdefault(shard_for(f"room-{n}", 4), f"room-{n}")
            if len(rooms) == 4:
                break
        clients = [join(port, f"user{shard}", room) for shard, room in sorted(rooms.items())]
        assert sorted(os.listdir(socket_dir)) == [f"shard-{i}.sock" for i in range(4)]
        assert oct(os.stat(socket_dir).st_mode & 0o777) == "0o700"
        children = descendants(proc.pid)
        assert len(children) == 5  # 4 shards + 1 router

        proc.send_signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "server shutting down")
        assert proc.wait(timeout=15) == 0
    finally:
        output = finish(proc)
    assert not os.path.exists(socket_dir), output
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}") and "garin" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert "Traceback" not in output


def test_run_with_two_routers_shares_one_port(socket_dir, tmp_path):
    port = free_port()
    proc = start([sys.executable, "-m", "garin", "run", "--shards", "2", "--routers", "2"], base_env(port, socket_dir), tmp_path)
    try:
        # Many connections land on both routers; a room spans them.
        members = [join(port, f"member{i}", "shared-room") for i in range(12)]
        members[0].send(json.dumps({"type": "message", "body": "across routers"}))
        for ws in members[1:]:
            while (event := recv_json(ws))["type"] == "join":
                pass
            assert event == {"type": "message", "username": "member0", "body": "across routers"}
        for ws in members:
            ws.close()
        assert stop(proc) == 0
    finally:
        finish(proc)


def test_second_run_on_same_port_fails_with_one_line(socket_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "garin", "run"], env=base_env(port, socket_dir), cwd=tmp_path,
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def start_honcho(port: int, socket_dir: str, tmp_path) -> subprocess.Popen:
    """The Procfile under honcho, configured by an env file as an operator would."""
    env_file = tmp_path / "garin.env"
    env_file.write_text(
        f"JWT_DECODE_SECRET={SECRET}\nALLOWED_ORIGINS={ORIGIN}\nGARIN_HOST=127.0.0.1\n"
        f"GARIN_PORT={port}\nGARIN_SHARDS=4\nGARIN_SOCKET_DIR={socket_dir}\nGARIN_RATE_LIMIT_COUNT=0\n"
    )
    env = base_env(port, socket_dir)
    for key in ("PORT", "GARIN_SOCKET_DIR", "GARIN_HOST", "JWT_DECODE_SECRET", "ALLOWED_ORIGINS", "GARIN_RATE_LIMIT_COUNT"):
        env.pop(key)
    return start([str(BIN / "honcho"), "start", "-f", str(REPO / "Procfile"), "-e", str(env_file), "-d", str(tmp_path)], env, tmp_path)


def test_procfile_under_honcho(socket_dir, tmp_path):
    port = free_port()
    proc = start_honcho(port, socket_dir, tmp_path)
    try:
        rooms = {}
        for n in range(200):
            rooms.setdefault(shard_for(f"hroom-{n}", 4), f"hroom-{n}")
        for shard, room in sorted(rooms.items()):
            a = join(port, "alice", room, timeout=15)
            b = join(port, "bobby", room)
            assert recv_json(a) == {"type": "join", "username": "bobby", "totalUsers": 2}
            b.send(json.dumps({"type": "message", "body": f"hi on shard {shard}"}))
            assert recv_json(a) == {"type": "message", "username": "bobby", "body": f"hi on shard {shard}"}
            a.close()
            assert recv_json(b) == {"type": "userleave", "username": "alice", "totalUsers": 1}
            b.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        output = finish(proc)
    for name in ("router.1", "shard0.1", "shard3.1"):
        assert f"{name} stopped (rc=0)" in output, output
    assert "Traceback" not in output
    assert not [p for p in Path(socket_dir).glob("*.sock")] if Path(socket_dir).exists() else True


def test_procfile_under_honcho_with_a_garinchat_env_file(tmp_path):
    """A GarinChat user's .env (PORT, JWT_DECODE_SECRET, ALLOWED_ORIGINS; the
    host only to stay on loopback): the Procfile holds the shard count, and
    every process finds the same socket directory although honcho gives each
    its own PORT."""
    port = free_port()
    (tmp_path / ".env").write_text(f"PORT={port}\nJWT_DECODE_SECRET={SECRET}\nALLOWED_ORIGINS={ORIGIN}\nGARIN_HOST=127.0.0.1\n")
    env = base_env(port, "unused")
    for key in list(env):
        if key.startswith("GARIN_") or key in ("PORT", "JWT_DECODE_SECRET", "ALLOWED_ORIGINS"):
            env.pop(key)
    # The processes use the default socket directory: removed after if this made it.
    default_dir = Path(f"/tmp/garin-{os.getuid()}")
    made_here = not default_dir.exists()
    # honcho's -p gives the first entry (the router) that port.
    proc = start([str(BIN / "honcho"), "start", "-f", str(REPO / "Procfile"), "-d", str(tmp_path), "-p", str(port)], env, tmp_path)
    try:
        rooms = {}
        for n in range(200):
            rooms.setdefault(shard_for(f"gc-{n}", 4), f"gc-{n}")
        for shard, room in sorted(rooms.items()):
            a = join(port, "alice", room, timeout=20)
            b = join(port, "bobby", room)
            assert recv_json(a) == {"type": "join", "username": "bobby", "totalUsers": 2}
            a.close()
            b.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        output = finish(proc)
        if made_here:
            shutil.rmtree(default_dir, ignore_errors=True)
    assert "outside 0.." not in output and "Traceback" not in output, output
    # The router says once where the ban list is (the shards keep none).
    assert output.count(f"ban list: {os.environ['XDG_STATE_HOME']}/garin/bans.sqlite3") == 1, output


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"JWT_DECODE_SECRET": None}, [], "JWT_DECODE_SECRET is not set"),
        ({"ALLOWED_ORIGINS": None}, [], "ALLOWED_ORIGINS is not set"),
        ({"JWT_DECODE_SECRET": "short"}, [], "GARIN_ALLOW_WEAK_SECRET"),
        ({"GARIN_SHARDS": "four"}, [], "GARIN_SHARDS must be a whole number"),
        ({}, ["--shards", "0"], "--shards must be between 1"),
        ({"GARIN_AUTH_TIMEOUT": "soon"}, [], "GARIN_AUTH_TIMEOUT must be a number of seconds"),
        ({"ALLOWED_ORIGINS": "example.com"}, [], "ALLOWED_ORIGINS 'example.com' is not an origin"),
        ({"GARIN_ROOM_MIN": "10", "GARIN_ROOM_MAX": "5"}, [], "GARIN_ROOM_MIN (10) is larger"),
    ],
)
def test_bad_config_refuses_to_start_with_one_line(socket_dir, tmp_path, env, args, needle):
    full = base_env(free_port(), socket_dir)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    result = subprocess.run(
        [sys.executable, "-m", "garin", "run", *args], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.parametrize("how", ["env", "flag", "value"])
def test_weak_secret_allowed_with_explicit_opt_out(socket_dir, tmp_path, how):
    port = free_port()
    env = base_env(port, socket_dir, JWT_DECODE_SECRET="short")
    args = ["--allow-weak-secret", "--shards", "1"] if how == "flag" else ["--shards", "1"]  # as for `garin token`
    if how == "env":
        env["GARIN_ALLOW_WEAK_SECRET"] = "1"
    elif how == "value":
        args.append("--allow-weak-secret=true")
    proc = start([sys.executable, "-m", "garin", "run", *args], env, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with connect(f"ws://127.0.0.1:{port}/", origin=ORIGIN, open_timeout=2) as ws:
                    ws.send(json.dumps({"type": "auth", "body": make_token("short", "weak", time.time(), 60)}))
                    ws.send(json.dumps({"type": "join", "username": "weak", "room": "weak-room"}))
                    assert recv_json(ws)["type"] == "join"
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert stop(proc) == 0
    finally:
        output = finish(proc)
    assert "never in production" in output


def test_weak_secret_refused_when_the_command_line_says_false_over_the_env(socket_dir, tmp_path):
    env = base_env(free_port(), socket_dir, JWT_DECODE_SECRET="short", GARIN_ALLOW_WEAK_SECRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "garin", "run", "--allow-weak-secret", "false"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "JWT_DECODE_SECRET" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_token_command_mints_a_verifiable_token(tmp_path):
    env = {**os.environ, "JWT_DECODE_SECRET": SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "garin", "token", "alice", "--ttl", "30m"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 1790 <= claims["exp"] - time.time() <= 1800


def test_token_command_reads_dotenv(tmp_path):
    (tmp_path / ".env").write_text(f"# comment\nexport JWT_DECODE_SECRET='{SECRET}'\n")
    env = {k: v for k, v in os.environ.items() if k != "JWT_DECODE_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "garin", "token", "bob"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "bob"


@pytest.mark.parametrize("command", [[], ["run"], ["router"], ["shard"], ["token"]])
def test_help_explains_every_command(command):
    result = subprocess.run(
        [sys.executable, "-m", "garin", *command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "Usage: " in result.stdout
    if command in (["run"], ["router"], ["shard"]):
        for variable in ("PORT", "GARIN_SHARDS", "GARIN_RATE_LIMIT_COUNT"):
            assert variable in result.stdout
    # A shard checks no tokens and no origins: its help does not offer them.
    if command in (["run"], ["router"]):
        for variable in ("JWT_DECODE_SECRET", "ALLOWED_ORIGINS"):
            assert variable in result.stdout
    if command == ["shard"]:
        assert "JWT_DECODE_SECRET" not in result.stdout and "ALLOWED_ORIGINS" not in result.stdout
    if command == ["run"]:
        text = " ".join(result.stdout.split())
        # Optional settings are not called required; defaults are not contradicted.
        assert "GARIN_REDIS_URL; default none, never printed]" in text
        assert "JWT_DECODE_SECRET; default required, never printed]" in text
        assert "[env GARIN_SOCKET_DIR]" in text and "--allow-weak-secret BOOL Accept" in text


def test_shard_refuses_a_router_with_another_shard_count(socket_dir, tmp_path):
    port = free_port()
    shard = start([sys.executable, "-m", "garin", "shard", "--index", "0"], base_env(port, socket_dir, GARIN_SHARDS="2"), tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(socket_dir, "shard-0.sock")):
            assert time.monotonic() < deadline and shard.poll() is None
            time.sleep(0.05)
        router = subprocess.run(
            [sys.executable, "-m", "garin", "router"], env=base_env(port, socket_dir, GARIN_SHARDS="1"),
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )
        assert router.returncode == 2
        assert "refused this router" in router.stderr and "GARIN_SHARDS must match" in router.stderr
        assert stop(shard) == 0
    finally:
        output = finish(shard)
    assert "refusing router" in output and "this shard has 2" in output


def test_member_that_never_reads_is_dropped_and_never_delays_others(socket_dir, tmp_path):
    port = free_port()
    # 8000-character bodies: over the default body limit, so lift it.
    env = base_env(port, socket_dir, GARIN_MAX_OUTBOX_BYTES="65536", GARIN_SHARDS="2", GARIN_MAX_BODY_CHARS="0")
    proc = start([sys.executable, "-m", "garin", "run"], env, tmp_path)
    try:
        room = "slow-room"
        sender = join(port, "sender", room)
        reader = join(port, "reader", room)
        assert recv_json(sender)["username"] == "reader"
        # The stalled member: joins over a raw socket, then never reads again.
        stalled = RawClient(port, ORIGIN, rcvbuf=4096)
        stalled.send_text(json.dumps({"type": "auth", "body": make_token(SECRET, "stall", time.time(), 60)}))
        stalled.send_text(json.dumps({"type": "join", "username": "stalled", "room": room}))
        assert recv_json(sender)["username"] == "stalled"
        assert recv_json(reader)["username"] == "stalled"

        body = "x" * 8000
        started = time.monotonic()
        left = False
        for n in range(1500):  # 12 MB: far past kernel buffers + the 64 KiB outbox
            sender.send(json.dumps({"type": "message", "body": f"{n}:{body}"}))
            event = recv_json(reader, timeout=5)
            if event["type"] == "userleave":
                assert event == {"type": "userleave", "username": "stalled", "totalUsers": 2}
                left = True
                event = recv_json(reader, timeout=5)
            assert event == {"type": "message", "username": "sender", "body": f"{n}:{body}"}
            if left and n > 50:
                break
        assert left, "the stalled member was never dropped"
        # Generous bound: only proves the room never waited on the stalled client.
        assert time.monotonic() - started < 60
        stalled.close()
        sender.close()
        reader.close()
        assert stop(proc) == 0
    finally:
        output = finish(proc)
    assert "closing 1013 too slow" in output


def test_children_stop_when_the_supervisor_is_killed(socket_dir, tmp_path):
    port = free_port()
    proc = start([sys.executable, "-m", "garin", "run", "--shards", "2"], base_env(port, socket_dir), tmp_path)
    try:
        ws = join(port, "orphan", "orphan-room")
        children = descendants(proc.pid)
        assert len(children) == 3
        time.sleep(12)  # longer than trio's idle worker-thread lifetime: children must live on
        assert all(os.path.exists(f"/proc/{pid}") for pid in children)
        proc.kill()  # SIGKILL: no chance to stop anything itself
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" for pid in children):
            assert time.monotonic() < deadline, "children outlived the supervisor"
            time.sleep(0.1)
    finally:
        finish(proc)


def test_run_from_the_repository_root_with_garin_installed_as_a_package(socket_dir, tmp_path):
    """The Quick start: `pip install .` (not -e), then `garin run` in the
    clone. The supervisor's children must import the installed garin, not
    the source folder ./garin of the current directory, which has no
    router/ or shard/ inside (it is the package only once installed)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    # Its dependencies come from the test environment, as plain paths: the
    # .pth files there (garin's editable finder among them) are not run.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    # garin laid out as a regular install lays it out.
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "garin", site / "garin", ignore=skip)
    shutil.copytree(REPO / "router", site / "garin" / "router", ignore=skip)
    shutil.copytree(REPO / "shard", site / "garin" / "shard", ignore=skip)
    # The console script pip would write (its own folder first on sys.path).
    script = venv / "bin" / "garin"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom garin.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    port = free_port()
    env = base_env(port, socket_dir)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    proc = start([str(script), "run", "--shards", "2"], env, REPO)
    try:
        rooms = {shard_for(f"room-{n}", 2): f"room-{n}" for n in range(20)}
        clients = [join(port, f"user{shard}", room, timeout=20) for shard, room in sorted(rooms.items())]
        assert len(clients) == 2
        for ws in clients:
            ws.close()
        assert stop(proc) == 0
    finally:
        output = finish(proc)
    assert "Traceback" not in output, output


def refused(argv: list[str], env: dict[str, str], cwd) -> str:
    """Run a garin command that must refuse to start: exit 2 and one line on stderr, soon."""
    result = subprocess.run([sys.executable, "-m", "garin", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["run"], ["router"]])
def test_a_busy_or_bad_metrics_port_is_one_line_naming_the_setting(socket_dir, tmp_path, command):
    """Not a router that dies after start, restarted five times, naming no setting."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        line = refused(command, base_env(port, socket_dir, GARIN_METRICS_PORT=str(busy)), tmp_path)
        assert line == f"garin: error: GARIN_METRICS_PORT: cannot listen on 127.0.0.1:{busy}: Address already in use"
    line = refused(command, base_env(port, socket_dir, GARIN_METRICS_PORT=str(port)), tmp_path)
    assert line == f"garin: error: GARIN_METRICS_PORT: cannot listen on 127.0.0.1:{port}: Address already in use (it is the public port too)"
    # An address this host does not have (TEST-NET-1): no DNS needed.
    line = refused(command, base_env(port, socket_dir, GARIN_METRICS_PORT=str(free_port()), GARIN_METRICS_HOST="192.0.2.1"), tmp_path)
    assert line.startswith("garin: error: GARIN_METRICS_HOST: cannot listen on 192.0.2.1:")


@pytest.mark.parametrize("command", [["run"], ["router"]])
def test_a_busy_public_port_is_one_line_naming_the_address(socket_dir, tmp_path, command):
    """A Procfile's router said only `router: [Errno 98] Address already in use`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        line = refused(command, base_env(busy, socket_dir), tmp_path)
    assert line == f"garin: error: cannot listen on 127.0.0.1:{busy}: Address already in use"


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.parametrize("command", [["run"], ["shard", "--index", "0"]])
def test_an_unusable_socket_dir_is_one_line_naming_the_setting(tmp_path, command, metrics):
    """Not a shard that dies after start, restarted five times, naming no setting."""
    extra = {"GARIN_METRICS_PORT": str(free_port())} if metrics else {}
    line = refused(command, base_env(free_port(), "/proc/garin-nope", **extra), tmp_path)
    assert line == "garin: error: GARIN_SOCKET_DIR: cannot create /proc/garin-nope: No such file or directory"
    (tmp_path / "a-file").write_text("")
    line = refused(command, base_env(free_port(), str(tmp_path / "a-file"), **extra), tmp_path)
    assert line == f"garin: error: GARIN_SOCKET_DIR: {tmp_path / 'a-file'} is not a directory"


@pytest.mark.parametrize("command", [["run"], ["router"]])
def test_an_unusable_ban_list_is_one_line_naming_the_setting(socket_dir, tmp_path, command):
    """Not a server that starts and serves with no bans, logging an error every 10 s."""
    line = refused(command, base_env(free_port(), socket_dir, GARIN_BAN_DB=str(tmp_path)), tmp_path)
    assert line == f"garin: error: GARIN_BAN_DB: {tmp_path} is a directory; name a file, e.g. {tmp_path / 'bans.sqlite3'}"
    line = refused(command, base_env(free_port(), socket_dir, GARIN_BAN_DB="/proc/garin-nope/bans.sqlite3"), tmp_path)
    assert line.startswith("garin: error: GARIN_BAN_DB: cannot create /proc/garin-nope")

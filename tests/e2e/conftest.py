"""End-to-end fixtures: real `garin run` processes and real WebSocket clients.

`garin` (session scope) is one server with 4 shards, the rate limit off and
short timeouts, shared by every test that needs nothing special; tests keep
out of each other's way by using their own uuid-based room names. `garin_factory`
starts extra servers with custom settings for one test (or module) and stops
them afterwards. Stopping always checks what SIGTERM promises: exit code 0 and
the shard socket directory removed.

Every blocking call has a timeout, and a SIGALRM cap fails any test
that still runs after HARD_CAP_S (use it with
`pytest.mark.usefixtures("hard_cap")`), so a hung server cannot hang the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from garin.auth import make_token
from garin.routing import shard_for
# The harness the benchmark tools share (scripts/garin_bench): the server's
# environment, and the one client frame encoder and decoder of the project.
from garin_bench.server import free_port, server_env
from garin_bench.wsframe import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, frame_at, upgrade_request

ALLOWED_ORIGIN = "http://allowed.test"
SHARDS = 4
# Timeouts of the shared server: short enough to test quickly, long enough
# that a loaded machine still authenticates and joins in time.
AUTH_TIMEOUT_S = 1.0
JOIN_TIMEOUT_S = 1.0
MAX_MESSAGE_BYTES = 4096
RECV_TIMEOUT_S = 5.0
START_TIMEOUT_S = 20.0
HARD_CAP_S = 45


# -- a hard cap per test -------------------------------------------------------


class HardCapExceeded(Exception):
    pass


@pytest.fixture
def hard_cap(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail (not hang) a test that runs longer than its cap (marker `cap(seconds)`)."""
    marker = request.node.get_closest_marker("cap")
    cap = marker.args[0] if marker else HARD_CAP_S

    def expired(signum: int, frame: Any) -> None:
        raise HardCapExceeded(f"test ran longer than its hard cap of {cap} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cap(seconds): hard wall-time cap of one e2e test")


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A fresh GARIN_SOCKET_DIR path (not created), removed afterwards."""
    # Unix socket paths are limited to ~108 bytes: keep it short.
    parent = tempfile.mkdtemp(prefix="gp", dir="/tmp")
    yield os.path.join(parent, "s")
    shutil.rmtree(parent, ignore_errors=True)


# -- names ---------------------------------------------------------------------


def room_on(shard: int, prefix: str = "room", shards: int = SHARDS) -> str:
    """A fresh room name that garin routes to `shard`."""
    while True:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        if shard_for(name, shards) == shard:
            return name


def new_room(prefix: str = "room") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def new_user(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the server process ----------------------------------------------------------


@dataclass
class GarinServer:
    env_overrides: dict[str, str] = field(default_factory=dict)
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    shards: int = SHARDS
    workdir: Path = field(init=False)
    socket_dir: Path = field(init=False)
    port: int = field(init=False)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    exit_code: int | None = field(init=False, default=None)
    # Mints client tokens (subject, ttl_s) for servers not on the HMAC secret.
    minter: Callable[[str, float | None], str] | None = None
    # The whole log, kept by stop() before the work directory is removed.
    final_log: str = field(init=False, default="")
    # A command that runs garin (e.g. prlimit with its options and "--").
    prefix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Short path: Unix socket paths are limited to ~100 characters.
        self.workdir = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
        self.socket_dir = self.workdir / "s"
        self.port = free_port()
        self.log_path = self.workdir / "garin.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        # Anything the caller's environment says about garin's settings (e.g.
        # GARIN_PORT, which wins over PORT) is dropped.
        env = server_env(self.secret, ALLOWED_ORIGIN, self.port, self.socket_dir)
        env.update(GARIN_SHARDS=str(self.shards), GARIN_SHUTDOWN_TIMEOUT="3")
        env.update(self.env_overrides)
        return env

    def start(self) -> GarinServer:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "garin", "run", "--shards", str(self.shards)],
                cwd=self.workdir,  # no repository .env is read
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        """Ready when a probe can auth, join and get its join broadcast on every shard."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(range(self.shards))
        last_error: BaseException | None = None
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"garin exited with {self.process.returncode} during start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"garin not ready within {START_TIMEOUT_S} s (shards {pending} not serving; "
                    f"last error {last_error!r}):\n{self.log_tail()}"
                )
            shard = pending[0]
            try:
                user = new_user("probe")
                with self.connect() as ws:
                    ws.send(auth_frame(self.token(user)))
                    ws.send(join_frame(user, room_on(shard, "probe", self.shards)))
                    got = json.loads(ws.recv(timeout=1.0))
                    if got == {"type": "join", "username": user, "totalUsers": 1}:
                        pending.pop(0)
                        continue
                    last_error = AssertionError(f"probe got {got!r}")
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                last_error = exc
            except Exception as exc:  # InvalidStatus, InvalidMessage, ... while starting
                last_error = exc
            time.sleep(0.05)

    def token(self, subject: str, ttl_s: float | None = 3600, **kw: Any) -> str:
        if self.minter is not None:
            return self.minter(subject, ttl_s)
        return make_token(self.secret, subject, time.time(), ttl_s, **kw)

    def connect(self, origin: str | None = ALLOWED_ORIGIN, path: str = "/", **kw: Any) -> ClientConnection:
        """Use only as a context manager: `with server.connect() as ws:`."""
        kw.setdefault("open_timeout", 5)
        kw.setdefault("close_timeout", 3)
        kw.setdefault("ping_interval", None)
        kw.setdefault("proxy", None)
        kw.setdefault("compression", None)
        # Unbounded client-side queue: with the default (16 frames) a client
        # holding unread frames stops reading, and its close() then waits the
        # whole close_timeout for a close frame stuck behind them.
        kw.setdefault("max_queue", None)
        url = f"ws://127.0.0.1:{self.port}{path}"
        return connect(url, origin=origin, **kw)  # type: ignore[arg-type]

    def stop(self) -> int:
        """SIGTERM; the server must exit 0 and remove its socket directory."""
        if self.process is None:
            assert self.exit_code is not None
            return self.exit_code
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"garin did not stop within 15 s of SIGTERM:\n{self.log_tail()}")
        self.exit_code = code
        assert code == 0, f"garin exited with {code} after SIGTERM:\n{self.log_tail()}"
        assert not self.socket_dir.exists(), f"socket dir {self.socket_dir} left behind"
        self.final_log = self.log_path.read_text(errors="replace")
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # The supervisor's children run in their own sessions; SIGTERM lets
            # it stop them, SIGKILL is the last resort.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


ServerFactory = Callable[..., GarinServer]

SHARED_ENV = {
    "GARIN_RATE_LIMIT_COUNT": "0",
    "GARIN_AUTH_TIMEOUT": str(AUTH_TIMEOUT_S),
    "GARIN_JOIN_TIMEOUT": str(JOIN_TIMEOUT_S),
    "GARIN_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
}


@contextlib.contextmanager
def paused(*pids: int) -> Iterator[None]:
    """The processes `pids` stopped meanwhile (SIGSTOP: alive, their sockets
    open, silent), then continued whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def running_server(minter: Callable[[str, float | None], str] | None = None, **env: str) -> Iterator[GarinServer]:
    server = GarinServer(env_overrides=dict(env), minter=minter)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            if server.process.poll() is None:
                server.stop()
            else:
                code = server.process.returncode
                server.process = None
                raise AssertionError(f"garin died during the tests with {code}:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def garin() -> Iterator[GarinServer]:
    """The shared server: 4 shards, rate limit off, 1 s auth/join timeouts, 4096-char frames."""
    with running_server(**SHARED_ENV) as server:
        yield server


@pytest.fixture
def garin_factory() -> Iterator[ServerFactory]:
    """Start a server with custom env for this test; stopped (and checked) afterwards."""
    with contextlib.ExitStack() as stack:

        def start(**env: str) -> GarinServer:
            return stack.enter_context(running_server(**{**SHARED_ENV, **env}))

        yield start


# -- clients -------------------------------------------------------------------


def auth_frame(token: str) -> str:
    return json.dumps({"type": "auth", "body": token})


def join_frame(username: str, room: str) -> str:
    return json.dumps({"type": "join", "username": username, "room": room})


def message_frame(body: str) -> str:
    return json.dumps({"type": "message", "body": body})


USERLEAVE = json.dumps({"type": "userleave"})


def recv_json(ws: ClientConnection, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
    """The next server frame as JSON; fails (does not hang) after `timeout`."""
    try:
        data = ws.recv(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"nothing received within {timeout} s") from None
    except ConnectionClosed as exc:
        raise AssertionError(f"connection closed while waiting for a frame: {exc.rcvd!r}") from None
    assert isinstance(data, str), f"expected a text frame, got {data!r}"
    obj = json.loads(data)
    assert isinstance(obj, dict), obj
    return obj


def expect_join(ws: ClientConnection, username: str, total: int) -> None:
    assert recv_json(ws) == {"type": "join", "username": username, "totalUsers": total}


def expect_message(ws: ClientConnection, username: str, body: str) -> None:
    assert recv_json(ws) == {"type": "message", "username": username, "body": body}


def expect_userleave(ws: ClientConnection, username: str, total: int) -> None:
    assert recv_json(ws) == {"type": "userleave", "username": username, "totalUsers": total}


def expect_close(
    ws: ClientConnection, code: int, reason: str | None, timeout: float = RECV_TIMEOUT_S
) -> float:
    """The server closes `ws` with exactly (code, reason) and sends nothing first.

    `reason=None` checks only the code. Returns the seconds it took.
    """
    start = time.monotonic()
    try:
        data = ws.recv(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"not closed within {timeout} s (expected {code} {reason!r})") from None
    except ConnectionClosed as exc:
        received = exc.rcvd
        assert received is not None, (
            f"no close frame from the server (expected {code} {reason!r}); "
            f"sent={exc.sent!r}"
        )
        assert received.code == code, f"close code {received.code} {received.reason!r}, expected {code} {reason!r}"
        if reason is not None:
            assert received.reason == reason, f"close reason {received.reason!r}, expected {reason!r}"
        return time.monotonic() - start
    raise AssertionError(f"expected close {code} {reason!r}, got a frame first: {data!r}")


def expect_quiet(sockets: list[ClientConnection], settle: float = 0.3) -> None:
    """Nothing more arrives on any of `sockets` (after letting in-flight frames land)."""
    time.sleep(settle)
    for ws in sockets:
        try:
            data = ws.recv(timeout=0.01)
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            raise AssertionError(f"unexpected close {exc.rcvd!r}") from None
        raise AssertionError(f"unexpected frame {data!r}")


class Clients:
    """Opens clients for one test and closes whatever is left at teardown."""

    def __init__(self, stack: contextlib.ExitStack, server: GarinServer) -> None:
        self._stack = stack
        self.server = server

    def open(self, origin: str | None = ALLOWED_ORIGIN, server: GarinServer | None = None, **kw: Any) -> ClientConnection:
        server = server or self.server
        return self._stack.enter_context(server.connect(origin=origin, **kw))

    def authed(self, username: str | None = None, server: GarinServer | None = None) -> ClientConnection:
        server = server or self.server
        ws = self.open(server=server)
        ws.send(auth_frame(server.token(username or new_user())))
        return ws

    def join(
        self, username: str, room: str, total: int | None = None, server: GarinServer | None = None
    ) -> ClientConnection:
        """connect + auth + join; returns once the joiner got its own join broadcast.

        `total`, if given, is the totalUsers that broadcast must carry.
        """
        ws = self.authed(username, server=server)
        ws.send(join_frame(username, room))
        got = recv_json(ws)
        assert got["type"] == "join" and got["username"] == username, got
        if total is not None:
            assert got == {"type": "join", "username": username, "totalUsers": total}
        return ws


@pytest.fixture
def clients(garin: GarinServer) -> Iterator[Clients]:
    with contextlib.ExitStack() as stack:
        yield Clients(stack, garin)


def members(
    clients: Clients, room: str, count: int, prefix: str = "m", server: GarinServer | None = None
) -> list[tuple[str, ClientConnection]]:
    """`count` members join `room` one by one; everyone's join broadcasts are consumed and checked."""
    joined: list[tuple[str, ClientConnection]] = []
    for n in range(1, count + 1):
        name = new_user(f"{prefix}{n}")
        ws = clients.join(name, room, total=n, server=server)
        for _, earlier in joined:
            expect_join(earlier, name, n)
        joined.append((name, ws))
    return joined


def abort(ws: ClientConnection) -> None:
    """Drop the TCP connection with no close frame (a crashed client)."""
    sock = ws.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.shutdown(socket.SHUT_RDWR)


def bad_token(secret: str, subject: str, algorithm: str = "HS256", **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": subject, "name": subject, "iat": int(time.time()), "exp": int(time.time()) + 3600}
    payload.update(claims)
    return jwt.encode(payload, secret.encode(), algorithm=algorithm)


# -- a WebSocket client by hand ----------------------------------------------------


class RawClient:
    """A WebSocket client written by hand over a plain socket, for clients that
    misbehave: it does only what the test says (it never answers a ping by
    itself, and never reads unless asked).

    `source` picks the local address (any 127.x.y.z works on Linux), so a test
    can play several client IPs; `rcvbuf` shrinks the receive buffer, for
    clients that stop reading.
    """

    def __init__(
        self,
        port: int,
        origin: str = ALLOWED_ORIGIN,
        source: str = "127.0.0.1",
        rcvbuf: int | None = None,
        timeout: float = RECV_TIMEOUT_S,
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(upgrade_request("127.0.0.1", port, "/", origin))
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"the server hung up during the handshake: {self._buffer!r}"
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """One frame (final unless `fin` is False), masked as a client must."""
        self.sock.sendall(client_frame(opcode, payload, fin=fin))

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def _receive_more(self) -> bool:
        """Buffer what the server sent next; False if it hung up."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self._buffer += chunk
        return bool(chunk)

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server as (opcode, payload); None once it hung up.

        Raises TimeoutError after the socket's timeout; a frame half received
        by then stays buffered for the next call.
        """
        while (frame := frame_at(self._buffer)) is None:
            if not self._receive_more():
                return None
        first, start, end = frame
        opcode, payload = first & 0x0F, self._buffer[start:end]
        self._buffer = self._buffer[end:]
        return opcode, payload

    def close(self) -> None:
        self.sock.close()


def close_of(frame: tuple[int, bytes] | None) -> tuple[int, str]:
    """(code, reason) of a close frame from RawClient.recv_frame."""
    assert frame is not None and frame[0] == OP_CLOSE, f"expected a close frame, got {frame!r}"
    return int.from_bytes(frame[1][:2], "big"), frame[1][2:].decode()


# -- no test writes to the real home ------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers and commands started by the tests inherit XDG_STATE_HOME: the
    default ban list ($XDG_STATE_HOME/garin/bans.sqlite3) lands in a
    temporary directory, never in the real home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(autouse=True)
def private_state_home_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """And one per test, so that servers of different tests never share a
    default ban list (the shared session server keeps the session's)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))

"""--spawn: start a private `garin run` for one benchmark, and stop it after.

The server gets its own temporary working directory (so no .env is picked
up), a fresh secret, a free loopback port, the rate limit off, and a short
socket directory under /tmp (Unix socket paths are limited to ~107 bytes).
Ready means: the supervisor and all its children are up, and one probe
member per shard got its own join broadcast back through a router.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio_websocket

from garin_bench import procfs

ORIGIN = "http://bench.local"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Read by garin besides GARIN_*: never inherited by a private server.
_SERVER_SETTINGS = ("PORT", "JWT_DECODE_SECRET", "ALLOWED_ORIGINS", "HONCHO_PROCESS_NAME")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_env(
    secret: str, origin: str, port: int, socket_dir: Path, keep: tuple[str, ...] = ()
) -> dict[str, str]:
    """The environment of a private garin on 127.0.0.1:`port`: this process's,
    less every setting garin reads (GARIN_*, PORT, the secret and origins, and
    honcho's process name) but those in `keep`, plus the basics."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k in keep or not (k.startswith("GARIN_") or k in _SERVER_SETTINGS)
    }
    env.update(
        JWT_DECODE_SECRET=secret,
        ALLOWED_ORIGINS=origin,
        GARIN_HOST="127.0.0.1",
        PORT=str(port),
        GARIN_PORT=str(port),
        GARIN_SOCKET_DIR=str(socket_dir),
    )
    return env


def shard_for(room: str, shards: int) -> int:
    try:
        from garin.routing import shard_for as garin_shard_for
    except ImportError:  # not garin's tree: GarinChat's own hash is crc32 too
        return zlib.crc32(room.encode()) % shards
    return garin_shard_for(room, shards)


@dataclass
class SpawnedServer:
    python: str
    shards: int
    routers: int
    log_level: str
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    known_pids: set[int] = field(default_factory=set)
    # Applied last, over the benchmark's settings (scripts/soak.py turns the
    # rate limit and the other abuse limits back on).
    env_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "garin.log"

    def start(self) -> None:
        # Short: the shard sockets live in here.
        self.workdir = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))
        self.port = free_port()
        env = server_env(self.secret, ORIGIN, self.port, self.workdir / "s", keep=("GARIN_PROFILE",))
        env.update(
            GARIN_RATE_LIMIT_COUNT="0",
            # A private ban list, not the user's (~/.local/state/garin).
            GARIN_BAN_DB=str(self.workdir / "bans.sqlite3"),
            # Every member connects from 127.0.0.1 and bodies may be padded:
            # the abuse limits would refuse the load this measures.
            GARIN_MAX_CONNECTIONS="0",
            GARIN_MAX_CONNECTIONS_PER_IP="0",
            GARIN_MAX_BODY_CHARS="0",
            GARIN_SHARDS=str(self.shards),
            GARIN_ROUTERS=str(self.routers),
            GARIN_LOG_LEVEL=self.log_level,
        )
        env.update(self.env_overrides)
        # garin must be installed in self.python (check_python_has_garin):
        # router/ and shard/ import as garin.router and garin.shard only then.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.python, "-P", "-m", "garin", "run"],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Not in our process group: a Ctrl-C reaches us, and we stop it in order.
                start_new_session=True,
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]

    def wait_ready(self, token_for: "TokenMinter") -> float:
        """Seconds until ready; raises RuntimeError with the log tail if it is not."""
        assert self.process is not None
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT_S
        expected = 1 + self.shards + self.routers
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"garin run exited with code {self.process.returncode} at start:\n{self.log_tail()}"
                )
            pids = procfs.process_tree(self.pid)
            self.known_pids.update(pids)
            if len(pids) >= expected:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"garin run started {len(pids)} of {expected} processes:\n{self.log_tail()}")
            time.sleep(0.1)
        rooms = probe_rooms(self.shards)
        error = trio.run(probe_until_ready, self.url, ORIGIN, token_for, rooms, deadline)
        if error is not None:
            raise RuntimeError(f"garin run did not answer a probe ({error}):\n{self.log_tail()}")
        self.known_pids.update(procfs.process_tree(self.pid))
        return time.monotonic() - t0

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL by PID (the whole tree) after a deadline."""
        if self.process is None:
            return None
        tree = procfs.process_tree(self.pid) or [self.pid]
        self.known_pids.update(tree)
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
        for pid in sorted(self.known_pids):
            if pid != self.pid and _alive_child_of_ours(pid, tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if code is None:
            self.process.kill()
            code = self.process.wait()
        return code

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (kill, timeout(1)) stop a run the way Ctrl-C does, so the
    `finally` that stops a spawned server runs: it is in its own session and
    would otherwise outlive us."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def _alive_child_of_ours(pid: int, tree: list[int]) -> bool:
    """Only kill a PID that is still one of the server's processes (PIDs get reused)."""
    if pid not in tree:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"garin" in f.read()
    except OSError:
        return False


class TokenMinter:
    def __init__(self, secret: str, ttl_s: float) -> None:
        self.secret = secret
        self.ttl_s = ttl_s
        self._make: Callable[[str, str, float, float], str]
        try:
            from garin.auth import make_token
        except ImportError:  # not garin's tree (a GarinChat run): the same claims
            self._make = _make_token_pyjwt
        else:
            self._make = make_token

    def __call__(self, subject: str) -> str:
        return str(self._make(self.secret, subject, time.time(), self.ttl_s))


def _make_token_pyjwt(secret: str, subject: str, now: float, ttl_s: float) -> str:
    import jwt

    claims = {"sub": subject, "name": subject, "iat": int(now), "exp": int(now + ttl_s)}
    return jwt.encode(claims, secret.encode(), algorithm="HS256")


def probe_rooms(shards: int) -> list[str]:
    """One room name per shard, so the probe proves every shard answers."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        name = f"bench-probe-{i}"
        found.setdefault(shard_for(name, shards), name)
        i += 1
    return [found[k] for k in sorted(found)]


async def probe_once(url: str, origin: str, token: str, username: str, room: str) -> None:
    async with trio_websocket.open_websocket_url(
        url, extra_headers=[("Origin", origin)], connect_timeout=2, disconnect_timeout=1  # type: ignore[list-item]
    ) as ws:
        await ws.send_message(json.dumps({"type": "auth", "body": token}))
        await ws.send_message(json.dumps({"type": "join", "username": username, "room": room}))
        with trio.fail_after(2):
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("type") == "join" and msg.get("username") == username:
                    return


async def probe_until_ready(
    url: str, origin: str, token_for: TokenMinter, rooms: list[str], deadline: float
) -> str | None:
    """None once every probe room answered; else the last error."""
    pending = list(rooms)
    error = "timeout"
    while pending:
        if time.monotonic() > deadline:
            return error
        room = pending[0]
        try:
            await probe_once(url, origin, token_for("probe"), "probe", room)
            pending.pop(0)
        except Exception as exc:  # not up yet: refused, closed, timed out
            error = f"{type(exc).__name__}: {exc}"
            await trio.sleep(0.1)
    return None


def check_python_has_garin(python: str) -> str | None:
    result = subprocess.run(
        [python, "-c", "import garin.cli, garin.router.server, garin.shard.server"],
        # Not from the checkout: its garin/ lacks router/ and shard/ (an
        # installed garin has them inside).
        cwd="/", capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "import failed"
    return None

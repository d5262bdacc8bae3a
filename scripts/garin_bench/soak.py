"""garin soak test: clients join, chat, misbehave and leave for N minutes.

    python scripts/soak.py --spawn --minutes 3 --out bench-results/soak.json
    python scripts/soak.py --url ws://127.0.0.1:8080/ --secret ... --server-pid PID

Theory of operation. One trio loop runs a population of trio-websocket
clients until the deadline, each in a loop of short lives:

  members      (--members of them) connect, auth, join one of --rooms rooms,
               chat below the rate limit, and after a few seconds either
               switch rooms (userleave + join), leave with an empty body
               (expect 1000 bye), close the WebSocket, or drop the TCP
               connection (FIN or RST); then start over with a new connection
  misbehavers  (--misbehavers of them) each life breaks one rule: a bad,
               foreign or expired token, no auth, no join, the wrong order,
               invalid JSON, binary or invalid UTF-8 frames, an oversized
               frame, a too long body, a burst over the rate limit, userleave
               + join in a loop past the join limit, or a client that stops
               reading (in a room of its own, fed by a well-behaved sender);
               every one must get the documented close code and reason

What is checked, all from the clients' side (one process, one monotonic clock):

  loss         a member that saw its own join broadcast at time J must receive
               every tracked message sent to its room after J, if the message
               was sent at least --settle seconds before the member began to
               leave (timed rule), or if it received a later message of the
               same sender in that membership (gap rule: per-sender order
               makes a gap a proven loss). Duplicates, reordering per sender,
               messages from another room, echoes of one's own messages and
               altered bodies are errors too.
  room events  every member's view of its room is the shard's order of
               events: after its own join (totalUsers N), each join must say
               N+1 and each userleave N-1, never below 1. A member present
               (by the same causal/timed rules) when another joined or left
               must see that join or userleave.
  closes       misbehavers get exactly the expected code and reason (timeouts
               within a window); members get 1000 bye for an empty body and
               are never closed otherwise.
  after        once every client is gone: each room used is probed with a
               fresh join, which must say totalUsers 1 (no ghost members),
               and every server process must get back to its idle fd count.
  resources    every --sample-every seconds: RSS and open fds of each process
               of the server's tree (/proc/PID/status, /proc/PID/fd), a
               process that restarts, a spawned server that logs errors.
               Reported per process role: start, end, max, and the slope per
               minute of a least-squares line through the samples after
               --warmup, so that a leak shows as a steady climb.

Exit code: 0 if nothing was wrong, 1 if an error or a loss was found, 2 if the
soak could not run, 3 on the hard timeout. Bounded: clients stop sending
--drain seconds before the end, every task is cancelled at the deadline, a
spawned server gets SIGTERM and then SIGKILL (by PID) after a deadline, and an
alarm ends the process if anything still hangs. Loopback only.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio
import trio_websocket

from garin_bench import procfs
from garin_bench.wsframe import OP_TEXT, client_frame
from garin_bench.bench import BenchError, check_target
from garin_bench.server import ORIGIN as SPAWN_ORIGIN
from garin_bench.server import SpawnedServer, TokenMinter, check_python_has_garin, sigterm_as_interrupt

SCHEMA = "garin-soak/1"
RECEIVE_BUFFER_BYTES = 64 * 1024
MESSAGE_QUEUE_SIZE = 64
CONNECT_TIMEOUT_S = 5.0
JOIN_WAIT_S = 5.0  # own join broadcast after sending join
CLOSE_WAIT_S = 6.0  # a close after the offending frame (timeouts add their own)
QUIET_BEFORE_DROP_S = 1.0  # a member stops typing before it drops its connection
FEED_BODY_CHARS = 4000  # a stopped reader's room is fed bodies this long (at most)
IDLE_WAIT_S = 12.0  # for fds to get back to idle after the clients are gone
END_BUDGET_S = 45.0  # probes and idle checks after the deadline
PAD_ALPHABET = 'abcdefghij klmnop ÄéΩж✓😀"\\/<>&{}'


class SoakError(Exception):
    """The soak cannot run; str() says why."""


class HardTimeout(BaseException):
    pass


# -- options ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="soak.py",
        description="Bounded soak test for garin: churn, misbehaviour, loss, leaks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument("--spawn", action="store_true", help="start a private `garin run` and stop it after")
    target.add_argument("--url", default="ws://127.0.0.1:8080/", help="server to soak (ignored with --spawn)")
    target.add_argument("--server-pid", type=int, default=None,
                        help="PID of the running server (its descendants included) for RSS/fd samples")
    target.add_argument("--secret", default=None, help="JWT secret (else env JWT_DECODE_SECRET); not with --spawn")
    target.add_argument("--origin", default=SPAWN_ORIGIN, help="Origin header (must be in ALLOWED_ORIGINS)")
    target.add_argument("--shards", type=int, default=2, help="--spawn: GARIN_SHARDS")
    target.add_argument("--routers", type=int, default=2, help="--spawn: GARIN_ROUTERS")
    target.add_argument("--python", default=sys.executable, help="--spawn: interpreter for `-m garin run`")
    target.add_argument("--server-log-level", default="warning", help="--spawn: GARIN_LOG_LEVEL")

    limits = p.add_argument_group("the server's limits (set with --spawn; must match the server otherwise)")
    limits.add_argument("--rate-limit-count", type=int, default=5, help="GARIN_RATE_LIMIT_COUNT (>= 1)")
    limits.add_argument("--rate-limit-window", type=float, default=1.0, help="GARIN_RATE_LIMIT_WINDOW, seconds")
    limits.add_argument("--join-limit-count", type=int, default=10, help="GARIN_JOIN_LIMIT_COUNT (0: off)")
    limits.add_argument("--join-limit-window", type=float, default=20.0, help="GARIN_JOIN_LIMIT_WINDOW, seconds")
    limits.add_argument("--auth-timeout", type=float, default=2.0, help="GARIN_AUTH_TIMEOUT")
    limits.add_argument("--join-timeout", type=float, default=2.0, help="GARIN_JOIN_TIMEOUT")
    limits.add_argument("--max-message-bytes", type=int, default=65536, help="GARIN_MAX_MESSAGE_BYTES")
    limits.add_argument("--max-body-chars", type=int, default=4096, help="GARIN_MAX_BODY_CHARS")
    limits.add_argument("--max-outbox-bytes", type=int, default=None,
                        help="GARIN_MAX_OUTBOX_BYTES [default: 65536 with --spawn, so that a stopped reader is "
                             "closed within seconds; else garin's default 1048576]")

    load = p.add_argument_group("population")
    load.add_argument("--minutes", type=float, default=2.0, help="how long clients run (the whole soak is bounded)")
    load.add_argument("--members", type=int, default=60, help="well-behaved members cycling at any time")
    load.add_argument("--misbehavers", type=int, default=8, help="misbehaving clients cycling at any time")
    load.add_argument("--rooms", type=int, default=6, help="rooms the members and misbehavers use")
    load.add_argument("--stay", type=float, nargs=2, default=(3.0, 15.0), metavar=("MIN", "MAX"),
                      help="seconds a member stays in a room before it leaves or switches")
    load.add_argument("--seed", type=int, default=None, help="random seed (choices, not timing)")

    check = p.add_argument_group("checks and output")
    check.add_argument("--settle", type=float, default=1.0,
                       help="a message sent this long before a member began to leave must have reached it")
    check.add_argument("--drain", type=float, default=3.0, help="seconds of no sending before the deadline")
    check.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS/fd samples")
    check.add_argument("--warmup", type=float, default=None,
                       help="seconds excluded from the slopes [default: a quarter of the run, at most 60]")
    check.add_argument("--out", default="bench-results/soak.json", help="JSON result (folders are created)")
    args = p.parse_args(argv)

    if not 0 < args.minutes <= 24 * 60:
        p.error("--minutes must be > 0 (and at most a day)")
    if args.members < 2 or args.rooms < 1 or args.misbehavers < 0:
        p.error("--members must be at least 2, --rooms at least 1, --misbehavers at least 0")
    if args.rate_limit_count < 1 or args.rate_limit_window <= 0:
        p.error("the soak needs a rate limit: --rate-limit-count >= 1 and --rate-limit-window > 0")
    if not 0 < args.stay[0] <= args.stay[1]:
        p.error("--stay MIN MAX with 0 < MIN <= MAX")
    if args.join_limit_count < 0 or args.join_limit_window <= 0:
        p.error("--join-limit-count must be >= 0 and --join-limit-window > 0")
    if args.join_limit_count > 0 and args.stay[0] < args.join_limit_window / args.join_limit_count:
        p.error("members would switch rooms faster than the join limit allows: "
                "--stay MIN must be at least --join-limit-window / --join-limit-count")
    if args.spawn and (args.server_pid is not None or args.secret is not None):
        p.error("--spawn soaks the server it starts; drop --server-pid and --secret")
    duration = args.minutes * 60
    if args.drain >= duration / 2:
        p.error("--drain must be shorter than half the run")
    if args.warmup is None:
        args.warmup = min(60.0, duration / 4)
    if args.max_outbox_bytes is None:
        args.max_outbox_bytes = 65536 if args.spawn else 1048576
    return args


# -- records ----------------------------------------------------------------


@dataclass(eq=False, slots=True)
class MsgRec:
    """One tracked chat message, as sent."""

    room: int
    sender: int
    seq: int
    t_send: float
    body: str
    uncertain: bool = False  # the send itself failed


@dataclass(eq=False)
class Membership:
    """One stay of one connection in one room, as that connection saw it."""

    cid: int
    username: str
    room: int
    kind: str  # member, misbehaver, feeder
    t_join_sent: float
    t_join_seen: float | None = None
    # Leaving: the server cannot have processed the leave before lo; it was
    # started (sent, or the close seen) by hi.
    t_leave_lo: float | None = None
    t_leave_hi: float | None = None
    ended: str = ""
    tracked: bool = True  # losses are counted for members that were never closed on us
    count: int = 0  # totalUsers as last announced
    received: dict[tuple[int, int], float] = field(default_factory=dict)
    last_seq: dict[int, int] = field(default_factory=dict)
    joins_seen: set[str] = field(default_factory=set)
    leaves_seen: set[str] = field(default_factory=set)
    joined: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Conn:
    cid: int
    kind: str
    username: str
    stream: trio.SocketStream | None = None
    ws: trio_websocket.WebSocketConnection | None = None
    opened_at: float = 0.0
    view: Membership | None = None  # the membership receiving events
    pending: Membership | None = None  # a join sent, its broadcast not seen yet
    closed: trio.Event = field(default_factory=trio.Event)
    close: tuple[int, str] | None = None
    closed_at: float | None = None
    seq: int = 0
    leaving: bool = False  # we started the end of this connection

    def close_text(self) -> str:
        if self.close is None:
            return "no close"
        code, reason = self.close
        return f"{code} {reason}".strip()


@dataclass(frozen=True, slots=True)
class Expect:
    """The close a misbehaviour must get: code, reason (None: any), and for
    timeouts how long after `since` it may come."""

    code: int
    reason: str | None
    since: float | None = None
    after_s: tuple[float, float] | None = None


def now() -> float:
    return time.monotonic()


def trio_at(t: float) -> float:
    """A time.monotonic() instant on trio's clock."""
    return trio.current_time() + (t - time.monotonic())


async def sleep_until(t: float) -> None:
    await trio.sleep(max(0.0, t - time.monotonic()))


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 60.0


def role_of(pid: int) -> str:
    """supervisor, router J or shard I, from the command line."""
    words = procfs.process_name(pid).split()
    if words[:2] == ["garin", "run"]:
        return "supervisor"
    if words[:2] == ["garin", "shard"] and len(words) > 3 and words[2] == "--index":
        return f"shard {words[3]}"
    if words[:2] == ["garin", "router"] and len(words) > 3 and words[2] == "--router-id":
        return f"router {words[3]}"
    return " ".join(words[:2]) or str(pid)


# -- the soak ---------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, host: str, port: int, origin: str,
                 minter: TokenMinter, server_pid: int | None, spawned: SpawnedServer | None) -> None:
        self.args = args
        self.url = url
        self.host = host
        self.port = port
        self.origin = origin
        self.minter = minter
        self.foreign_minter = TokenMinter(secrets.token_urlsafe(48), 3600)
        self.server_pid = server_pid
        self.spawned = spawned
        self.rng = random.Random(args.seed)
        self.run_id = secrets.token_hex(3)
        self.rooms = [f"soak-{self.run_id}-r{i}" for i in range(args.rooms)]  # slow rooms are appended
        self.main_rooms = args.rooms
        family, addr = self._resolve(host, port)
        self.family, self.addr = family, addr
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.headers = [(b"Origin", origin.encode())]
        self._cids = iter(range(1, 2**62))
        # records
        self.msgs: dict[tuple[int, int], MsgRec] = {}
        self.room_msgs: dict[int, list[MsgRec]] = defaultdict(list)
        self.sender_msgs: dict[int, list[MsgRec]] = defaultdict(list)
        self.memberships: list[Membership] = []
        self.latencies: list[float] = []
        # counters
        self.conns: Counter[str] = Counter()
        self.open_conns = 0
        self.max_open_conns = 0
        self.leaves: Counter[str] = Counter()
        self.sent = 0
        self.noise_sent = 0
        self.deliveries = 0
        self.noise_received = 0
        self.events: Counter[str] = Counter()
        self.mis_runs: Counter[str] = Counter()
        self.mis_ok: Counter[str] = Counter()
        self.mis_cut = 0  # cut short by the deadline
        self.slow_episodes = 0
        self.slow_close_s: list[float] = []
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, list[str]] = defaultdict(list)
        self.warnings: list[str] = []
        # process samples
        self.samples: list[dict[str, Any]] = []
        self.role_pids: dict[str, int] = {}
        self.roles_by_pid: dict[int, str] = {}
        self.idle_before: dict[str, dict[str, int]] = {}
        self.idle_after: dict[str, dict[str, int]] = {}
        self.ghosts: dict[str, int] = {}
        self.stop_reader_busy = False
        self.t0 = 0.0
        self.t_quiet = 0.0
        self.t_end = 0.0
        self.t_stop = 0.0
        self.cut = False  # the server went away: stop early

    @staticmethod
    def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        return family, addr

    def error(self, kind: str, detail: str | None = None, n: int = 1) -> None:
        self.errors[kind] += n
        if detail is not None and len(self.error_examples[kind]) < 5:
            self.error_examples[kind].append(detail)

    def new_conn(self, kind: str) -> Conn:
        cid = next(self._cids)
        prefix = {"member": "m", "misbehaver": "x", "feeder": "f", "slow": "s", "probe": "p"}[kind]
        self.conns[kind] += 1
        return Conn(cid, kind, f"{prefix}{self.run_id}-{cid}")

    # -- one connection -----------------------------------------------------

    async def open(self, conn: Conn, nursery: trio.Nursery, rcvbuf: int | None = None,
                   queue: int = MESSAGE_QUEUE_SIZE, buffer: int = RECEIVE_BUFFER_BYTES) -> None:
        sock = trio.socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect(self.addr)
        except BaseException:
            sock.close()
            raise
        conn.stream = trio.SocketStream(sock)
        self.open_conns += 1
        self.max_open_conns = max(self.max_open_conns, self.open_conns)
        with trio.fail_after(CONNECT_TIMEOUT_S):
            conn.ws = await trio_websocket.wrap_client_stream(
                nursery, conn.stream, self.host_header, "/", extra_headers=self.headers,
                message_queue_size=queue, receive_buffer_size=buffer,
            )
        conn.opened_at = now()

    async def hang_up(self, conn: Conn, reset: bool = False) -> None:
        """Close the TCP connection without a WebSocket close (RST if reset)."""
        if conn.stream is None:
            return
        stream, conn.stream = conn.stream, None
        self.open_conns -= 1
        with trio.CancelScope(shield=True):
            if reset:
                try:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            try:
                await stream.aclose()
            except Exception:
                pass

    def start_reader(self, conn: Conn, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reader, conn)

    async def _reader(self, conn: Conn) -> None:
        assert conn.ws is not None
        try:
            while True:
                text = await conn.ws.get_message()
                self.on_frame(conn, text, now())
        except trio_websocket.ConnectionClosed as exc:
            self._closed(conn, exc.reason)

    def _closed(self, conn: Conn, reason: Any) -> None:
        if conn.closed.is_set():
            return
        conn.closed_at = now()
        conn.close = (reason.code, reason.reason or "") if reason is not None else (1006, "")
        conn.closed.set()

    async def send(self, conn: Conn, message: Any) -> None:
        assert conn.ws is not None
        await conn.ws.send_message(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def auth(self, conn: Conn) -> None:
        await self.send(conn, {"type": "auth", "body": self.minter(f"soak-{self.run_id}-{conn.cid}")})

    async def join(self, conn: Conn, room: int, refusal_ok: bool = False) -> Membership | None:
        """Join and wait for the own join broadcast; None (an error counted,
        unless `refusal_ok` and the server closed the connection) if it never came."""
        m = Membership(conn.cid, conn.username, room, conn.kind, now())
        conn.pending = m
        self.memberships.append(m)
        await self.send(conn, {"type": "join", "username": conn.username, "room": self.rooms[room]})
        with trio.move_on_after(JOIN_WAIT_S):
            async with trio.open_nursery() as race:
                async def closed() -> None:
                    await conn.closed.wait()
                    race.cancel_scope.cancel()
                race.start_soon(closed)
                await m.joined.wait()
                race.cancel_scope.cancel()
        if m.t_join_seen is None:
            conn.pending = None
            m.tracked = False
            m.t_leave_lo = m.t_leave_hi = now()
            m.ended = "never confirmed"
            if conn.closed.is_set() and refusal_ok:
                m.ended = "refused"
            elif conn.closed.is_set():
                self.error(f"{conn.kind} closed while joining: {conn.close_text()}", conn.username)
            else:
                self.error(f"{conn.kind} join not confirmed within {JOIN_WAIT_S:g}s", conn.username)
            return None
        return m

    def end_membership(self, m: Membership | None, lo: float, hi: float, how: str) -> None:
        if m is None or m.t_leave_lo is not None:
            return
        m.t_leave_lo, m.t_leave_hi, m.ended = lo, hi, how

    # -- what a client receives ----------------------------------------------

    def on_frame(self, conn: Conn, text: str | bytes, t: float) -> None:
        if isinstance(text, bytes):
            self.error("binary frame from the server", conn.username)
            return
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            self.error("unparsable frame from the server", text[:80])
            return
        self.events[str(kind)] += 1
        pending = conn.pending
        if pending is not None and kind == "join" and msg.get("username") == conn.username:
            count = msg.get("totalUsers")
            if not isinstance(count, int) or count < 1:
                self.error("own join with a bad totalUsers", repr(count))
                count = 1
            pending.t_join_seen = t
            pending.count = count
            conn.view, conn.pending = pending, None
            pending.joined.set()
            return
        view = conn.view
        if view is None:
            self.error("frame before the own join broadcast", f"{conn.username}: {text[:80]}")
            return
        if kind == "message":
            self._on_message(conn, view, msg, t)
        elif kind in ("join", "userleave"):
            username, count = msg.get("username"), msg.get("totalUsers")
            if username == conn.username:
                self.error(f"own {kind} broadcast while in the room", conn.username)
                return
            expected = view.count + (1 if kind == "join" else -1)
            if not isinstance(count, int) or count < 1 or count != expected:
                self.error("totalUsers inconsistent",
                           f"{conn.username} in {self.rooms[view.room]}: after {view.count}, {kind} of {username} "
                           f"said {count!r}, expected {expected}")
            if isinstance(count, int):
                view.count = count
            (view.joins_seen if kind == "join" else view.leaves_seen).add(str(username))
        else:
            self.error("unknown event type from the server", str(kind)[:40])

    def _on_message(self, conn: Conn, view: Membership, msg: dict[str, Any], t: float) -> None:
        body = msg.get("body")
        parts = body.split("|", 4) if isinstance(body, str) else []
        if len(parts) < 4 or parts[0] != self.run_id:
            self.error("message that no soak client sent", repr(body)[:80])
            return
        if parts[1] == "n":
            self.noise_received += 1
            return
        try:
            key = (int(parts[2]), int(parts[3]))
        except ValueError:
            self.error("message that no soak client sent", repr(body)[:80])
            return
        rec = self.msgs.get(key)
        if rec is None or rec.body != body:
            self.error("message body altered or unknown", repr(body)[:80])
            return
        if rec.sender == conn.cid:
            self.error("own message echoed back", conn.username)
            return
        if rec.room != view.room:
            self.error("message from another room",
                       f"{conn.username} in {self.rooms[view.room]} got one for {self.rooms[rec.room]}")
            return
        if msg.get("username") != f"m{self.run_id}-{rec.sender}":
            self.error("message with the wrong username", repr(msg.get("username")))
        if key in view.received:
            self.error("duplicate delivery", f"{conn.username} got {key} twice")
            return
        view.received[key] = t
        last = view.last_seq.get(rec.sender, -1)
        if rec.seq < last:
            self.error("out of order (per sender)", f"{conn.username}: {key} after seq {last}")
        else:
            view.last_seq[rec.sender] = rec.seq
        self.deliveries += 1
        self.latencies.append(t - rec.t_send)

    # -- members --------------------------------------------------------------

    def _body(self, room: int, cid: int, seq: int) -> str:
        head = f"{self.run_id}|{room}|{cid}|{seq}|"
        r = self.rng.random()
        if r < 0.8:
            n = self.rng.randrange(0, 80)
        elif r < 0.95:
            n = self.rng.randrange(200, 1000)
        else:
            n = self.rng.randrange(1000, max(1001, self.args.max_body_chars - len(head) - 1))
        if self.args.max_body_chars:
            n = min(n, self.args.max_body_chars - len(head))
        start = self.rng.randrange(len(PAD_ALPHABET))
        pad = (PAD_ALPHABET * (n // len(PAD_ALPHABET) + 2))[start : start + n]
        return head + pad

    async def chat_once(self, conn: Conn, m: Membership) -> None:
        conn.seq += 1
        body = self._body(m.room, conn.cid, conn.seq)
        rec = MsgRec(m.room, conn.cid, conn.seq, now(), body)
        self.msgs[(conn.cid, conn.seq)] = rec
        self.room_msgs[m.room].append(rec)
        self.sender_msgs[conn.cid].append(rec)
        self.sent += 1
        try:
            await self.send(conn, {"type": "message", "body": body})
        except trio_websocket.ConnectionClosed:
            rec.uncertain = True
            raise

    async def wait_closed_until(self, conn: Conn, t: float) -> bool:
        """Sleep until t; True if the connection was closed meanwhile."""
        with trio.move_on_at(trio_at(t)):
            await conn.closed.wait()
        return conn.closed.is_set()

    def _unexpected_close(self, conn: Conn, m: Membership | None) -> None:
        self.error(f"member closed by the server: {conn.close_text()}", conn.username)
        if m is not None:
            m.tracked = False
            self.end_membership(m, m.t_join_seen or now(), conn.closed_at or now(), "closed by server")

    async def chat(self, conn: Conn, m: Membership, stay: float) -> bool:
        """Chat in m's room for `stay` seconds (or until the quiet time); False if closed on us."""
        until = min(now() + stay, self.t_quiet)
        lo = self.args.rate_limit_window / self.args.rate_limit_count * 2.5
        while True:
            t_next = now() + self.rng.uniform(lo, 3 * lo)
            if t_next >= until:
                return not await self.wait_closed_until(conn, until)
            if await self.wait_closed_until(conn, t_next):
                return False
            await self.chat_once(conn, m)

    async def member_life(self) -> None:
        conn = self.new_conn("member")
        m: Membership | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self.open(conn, nursery)
                self.start_reader(conn, nursery)
                await self.auth(conn)
                room = self.rng.randrange(self.main_rooms)
                m = await self.join(conn, room)
                while m is not None:
                    if not await self.chat(conn, m, self.rng.uniform(*self.args.stay)):
                        self._unexpected_close(conn, m)
                        return
                    if now() >= self.t_quiet:
                        await conn.closed.wait()  # hold (and receive) until the deadline
                        self._unexpected_close(conn, m)
                        return
                    action = self.rng.choices(
                        ["switch", "bye", "close", "drop", "reset"], weights=[35, 25, 15, 15, 10]
                    )[0]
                    self.leaves[action] += 1
                    if action == "switch" and self.main_rooms > 1:
                        t = now()
                        await self.send(conn, {"type": "userleave"})
                        self.end_membership(m, t, t, "userleave")
                        room = self.rng.choice([r for r in range(self.main_rooms) if r != m.room])
                        m = await self.join(conn, room)
                        continue
                    conn.leaving = True
                    if action in ("drop", "reset"):
                        if await self.wait_closed_until(conn, now() + QUIET_BEFORE_DROP_S):
                            self._unexpected_close(conn, m)
                            return
                        t = now()
                        self.end_membership(m, t, t, action)
                        await self.hang_up(conn, reset=action == "reset")
                    elif action == "close":
                        t = now()
                        self.end_membership(m, t, t, "close")
                        with trio.move_on_after(CLOSE_WAIT_S):
                            assert conn.ws is not None
                            await conn.ws.aclose()
                    else:  # bye, or switch with a single room
                        t = now()
                        await self.send(conn, {"type": "message", "body": ""})
                        self.end_membership(m, t, t, "bye")
                        if not await self.wait_closed_until(conn, t + CLOSE_WAIT_S):
                            self.error("member bye: no close", conn.username)
                        elif conn.close != (1000, "bye"):
                            self.error(f"member bye: expected 1000 bye, got {conn.close_text()}", conn.username)
                    return
            except trio_websocket.ConnectionClosed:
                await self.wait_closed_until(conn, now() + 1)
                if not conn.leaving:
                    self._unexpected_close(conn, m)
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.error(f"member connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.hang_up(conn)
                nursery.cancel_scope.cancel()

    async def member_loop(self, delay: float) -> None:
        await trio.sleep(delay)
        while now() < self.t_quiet - 1:
            try:
                await self.member_life()
            except Exception as exc:  # a bug here, or a library error: count it, keep going
                self.error(f"member client error: {type(exc).__name__}", str(exc)[:200])
            await trio.sleep(self.rng.uniform(0.1, 1.0))

    # -- misbehavers ----------------------------------------------------------

    async def _in_room(self, conn: Conn) -> Membership | None:
        await self.auth(conn)
        return await self.join(conn, self.rng.randrange(self.main_rooms))

    async def _phase(self, conn: Conn) -> str:
        """Get to a random phase: before auth, after auth, or in a room."""
        phase = self.rng.choice(["new", "authed", "in room"])
        if phase != "new":
            await self.auth(conn)
        if phase == "in room":
            await self.join(conn, self.rng.randrange(self.main_rooms))
        return phase

    async def b_garbage_token(self, conn: Conn) -> Expect:
        await self.send(conn, {"type": "auth", "body": "not-a-token." + secrets.token_urlsafe(8)})
        return Expect(1008, "invalid token")

    async def b_foreign_token(self, conn: Conn) -> Expect:
        await self.send(conn, {"type": "auth", "body": self.foreign_minter(f"soak-{conn.cid}")})
        return Expect(1008, "invalid token")

    async def b_expired_token(self, conn: Conn) -> Expect:
        expired = TokenMinter(self.minter.secret, -120)(f"soak-{self.run_id}-{conn.cid}")
        await self.send(conn, {"type": "auth", "body": expired})
        return Expect(1008, "token expired")

    async def b_no_auth(self, conn: Conn) -> Expect:
        t = self.args.auth_timeout
        return Expect(1008, "auth timeout", conn.opened_at, (t - 0.25, t + 3.0))

    async def b_no_join(self, conn: Conn) -> Expect:
        await self.auth(conn)
        sent = now()
        t = self.args.join_timeout
        return Expect(1008, "join timeout", sent, (t - 0.25, t + 3.0))

    async def b_join_before_auth(self, conn: Conn) -> Expect:
        await self.send(conn, {"type": "join", "username": conn.username, "room": self.rooms[0]})
        return Expect(1008, "not authenticated")

    async def b_message_before_join(self, conn: Conn) -> Expect:
        await self.auth(conn)
        await self.send(conn, {"type": "message", "body": f"{self.run_id}|n|{conn.cid}|0"})
        return Expect(1008, "not in a room")

    async def b_userleave_before_join(self, conn: Conn) -> Expect:
        await self.auth(conn)
        await self.send(conn, {"type": "userleave"})
        return Expect(1008, "not in a room")

    async def b_second_auth(self, conn: Conn) -> Expect:
        await self.auth(conn)
        await self.auth(conn)
        return Expect(1008, "already authenticated")

    async def b_second_join(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")  # already counted
        conn.leaving = True
        await self.send(conn, {"type": "join", "username": conn.username, "room": self.rooms[0]})
        return Expect(1008, "already joined")

    async def b_invalid_json(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.send(conn, '{"type": "message", "body": ')
        return Expect(1008, "invalid json")

    async def b_not_an_object(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.send(conn, '["auth", "message"]')
        return Expect(1008, "not a json object")

    async def b_unknown_type(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.send(conn, {"type": "shout", "body": "hi"})
        return Expect(1008, "unknown type")

    async def b_bad_field(self, conn: Conn) -> Expect:
        await self.auth(conn)
        which = self.rng.choice(["short username", "long room", "body not a string"])
        if which == "short username":
            await self.send(conn, {"type": "join", "username": "ab", "room": self.rooms[0]})
            return Expect(1008, "username too short")
        if which == "long room":
            await self.send(conn, {"type": "join", "username": conn.username, "room": "r" * 200})
            return Expect(1008, "room too long")
        if await self.join(conn, self.rng.randrange(self.main_rooms)) is None:
            return Expect(0, "")
        await self.send(conn, {"type": "message", "body": 42})
        return Expect(1008, "body must be a string")

    async def b_binary_frame(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.send(conn, b"\x00\x01binary")
        return Expect(1003, "binary frames not supported")

    async def b_invalid_utf8(self, conn: Conn) -> Expect:
        await self._phase(conn)
        assert conn.stream is not None
        # By hand: trio-websocket only sends valid UTF-8.
        await conn.stream.send_all(client_frame(OP_TEXT, b'{"type":"message","body":"\xff\xfe"}'))
        return Expect(1007, None)

    async def b_oversized_frame(self, conn: Conn) -> Expect:
        await self._phase(conn)
        filler = "z" * (self.args.max_message_bytes + 1)
        await self.send(conn, '{"type":"message","body":"' + filler + '"}')
        return Expect(1009, "message too big")

    async def b_body_too_long(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")
        await self.send(conn, {"type": "message", "body": "y" * (self.args.max_body_chars + 1)})
        return Expect(1008, "body too long")

    async def b_rate_limit(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")
        for k in range(self.args.rate_limit_count + 1):
            await self.send(conn, {"type": "message", "body": f"{self.run_id}|n|{conn.cid}|{k}"})
            self.noise_sent += 1
        return Expect(1008, "rate limit exceeded")

    async def b_join_flood(self, conn: Conn) -> Expect:
        # userleave + join in a loop, each join confirmed, until the join
        # limit refuses one: after its burst, unless the soak ran that slowly.
        m = await self._in_room(conn)
        if m is None:
            return Expect(0, "")
        for _ in range(3 * self.args.join_limit_count):
            t = now()
            await self.send(conn, {"type": "userleave"})
            self.end_membership(m, t, t, "userleave")
            m = await self.join(conn, m.room, refusal_ok=True)
            if m is None:
                break
        return Expect(1008, "join limit exceeded")

    def behaviours(self) -> dict[str, Callable[[Conn], Awaitable[Expect]]]:
        table: dict[str, Callable[[Conn], Awaitable[Expect]]] = {
            "garbage token": self.b_garbage_token,
            "foreign secret": self.b_foreign_token,
            "expired token": self.b_expired_token,
            "no auth": self.b_no_auth,
            "no join": self.b_no_join,
            "join before auth": self.b_join_before_auth,
            "message before join": self.b_message_before_join,
            "userleave before join": self.b_userleave_before_join,
            "second auth": self.b_second_auth,
            "second join": self.b_second_join,
            "invalid json": self.b_invalid_json,
            "not an object": self.b_not_an_object,
            "unknown type": self.b_unknown_type,
            "bad field": self.b_bad_field,
            "binary frame": self.b_binary_frame,
            "invalid utf-8": self.b_invalid_utf8,
            "oversized frame": self.b_oversized_frame,
            "rate limit": self.b_rate_limit,
        }
        if self.args.max_body_chars > 0:
            table["body too long"] = self.b_body_too_long
        if self.args.join_limit_count > 0:
            table["join flood"] = self.b_join_flood
        return table

    async def misbehave(self, name: str, behaviour: Callable[[Conn], Awaitable[Expect]]) -> None:
        conn = self.new_conn("misbehaver")
        self.mis_runs[name] += 1
        expect: Expect | None = None
        offence = now()
        async with trio.open_nursery() as nursery:
            try:
                await self.open(conn, nursery)
                self.start_reader(conn, nursery)
                try:
                    offence = now()
                    expect = await behaviour(conn)
                except trio_websocket.ConnectionClosed:
                    pass  # the server closed first; judged below
                if expect is not None and expect.code == 0:
                    return  # could not even get into a room: already an error
                with trio.move_on_after(CLOSE_WAIT_S + (expect.after_s[1] if expect and expect.after_s else 0)):
                    await conn.closed.wait()
                m = conn.view
                if m is not None:
                    # The offence came after the own join broadcast: a safe lower bound.
                    self.end_membership(m, m.t_join_seen or offence, conn.closed_at or now(), f"misbehaved: {name}")
                self._judge(name, conn, expect)
            except trio.Cancelled:  # the deadline: not judged
                self.mis_runs[name] -= 1
                self.mis_cut += 1
                raise
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.error(f"misbehaver connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.hang_up(conn)
                nursery.cancel_scope.cancel()

    def _judge(self, name: str, conn: Conn, expect: Expect | None) -> None:
        if expect is None:
            self.error(f"{name}: closed before the offence, {conn.close_text()}", conn.username)
            return
        want = f"{expect.code} {expect.reason or '*'}"
        if conn.close is None:
            self.error(f"{name}: expected {want}, got no close within {CLOSE_WAIT_S:g}s", conn.username)
            return
        code, reason = conn.close
        if code != expect.code or (expect.reason is not None and reason != expect.reason):
            self.error(f"{name}: expected {want}, got {conn.close_text()}", conn.username)
            return
        if expect.after_s is not None and expect.since is not None and conn.closed_at is not None:
            took = conn.closed_at - expect.since
            if not expect.after_s[0] <= took <= expect.after_s[1]:
                self.error(f"{name}: closed after {took:.2f}s, expected {expect.after_s[0]:.2f}-"
                           f"{expect.after_s[1]:.2f}s", conn.username)
                return
        self.mis_ok[name] += 1

    def feed(self) -> tuple[int, float]:
        """Body length and gap of the sender that feeds a stopped reader (under the rate limit)."""
        chars = max(100, min(self.args.max_body_chars or FEED_BODY_CHARS, FEED_BODY_CHARS) - 40)
        return chars, self.args.rate_limit_window / self.args.rate_limit_count * 1.5

    @property
    def slow_expected(self) -> float:
        """Seconds a stopped reader should take to be closed: its outbox plus some kernel buffers, fed."""
        chars, gap = self.feed()
        return (self.args.max_outbox_bytes + 100 * 1024) / (chars / gap)

    @property
    def slow_timeout(self) -> float:
        return 20.0 + 3 * self.slow_expected

    async def stop_reader(self) -> None:
        """A member stops reading in a room fed by a well-behaved sender: 1013 too slow."""
        name = "stops reading"
        self.mis_runs[name] += 1
        self.slow_episodes += 1
        room = len(self.rooms)
        self.rooms.append(f"soak-{self.run_id}-slow{self.slow_episodes}")
        feeder = self.new_conn("feeder")
        slow = self.new_conn("slow")
        async with trio.open_nursery() as nursery:
            try:
                await self.open(feeder, nursery)
                self.start_reader(feeder, nursery)
                await self.auth(feeder)
                fm = await self.join(feeder, room)
                if fm is None:
                    return
                # A small receive buffer and queue, so the server's outbox fills soon.
                await self.open(slow, nursery, rcvbuf=4096, queue=1, buffer=4096)
                await self.auth(slow)
                sm = Membership(slow.cid, slow.username, room, slow.kind, now(), tracked=False)
                self.memberships.append(sm)
                slow.pending = sm
                await self.send(slow, {"type": "join", "username": slow.username, "room": self.rooms[room]})
                assert slow.ws is not None
                with trio.move_on_after(JOIN_WAIT_S):
                    while not sm.joined.is_set():  # read only until the own join broadcast
                        self.on_frame(slow, await slow.ws.get_message(), now())
                if not sm.joined.is_set():
                    self.error(f"{name}: join not confirmed within {JOIN_WAIT_S:g}s", slow.username)
                    return
                # Now it reads nothing; the feeder sends until the room hears it leave.
                stopped = now()
                big, gap = self.feed()
                k = 0
                with trio.move_on_after(self.slow_timeout):
                    while slow.username not in fm.leaves_seen:
                        if feeder.closed.is_set():
                            self.error(f"feeder closed by the server: {feeder.close_text()}", feeder.username)
                            return
                        k += 1
                        body = f"{self.run_id}|n|{feeder.cid}|{k}|" + "w" * big
                        await self.send(feeder, {"type": "message", "body": body})
                        self.noise_sent += 1
                        await trio.sleep(gap)
                kicked = now()
                if slow.username not in fm.leaves_seen:
                    self.error(f"{name}: expected 1013 too slow, still in the room after {self.slow_timeout:.0f}s",
                               slow.username)
                    return
                self.slow_close_s.append(kicked - stopped)
                # Read again: everything queued, then the close frame.
                self.start_reader(slow, nursery)
                with trio.move_on_after(CLOSE_WAIT_S):
                    await slow.closed.wait()
                self.end_membership(sm, sm.t_join_seen or stopped, slow.closed_at or now(), "too slow")
                self._judge(name, slow, Expect(1013, "too slow"))
                feeder.leaving = True
                t = now()
                await self.send(feeder, {"type": "message", "body": ""})
                self.end_membership(fm, t, t, "bye")
                with trio.move_on_after(CLOSE_WAIT_S):
                    await feeder.closed.wait()
            except trio.Cancelled:
                if not slow.closed.is_set():
                    self.mis_runs[name] -= 1
                    self.mis_cut += 1
                raise
            except trio_websocket.ConnectionClosed:
                if not feeder.leaving:
                    self.error(f"{name}: feeder closed: {feeder.close_text()}", feeder.username)
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.error(f"{name}: connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                self.stop_reader_busy = False
                await self.hang_up(slow)
                await self.hang_up(feeder)
                nursery.cancel_scope.cancel()

    async def misbehaver_loop(self, delay: float) -> None:
        await trio.sleep(delay)
        table = self.behaviours()
        names = [*table, "stops reading"]
        while now() < self.t_quiet - 4:
            name = self.rng.choice(names)
            try:
                if name == "stops reading":
                    if self.stop_reader_busy or now() > self.t_quiet - 10 - 1.5 * self.slow_expected:
                        continue
                    self.stop_reader_busy = True
                    await self.stop_reader()
                else:
                    await self.misbehave(name, table[name])
            except Exception as exc:
                self.error(f"misbehaver client error: {type(exc).__name__}", str(exc)[:200])
            await trio.sleep(self.rng.uniform(0.1, 0.6))

    # -- the server's processes ---------------------------------------------

    def take_sample(self) -> dict[str, Any] | None:
        if self.server_pid is None:
            return None
        procs: dict[str, dict[str, int]] = {}
        for pid in procfs.process_tree(self.server_pid):
            role = self.roles_by_pid.get(pid)
            if role is None:
                role = self.roles_by_pid[pid] = role_of(pid)
            rss, fds, cpu = procfs.rss_kib(pid), procfs.open_fds(pid), procfs.cpu_seconds(pid)
            if rss is None or fds is None or cpu is None:
                continue
            if role in procs:
                role = f"{role} (pid {pid})"
            procs[role] = {"pid": pid, "rss_kib": rss, "fds": fds, "cpu_s": round(cpu, 2)}
            known = self.role_pids.setdefault(role, pid)
            if known != pid:
                self.error("server process restarted", f"{role}: pid {known} -> {pid}")
                self.role_pids[role] = pid
        return {"t": round(now() - self.t0, 2), "procs": procs}

    def _check_alive(self) -> None:
        if self.server_pid is not None and not os.path.exists(f"/proc/{self.server_pid}"):
            self.error("server process gone", str(self.server_pid))
            self.cut = True
        elif self.spawned is not None and self.spawned.process is not None and self.spawned.process.poll() is not None:
            self.error("spawned server exited during the soak", f"code {self.spawned.process.returncode}")
            self.cut = True
        if self.samples and self.role_pids:
            latest = self.samples[-1]["procs"]
            for role, pid in self.role_pids.items():
                if role not in latest:
                    self.error("server process missing", f"{role} (pid {pid})")

    async def sampler(self, cancel: trio.CancelScope) -> None:
        while True:
            sample = self.take_sample()
            if sample is not None:
                sample.update(client_connections=self.open_conns, sent=self.sent, deliveries=self.deliveries,
                              errors=sum(self.errors.values()))
                self.samples.append(sample)
                self._check_alive()
                if self.cut:
                    cancel.cancel()
                    return
            await trio.sleep(self.args.sample_every)

    def idle_fds(self) -> dict[str, dict[str, int]]:
        sample = self.take_sample()
        return {} if sample is None else sample["procs"]

    async def wait_idle(self) -> None:
        """Until every process is back to its idle fd count (or the wait is over)."""
        deadline = now() + IDLE_WAIT_S
        while True:
            self.idle_after = self.idle_fds()
            over = {role: p["fds"] - self.idle_before.get(role, p)["fds"] for role, p in self.idle_after.items()}
            if all(v <= 0 for v in over.values()) or now() > deadline:
                break
            await trio.sleep(0.5)
        for role, extra in over.items():
            if extra > 0:
                self.error("fds not back to idle after the soak",
                           f"{role}: {self.idle_before.get(role, {}).get('fds')} idle before, "
                           f"{self.idle_after[role]['fds']} {IDLE_WAIT_S:g}s after the last client")

    async def probe_room(self, room: int) -> None:
        conn = self.new_conn("probe")
        async with trio.open_nursery() as nursery:
            try:
                await self.open(conn, nursery)
                self.start_reader(conn, nursery)
                await self.auth(conn)
                m = await self.join(conn, room)
                if m is not None:
                    m.tracked = False
                    if m.count != 1:
                        self.ghosts[self.rooms[room]] = m.count - 1
                        self.error("ghost members in a room after every client left",
                                   f"{self.rooms[room]}: a fresh join says totalUsers {m.count}")
                    t = now()
                    conn.leaving = True
                    await self.send(conn, {"type": "message", "body": ""})
                    self.end_membership(m, t, t, "probe")
                    with trio.move_on_after(CLOSE_WAIT_S):
                        await conn.closed.wait()
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError,
                    trio_websocket.ConnectionClosed) as exc:
                self.error(f"probe failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.hang_up(conn)
                nursery.cancel_scope.cancel()

    # -- the run ----------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        self.t0 = now()
        duration = args.minutes * 60
        self.t_end = self.t0 + duration
        self.t_quiet = self.t_end - args.drain
        # Idle: let the readiness probes' connections finish closing first.
        await trio.sleep(2.5)
        self.idle_before = self.idle_fds()
        self.t0 = now()
        self.t_end = self.t0 + duration
        self.t_quiet = self.t_end - args.drain
        print(f"soak: {args.members} members + {args.misbehavers} misbehavers in {args.rooms} rooms "
              f"for {args.minutes:g} min -> {self.url}", file=sys.stderr)
        async with trio.open_nursery() as top:
            population = trio.CancelScope(deadline=trio_at(self.t_end))
            top.start_soon(self.sampler, population)
            top.start_soon(self._progress)
            with population:
                async with trio.open_nursery() as pop:
                    ramp = min(5.0, duration / 10)
                    for i in range(args.members):
                        pop.start_soon(self.member_loop, ramp * i / args.members)
                    for j in range(args.misbehavers):
                        pop.start_soon(self.misbehaver_loop, ramp * (j + 0.5) / max(1, args.misbehavers))
            self.t_stop = now()
            top.cancel_scope.cancel()
        for m in self.memberships:
            self.end_membership(m, self.t_stop, self.t_stop, "deadline")
        if self.cut:
            return
        self.samples.append({**(self.take_sample() or {}), "client_connections": self.open_conns,
                             "sent": self.sent, "deliveries": self.deliveries,
                             "errors": sum(self.errors.values()), "final": True})
        # Every client is gone: no room may still count members, no process hold more fds.
        await trio.sleep(3.0)
        with trio.move_on_after(20):
            async with trio.open_nursery() as probes:
                limit = trio.Semaphore(10)

                async def probe(room: int) -> None:
                    async with limit:
                        await self.probe_room(room)

                for room in range(len(self.rooms)):
                    probes.start_soon(probe, room)
        await trio.sleep(2.5)
        await self.wait_idle()

    async def _progress(self) -> None:
        while True:
            await trio.sleep(30)
            print(f"soak: {now() - self.t0:5.0f}s  connections {sum(self.conns.values())} "
                  f"(open {self.open_conns}), sent {self.sent}, deliveries {self.deliveries}, "
                  f"errors {sum(self.errors.values())}", file=sys.stderr)

    # -- analysis -------------------------------------------------------------

    def analyse_loss(self) -> dict[str, Any]:
        settle = self.args.settle
        expected = delivered = lost_timed = lost_gap = 0
        examples: list[str] = []
        times = {room: [r.t_send for r in recs] for room, recs in self.room_msgs.items()}
        tracked = [m for m in self.memberships if m.kind == "member" and m.tracked and m.t_join_seen is not None]
        for m in tracked:
            assert m.t_join_seen is not None and m.t_leave_lo is not None
            recs = self.room_msgs.get(m.room, [])
            i = bisect.bisect_right(times.get(m.room, []), m.t_join_seen)
            counted: set[tuple[int, int]] = set()
            for rec in recs[i:]:
                if rec.t_send + settle >= m.t_leave_lo:
                    break
                if rec.sender == m.cid or rec.uncertain:
                    continue
                key = (rec.sender, rec.seq)
                counted.add(key)
                expected += 1
                if key in m.received:
                    delivered += 1
                else:
                    lost_timed += 1
                    if len(examples) < 10:
                        examples.append(f"{m.username} in {self.rooms[m.room]} (joined {m.t_join_seen - self.t0:.2f}s, "
                                        f"left {m.t_leave_lo - self.t0:.2f}s {m.ended}) missed {key} sent "
                                        f"{rec.t_send - self.t0:.2f}s")
            for sender, last in m.last_seq.items():
                for rec in self.sender_msgs[sender]:
                    key = (rec.sender, rec.seq)
                    if (rec.room == m.room and rec.seq < last and rec.t_send > m.t_join_seen
                            and key not in m.received and key not in counted and not rec.uncertain):
                        lost_gap += 1
                        if len(examples) < 10:
                            examples.append(f"{m.username} in {self.rooms[m.room]} missed {key} but got seq {last}")
        return {
            "memberships_checked": len(tracked),
            "expected": expected,
            "delivered": delivered,
            "lost": lost_timed + lost_gap,
            "lost_timed_rule": lost_timed,
            "lost_gap_rule": lost_gap,
            "examples": examples,
        }

    def analyse_events(self) -> dict[str, Any]:
        settle = self.args.settle
        by_room: dict[int, list[Membership]] = defaultdict(list)
        for m in self.memberships:
            if m.t_join_seen is not None and m.room < self.main_rooms:
                by_room[m.room].append(m)
        expected = missing_joins = missing_leaves = 0
        join_examples: list[str] = []
        leave_examples: list[str] = []
        for members in by_room.values():
            for m in members:
                if m.kind != "member" or not m.tracked:
                    continue
                assert m.t_join_seen is not None and m.t_leave_lo is not None
                for u in members:
                    if u is m or u.username == m.username:
                        continue
                    assert u.t_join_seen is not None
                    if m.t_join_seen < u.t_join_sent and u.t_join_seen + settle < m.t_leave_lo:
                        expected += 1
                        if u.username not in m.joins_seen:
                            missing_joins += 1
                            if len(join_examples) < 5:
                                join_examples.append(f"{m.username} never saw {u.username} join {self.rooms[m.room]}")
                    if (u.t_leave_lo is not None and u.t_leave_hi is not None and u.ended != "deadline"
                            and m.t_join_seen < u.t_leave_lo and u.t_leave_hi + settle < m.t_leave_lo):
                        expected += 1
                        if u.username not in m.leaves_seen:
                            missing_leaves += 1
                            if len(leave_examples) < 5:
                                leave_examples.append(f"{m.username} never saw {u.username} leave "
                                                      f"{self.rooms[m.room]} ({u.ended})")
        if missing_joins:
            self.error("join broadcast missing", join_examples[0], missing_joins)
        if missing_leaves:
            self.error("userleave broadcast missing", leave_examples[0], missing_leaves)
        return {"expected": expected, "missing_joins": missing_joins, "missing_leaves": missing_leaves,
                "examples": join_examples + leave_examples}

    def analyse_processes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        roles: list[str] = []
        for s in self.samples:
            for role in s.get("procs", {}):
                if role not in roles:
                    roles.append(role)
        for role in roles:
            series = [(s["t"], s["procs"][role], bool(s.get("final")))
                      for s in self.samples if role in s.get("procs", {})]
            if not series:
                continue
            # The last sample is taken as the clients go: not part of the run's trend.
            running = [(t, p) for t, p, final in series if not final] or [(t, p) for t, p, _ in series]
            row: dict[str, Any] = {"pid": running[-1][1]["pid"]}
            for key in ("rss_kib", "fds"):
                values = [p[key] for _, p in running]
                row[key] = {
                    "start": values[0], "end": values[-1], "max": max(values), "min": min(values),
                    "slope_per_min_after_warmup": slope_per_minute(
                        [(t, p[key]) for t, p in running if t >= self.args.warmup]
                    ),
                    # A leak keeps climbing; an allocator warming up levels off.
                    "slope_per_min_last_half": slope_per_minute(
                        [(t, p[key]) for t, p in running if t >= running[-1][0] / 2]
                    ),
                }
            if len(running) >= 2 and running[-1][0] > running[0][0]:
                row["cpu_share"] = round(
                    (running[-1][1]["cpu_s"] - running[0][1]["cpu_s"]) / (running[-1][0] - running[0][0]), 3)
            row["idle_fds_before"] = self.idle_before.get(role, {}).get("fds")
            row["idle_fds_after"] = self.idle_after.get(role, {}).get("fds")
            row["idle_rss_kib_before"] = self.idle_before.get(role, {}).get("rss_kib")
            row["idle_rss_kib_after"] = self.idle_after.get(role, {}).get("rss_kib")
            out[role] = row
        return out


# -- report -------------------------------------------------------------------


EXCEPTION_LINE = re.compile(r"^[\s|]*((?:\w+\.)*\w*(?:Error|Exception|Exit)\w*: .*)$")


def check_server_log(soak: Soak, spawned: SpawnedServer) -> None:
    """A spawned server's log: errors, tracebacks (by their exception line) and child exits are errors."""
    try:
        lines = spawned.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if line.startswith("Traceback") or line.startswith("  + Exception Group Traceback"):
            soak.error("server logged a traceback")
        elif (match := EXCEPTION_LINE.match(line)) and len(soak.error_examples["server logged a traceback"]) < 5:
            soak.error_examples["server logged a traceback"].append(match.group(1)[:200])
        elif " ERROR " in line:
            soak.error("server logged an error", line[:200])
        elif " exited with code " in line:
            soak.error("server child process exited (the supervisor restarted it)", line[:200])
        elif " WARNING " in line:
            soak.warnings.append(f"server log: {line[:200]}")


def build_result(soak: Soak, server: dict[str, Any], started_at: str) -> dict[str, Any]:
    args = soak.args
    loss = soak.analyse_loss()
    if loss["lost"]:
        soak.error("lost messages", loss["examples"][0] if loss["examples"] else None, loss["lost"])
    events = soak.analyse_events()
    processes = soak.analyse_processes()
    lat = sorted(soak.latencies)
    for role, row in processes.items():
        rss = row["rss_kib"]
        slope, late = rss["slope_per_min_after_warmup"], rss["slope_per_min_last_half"]
        grew = rss["end"] - rss["start"]
        if slope is not None and late is not None and min(slope, late) > 1024 and grew > 4096:
            soak.warnings.append(
                f"{role}: RSS grew {grew / 1024:.1f} MiB and still climbs ({slope / 1024:.2f} MiB/min after "
                f"warmup, {late / 1024:.2f} MiB/min over the last half): a leak, or a run too short to level off"
            )
    if soak.spawned is not None:
        check_server_log(soak, soak.spawned)
    behaviour_rows = {
        name: {"runs": soak.mis_runs[name], "ok": soak.mis_ok[name]} for name in sorted(soak.mis_runs)
    }
    lost_or_wrong = sum(soak.errors.values())
    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "ok": lost_or_wrong == 0,
        "target": {"url": soak.url, **server},
        "settings": {
            "minutes": args.minutes, "members": args.members, "misbehavers": args.misbehavers,
            "rooms": args.rooms, "stay_s": list(args.stay), "settle_s": args.settle, "drain_s": args.drain,
            "warmup_s": args.warmup, "sample_every_s": args.sample_every, "seed": args.seed,
            "rate_limit": [args.rate_limit_count, args.rate_limit_window],
            "join_limit": [args.join_limit_count, args.join_limit_window],
            "auth_timeout_s": args.auth_timeout, "join_timeout_s": args.join_timeout,
            "max_message_bytes": args.max_message_bytes, "max_body_chars": args.max_body_chars,
            "max_outbox_bytes": args.max_outbox_bytes, "stop_reader_expected_s": round(soak.slow_expected, 1),
        },
        "duration_s": round(soak.t_stop - soak.t0, 1),
        "connections": {"total": sum(soak.conns.values()), "by_kind": dict(soak.conns),
                        "max_open": soak.max_open_conns},
        "memberships": len(soak.memberships),
        "leaves": dict(soak.leaves),
        "messages": {
            "sent": soak.sent, "deliveries": soak.deliveries, "noise_sent": soak.noise_sent,
            "noise_received": soak.noise_received,
            "latency_ms": {q: (None if percentile(lat, p) is None else round(percentile(lat, p) * 1000, 2))
                           for q, p in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))},
        },
        "loss": loss,
        "room_events": {"received": dict(soak.events), **events, "ghost_members": soak.ghosts},
        "misbehaviours": behaviour_rows,
        "misbehaviours_cut_by_deadline": soak.mis_cut,
        "stop_reader_closed_after_s": [round(s, 2) for s in soak.slow_close_s],
        "errors": dict(soak.errors),
        "error_examples": dict(soak.error_examples),
        "warnings": soak.warnings,
        "processes": processes,
        "samples": soak.samples,
    }


def fmt_mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def fmt_slope(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:+.{digits}f}"


def print_summary(result: dict[str, Any]) -> None:
    w = sys.stdout.write
    s = result["settings"]
    t = result["target"]
    w(f"\ngarin soak: {result['duration_s']:.0f} s against {t['url']}")
    if t.get("spawned"):
        w(f" (spawned garin run: {t['shards']} shards, {t['routers']} routers)")
    w(f"\n  {s['members']} members + {s['misbehavers']} misbehavers, {s['rooms']} rooms, "
      f"rate limit {s['rate_limit'][0]}/{s['rate_limit'][1]:g}s, settle {s['settle_s']:g}s\n")
    c = result["connections"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["by_kind"].items()))
    w(f"connections: {c['total']} opened ({kinds}), at most {c['max_open']} at once\n")
    leaves = ", ".join(f"{k} {v}" for k, v in sorted(result["leaves"].items()))
    w(f"memberships: {result['memberships']}; member leaves: {leaves}\n")
    msg = result["messages"]
    lat = msg["latency_ms"]
    w(f"messages: {msg['sent']} sent, {msg['deliveries']} deliveries; latency p50 {lat['p50']} ms, "
      f"p99 {lat['p99']} ms, p99.9 {lat['p999']} ms, max {lat['max']} ms\n")
    loss = result["loss"]
    w(f"loss: {loss['lost']} lost of {loss['expected']} expected deliveries "
      f"({loss['lost_timed_rule']} timed rule, {loss['lost_gap_rule']} gap rule) "
      f"over {loss['memberships_checked']} member stays\n")
    for line in loss["examples"][:5]:
        w(f"  e.g. {line}\n")
    ev = result["room_events"]
    w(f"room events: {ev['expected']} joins/leaves expected, {ev['missing_joins']} joins and "
      f"{ev['missing_leaves']} leaves missing; ghost members after the soak: {sum(ev['ghost_members'].values())}\n")
    w("misbehaviours (runs/as expected): ")
    w(", ".join(f"{k} {v['ok']}/{v['runs']}" for k, v in result["misbehaviours"].items()) + "\n")
    if "stops reading" not in result["misbehaviours"]:
        w(f"  stops reading: not run (each takes ~{result['settings']['stop_reader_expected_s']:.0f}s with "
          f"a {result['settings']['max_outbox_bytes']} byte outbox; run longer)\n")
    if result["stop_reader_closed_after_s"]:
        vals = result["stop_reader_closed_after_s"]
        w(f"  a stopped reader was closed 'too slow' after {min(vals):.1f}-{max(vals):.1f} s\n")
    procs = result["processes"]
    if procs:
        w("server processes       CPU |  RSS MiB start/end/max  slope MiB/min |  fds start/end/max  slope/min | "
          "idle fds before/after\n")
        for role, row in procs.items():
            r, f = row["rss_kib"], row["fds"]
            cpu = row.get("cpu_share")
            w(f"  {role:<12} {'-' if cpu is None else f'{cpu:.0%}':>9} | {fmt_mib(r['start']):>6} {fmt_mib(r['end']):>6} {fmt_mib(r['max']):>6}"
              f"  {fmt_slope(r['slope_per_min_after_warmup'], 1024):>8}     | {f['start']:>5} {f['end']:>5} "
              f"{f['max']:>5}  {fmt_slope(f['slope_per_min_after_warmup'], 1, 1):>6}    | "
              f"{row['idle_fds_before']}/{row['idle_fds_after']}\n")
    else:
        w("server processes: not sampled (no --server-pid)\n")
    for warning in result["warnings"]:
        w(f"warning: {warning}\n")
    if result["errors"]:
        w("ERRORS:\n")
        for kind, n in sorted(result["errors"].items(), key=lambda kv: -kv[1]):
            w(f"  {n:>6}  {kind}\n")
            for ex in result["error_examples"].get(kind, [])[:2]:
                w(f"          e.g. {ex}\n")
    w(f"result: {'PASS' if result['ok'] else 'FAIL'}\n")


def write_result(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    print(f"soak: wrote {path}", file=sys.stderr)


# -- main ---------------------------------------------------------------------


def _on_alarm(signum: int, frame: Any) -> None:
    raise HardTimeout()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    budget = args.minutes * 60 + END_BUDGET_S + 60
    signal.signal(signal.SIGALRM, _on_alarm)
    sigterm_as_interrupt()  # like Ctrl-C: the spawned server is stopped
    signal.alarm(math.ceil(budget))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spawned: SpawnedServer | None = None
    stop_code: int | None = None
    try:
        if args.spawn:
            problem = check_python_has_garin(args.python)
            if problem:
                raise SoakError(f"{args.python} cannot import garin ({problem}); pass --python")
            spawned = SpawnedServer(args.python, args.shards, args.routers, args.server_log_level)
            spawned.env_overrides = {
                "GARIN_RATE_LIMIT_COUNT": str(args.rate_limit_count),
                "GARIN_RATE_LIMIT_WINDOW": str(args.rate_limit_window),
                "GARIN_JOIN_LIMIT_COUNT": str(args.join_limit_count),
                "GARIN_JOIN_LIMIT_WINDOW": str(args.join_limit_window),
                "GARIN_AUTH_TIMEOUT": str(args.auth_timeout),
                "GARIN_JOIN_TIMEOUT": str(args.join_timeout),
                "GARIN_MAX_MESSAGE_BYTES": str(args.max_message_bytes),
                "GARIN_MAX_BODY_CHARS": str(args.max_body_chars),
                "GARIN_MAX_OUTBOX_BYTES": str(args.max_outbox_bytes),
                # Every client comes from 127.0.0.1, and misbehaving is the point.
                "GARIN_MAX_CONNECTIONS_PER_IP": "0",
                "GARIN_BAN_STRIKES": "0",
            }
            minter = TokenMinter(spawned.secret, 3600)
            spawned.start()
            ready_s = spawned.wait_ready(minter)
            url, origin, server_pid = spawned.url, SPAWN_ORIGIN, spawned.pid
            print(f"soak: spawned garin run (pid {server_pid}, {args.shards} shards, {args.routers} routers) "
                  f"on {url}, ready in {ready_s:.1f}s", file=sys.stderr)
            server = {"spawned": True, "shards": args.shards, "routers": args.routers, "pid": server_pid}
        else:
            try:
                check_target(args.url, allow_remote=False)
            except BenchError as exc:
                raise SoakError(str(exc)) from None
            secret = args.secret or os.environ.get("JWT_DECODE_SECRET")
            if not secret:
                raise SoakError("no JWT secret: pass --secret or set JWT_DECODE_SECRET (or use --spawn)")
            if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}"):
                raise SoakError(f"--server-pid {args.server_pid}: no such process")
            minter = TokenMinter(secret, 3600)
            url, origin, server_pid = args.url, args.origin, args.server_pid
            server = {"spawned": False, "pid": server_pid}
        host, port = check_target(url, allow_remote=False)
        soak = Soak(args, url, host, port, origin, minter, server_pid, spawned)
        trio.run(soak.run)
        if spawned is not None:
            stop_code = spawned.stop()
            if stop_code != 0:
                soak.error("spawned server did not exit 0 on SIGTERM", f"exit code {stop_code}")
        signal.alarm(0)
        result = build_result(soak, server, started_at)
        if spawned is not None:
            result["target"]["exit_code_on_sigterm"] = stop_code
        if spawned is not None:
            log_copy = str(Path(args.out).with_suffix(".server.log"))
            Path(log_copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spawned.log_path, log_copy)
            result["target"]["server_log"] = log_copy
        print_summary(result)
        write_result(result, args.out)
        return 0 if result["ok"] else 1
    except SoakError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the spawned server did not start
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    except HardTimeout:
        print(f"soak: error: hard timeout of {budget:.0f}s reached; stopped", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("soak: interrupted; stopped", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        if spawned is not None:
            if stop_code is None:
                code = spawned.stop()
                if code not in (0, None):
                    print(f"soak: the spawned server exited with code {code}:\n{spawned.log_tail()}",
                          file=sys.stderr)
            spawned.cleanup()


if __name__ == "__main__":
    sys.exit(main())

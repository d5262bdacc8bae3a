"""One load-generating worker process: many GarinChat members in one trio loop.

Theory of operation. The coordinator (bench.py) gives each worker a plan (its
share of the members) and then drives it through phases with small commands
on a multiprocessing pipe:

  ready -> ("connect", t) -> joined report -> ("go", Times) -> result -> ("close",) -> exit

All times are absolute `time.monotonic()` values. CLOCK_MONOTONIC is one clock
for the whole machine, so a send time stamped by one worker can be compared with
a receive time in another. trio's own clock has a random offset; `_Clock`
converts.

Every member is one trio-websocket client connection with one task reading
it; or, with `--client lean`, a connection that storm.py opens and joins in
one epoll loop (with all the worker's others) and then hands to a
LeanWebSocket, read by the one Pump task. A member that is a sender also
runs a send loop on a fixed schedule (open loop: the next send is due at
start + k * interval whatever the server does; if the worker itself falls
more than one interval behind, the missed slots are skipped and counted, so
an overloaded client shows up in the report instead of as a burst). A
message body is "SENDER:SEQ:SEND_US[:padding]", so every receiver can
compute the latency and spot duplicates without any state shared between
processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from collections.abc import Callable

import trio
import trio_websocket

# Latency buckets: the same function as stats.bucket_of, inlined in the hot loop.
from garin_bench.options import raise_fd_limit
from garin_bench.stats import BUCKETS_PER_E
from garin_bench.lean import LeanWebSocket, Pump
from garin_bench.storm import Job, Storm

RECEIVE_BUFFER_BYTES = 64 * 1024
# trio-websocket's default queue of 1 message makes its reader task hand over
# every single frame; a deeper queue lets it parse a whole read at once.
MESSAGE_QUEUE_SIZE = 256
JOIN_TIMEOUT_S = 10.0
DISCONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class MemberSpec:
    room: int  # index of the room, for per-room counts
    room_name: str
    username: str
    token: str
    sender: int  # global sender id, or -1 for a member that only receives
    # bench.py --hosts: which host the member connects to, and its URL ("": the plan's).
    host: int = 0
    url: str = ""


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    index: int
    url: str
    origin: str
    members: tuple[MemberSpec, ...]
    interval_s: float
    body_pad: int  # bodies are padded to at least this many characters
    connect_concurrency: int
    connect_timeout_s: float
    close_timeout_s: float
    hard_deadline: float  # monotonic; the worker gives up on its own by then
    client: str = "trio-websocket"  # or "lean": lean.LeanWebSocket


@dataclass(frozen=True, slots=True)
class Times:
    start: float  # senders start; timeline second 0
    window_start: float
    window_end: float  # senders stop
    drain_end: float  # results are taken


def sample_marks(times: Times) -> list[float]:
    """When CPU is sampled, by the workers and the coordinator alike: every
    whole second from the start, and the window's edges."""
    marks = {times.start + k for k in range(math.ceil(times.drain_end - times.start) + 1)}
    marks |= {times.window_start, times.window_end}
    return sorted(m for m in marks if m <= times.start + math.ceil(times.drain_end - times.start))


class _Clock:
    def __init__(self) -> None:
        self.offset = trio.current_time() - time.monotonic()

    def at(self, t: float) -> float:
        return t + self.offset


@dataclass
class Stats:
    # connect phase
    joined: int = 0
    joined_by_room: dict[int, int] = field(default_factory=dict)
    connect_ms: list[float] = field(default_factory=list)  # TCP + WebSocket handshake
    join_ms: list[float] = field(default_factory=list)  # auth + join until our own join came back
    first_start: float | None = None
    last_joined: float | None = None
    connect_errors: dict[str, int] = field(default_factory=dict)
    late_joins: int = 0
    # traffic
    t0_us: int = 0
    win_start_us: int = 0
    win_end_us: int = 2**62
    sent_by_room: dict[int, list[int]] = field(default_factory=dict)  # [warmup, window, after]
    sent_per_second: dict[int, int] = field(default_factory=dict)
    send_max_lag_s: float = 0.0
    skipped_sends: int = 0
    received_by_room: dict[int, int] = field(default_factory=dict)  # sent in the window
    received_warmup: int = 0
    received_after: int = 0
    received_in_window: int = 0  # by receive time
    received_in_window_by_host: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    foreign: int = 0
    bad_frames: int = 0
    events: dict[str, int] = field(default_factory=dict)
    window_hist: dict[int, int] = field(default_factory=dict)
    window_max_us: int = 0
    window_sum_us: int = 0
    second_hist: dict[int, dict[int, int]] = field(default_factory=dict)
    second_max_us: dict[int, int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(default_factory=dict)
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, cpu s)
    connect_cpu_s: float = 0.0
    connect_wall_s: float = 0.0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def record(self, room: int, now_us: int, sent_us: int, host: int) -> None:
        latency = now_us - sent_us
        bucket = 0 if latency < 1 else 1 + int(math.log(latency) * BUCKETS_PER_E)
        second = (now_us - self.t0_us) // 1_000_000
        hist = self.second_hist.get(second)
        if hist is None:
            hist = self.second_hist[second] = {}
        hist[bucket] = hist.get(bucket, 0) + 1
        if latency > self.second_max_us.get(second, -1):
            self.second_max_us[second] = latency
        if self.win_start_us <= sent_us < self.win_end_us:
            self.window_hist[bucket] = self.window_hist.get(bucket, 0) + 1
            self.received_by_room[room] = self.received_by_room.get(room, 0) + 1
            self.window_sum_us += latency
            if latency > self.window_max_us:
                self.window_max_us = latency
        elif sent_us < self.win_start_us:
            self.received_warmup += 1
        else:
            self.received_after += 1
        if self.win_start_us <= now_us < self.win_end_us:
            self.received_in_window += 1
            by_host = self.received_in_window_by_host
            by_host[host] = by_host.get(host, 0) + 1

    def join_report(self) -> dict[str, Any]:
        return {
            "joined": self.joined,
            "joined_by_room": self.joined_by_room,
            "connect_ms": self.connect_ms,
            "join_ms": self.join_ms,
            "first_start": self.first_start,
            "last_joined": self.last_joined,
            "errors": self.connect_errors,
            "cpu_s": self.connect_cpu_s,
            "wall_s": self.connect_wall_s,
        }

    def result(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                "sent_by_room", "sent_per_second", "send_max_lag_s", "skipped_sends",
                "received_by_room", "received_warmup", "received_after", "received_in_window",
                "received_in_window_by_host",
                "duplicates", "foreign", "bad_frames", "events", "window_hist", "window_max_us",
                "window_sum_us", "second_hist", "second_max_us", "disconnects", "cpu_samples",
                "late_joins",
            )
        }


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode(errors="replace").strip()[:60]
        return f"rejected: HTTP {exc.status_code} {body}".strip()
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "connect timeout"
    if isinstance(exc, trio_websocket.HandshakeError):
        cause = exc.__cause__
        return f"connect failed: {cause}" if cause else "handshake failed"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return "closed"
        return f"closed {reason.code} {reason.reason or ''}".strip()
    if isinstance(exc, trio.TooSlowError):
        return "join timeout (own join broadcast never came)"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({_error_kind(e) for e in exc.exceptions}))
    return f"{type(exc).__name__}: {exc}"[:120]


class Worker:
    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.stats = Stats()
        self.clock = _Clock()
        self.connect_limit = trio.Semaphore(plan.connect_concurrency)
        self.headers = [("Origin", plan.origin)]
        self.settled = 0
        self.all_settled = trio.Event()
        self.done = 0
        self.all_done = trio.Event()
        self.connect_over = False
        self.go = trio.Event()
        self.times: Times | None = None
        self.closing = trio.Event()
        # --client lean: one task reads every member's socket.
        self.pump = Pump() if plan.client == "lean" else None

    def _settle(self) -> None:
        self.settled += 1
        if self.settled == len(self.plan.members):
            self.all_settled.set()

    def _member_done(self) -> None:
        self.done += 1
        if self.done == len(self.plan.members):
            self.all_done.set()

    def _record_join(self, spec: MemberSpec, t0: float, t1: float, t2: float) -> bool:
        """Counts a member's join; False for a late one (after the connect
        phase), which the caller closes at once."""
        s = self.stats
        if self.connect_over:
            s.late_joins += 1
            return False
        s.joined += 1
        s.joined_by_room[spec.room] = s.joined_by_room.get(spec.room, 0) + 1
        s.connect_ms.append((t1 - t0) * 1000)
        s.join_ms.append((t2 - t1) * 1000)
        s.last_joined = max(s.last_joined or t2, t2)
        self._settle()
        return True

    def _record_connect_error(self, exc: BaseException) -> None:
        self.stats.count(self.stats.connect_errors, _error_kind(exc))
        self._settle()

    async def member(self, spec: MemberSpec) -> None:
        """A trio-websocket member, from its connect to its close."""
        s = self.stats
        joined = False
        holding = False
        try:
            await self.connect_limit.acquire()
            holding = True
            t0 = time.monotonic()
            if s.first_start is None:
                s.first_start = t0
            async with trio_websocket.open_websocket_url(
                spec.url or self.plan.url,
                extra_headers=self.headers,  # type: ignore[arg-type]  # str pairs work too
                message_queue_size=MESSAGE_QUEUE_SIZE,
                receive_buffer_size=RECEIVE_BUFFER_BYTES,
                connect_timeout=self.plan.connect_timeout_s,
                disconnect_timeout=DISCONNECT_TIMEOUT_S,
            ) as ws:
                t1 = time.monotonic()
                await ws.send_message(json.dumps({"type": "auth", "body": spec.token}))
                await ws.send_message(
                    json.dumps({"type": "join", "username": spec.username, "room": spec.room_name})
                )
                with trio.fail_after(JOIN_TIMEOUT_S):
                    await self._await_own_join(ws, spec.username)
                t2 = time.monotonic()
                self.connect_limit.release()
                holding = False
                joined = True
                if self._record_join(spec, t0, t1, t2):
                    await self._joined(ws, spec)
        except Exception as exc:
            if holding:
                self.connect_limit.release()
            if not joined:
                self._record_connect_error(exc)
            elif not self.closing.is_set():
                s.count(s.disconnects, _error_kind(exc))
        finally:
            self._member_done()

    async def _joined(self, ws: Any, spec: MemberSpec) -> None:
        """A joined member's life: it receives (through the pump, or a task
        of its own) and, if a sender, sends, until the worker closes."""
        async with trio.open_nursery() as inner:
            if self.pump is not None:
                self.pump.add(ws, self._text_handler(spec), self._closed_handler(inner.cancel_scope))
            else:
                inner.start_soon(self._receive, ws, spec, inner.cancel_scope)
            try:
                if spec.sender >= 0:
                    inner.start_soon(self._send, ws, spec)
                await self.closing.wait()
                inner.cancel_scope.cancel()
            finally:
                if self.pump is not None:
                    self.pump.remove(ws)

    # -- --client lean: the connect phase in one epoll loop (storm.py) -------

    def storm(self) -> Storm:
        """Every member's connect, upgrade, auth and join, in the plan's order."""
        jobs = [
            Job(spec.url or self.plan.url, spec.username, (
                json.dumps({"type": "auth", "body": spec.token}),
                json.dumps({"type": "join", "username": spec.username, "room": spec.room_name}),
            ))
            for spec in self.plan.members
        ]
        return Storm(
            jobs, self.plan.origin, self.plan.connect_concurrency, self.plan.connect_timeout_s, JOIN_TIMEOUT_S
        )

    def take_storm(self, storm: Storm, nursery: trio.Nursery) -> None:
        """Records the members the storm settled; each joined one goes on as
        a LeanWebSocket in a task of its own (a late one only closes)."""
        s = self.stats
        for kind, n in storm.events.items():
            s.events[kind] = s.events.get(kind, 0) + n
        storm.events.clear()
        if s.first_start is None:
            s.first_start = storm.first_start
        for m in storm.take():
            if m.sock is None:
                assert m.error is not None
                self._record_connect_error(m.error)
                self._member_done()
                continue
            spec = self.plan.members[m.index]
            late = not self._record_join(spec, m.t0, m.t1, m.t2)
            nursery.start_soon(self._lean_member, spec, m.sock, m.leftover, late)

    async def _lean_member(self, spec: MemberSpec, sock: socket.socket, leftover: bytes, late: bool) -> None:
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            try:
                ws = LeanWebSocket(stream, leftover)
            except BaseException:
                await stream.aclose()
                raise
            try:
                if not late:
                    await self._joined(ws, spec)
            finally:
                with trio.CancelScope(shield=True):
                    await ws.aclose(DISCONNECT_TIMEOUT_S)
        except Exception as exc:
            if not self.closing.is_set():
                self.stats.count(self.stats.disconnects, _error_kind(exc))
        finally:
            self._member_done()

    async def finish_storm(self, storm: Storm, nursery: trio.Nursery) -> None:
        """Members still connecting when the connect phase ended: in a thread
        now (the worker's loop has other work), joins counted as late."""
        try:
            await trio.to_thread.run_sync(storm.run, self.plan.hard_deadline, abandon_on_cancel=True)
        except BaseException:
            storm.stop()  # the thread closes what it holds
            raise
        self.take_storm(storm, nursery)
        storm.close()

    async def _await_own_join(self, ws: trio_websocket.WebSocketConnection, username: str) -> None:
        while True:
            msg = json.loads(await ws.get_message())
            kind = msg.get("type")
            self.stats.count(self.stats.events, f"{kind} (connect phase)")
            if kind == "join" and msg.get("username") == username:
                return

    def _text_handler(self, spec: MemberSpec) -> Callable[[str | bytes, int], None]:
        """What one member does with each text it receives (at `now_us`)."""
        s = self.stats
        loads = json.loads
        record = s.record
        room = spec.room
        host = spec.host
        last_seq: dict[int, int] = {}

        def on_text(text: str | bytes, now_us: int) -> None:
            try:
                msg = loads(text)
                kind = msg["type"]
            except (ValueError, KeyError, TypeError):
                s.bad_frames += 1
                return
            if kind != "message":
                s.events[kind] = s.events.get(kind, 0) + 1
                return
            try:
                sender, seq, sent_us = msg["body"].split(":", 3)[:3]
                sender_id, seq_no, sent = int(sender), int(seq), int(sent_us)
            except (KeyError, AttributeError, ValueError):
                s.foreign += 1
                return
            if seq_no <= last_seq.get(sender_id, -1):
                s.duplicates += 1
                return
            last_seq[sender_id] = seq_no
            if self.times is not None:
                record(room, now_us, sent, host)

        return on_text

    def _closed_handler(self, scope: trio.CancelScope) -> Callable[[Any], None]:
        def on_closed(reason: Any) -> None:
            if not self.closing.is_set():
                self.stats.count(self.stats.disconnects, _error_kind(trio_websocket.ConnectionClosed(reason)))
            scope.cancel()

        return on_closed

    async def _receive(
        self, ws: trio_websocket.WebSocketConnection, spec: MemberSpec, scope: trio.CancelScope
    ) -> None:
        get = ws.get_message
        now_ns = time.monotonic_ns
        on_text = self._text_handler(spec)
        try:
            while True:
                text = await get()
                on_text(text, now_ns() // 1000)
        except trio_websocket.ConnectionClosed as exc:
            self._closed_handler(scope)(exc.reason)

    async def _send(self, ws: trio_websocket.WebSocketConnection, spec: MemberSpec) -> None:
        await self.go.wait()
        times = self.times
        assert times is not None
        s = self.stats
        interval = self.plan.interval_s
        min_chars = self.plan.body_pad
        sent = s.sent_by_room.setdefault(spec.room, [0, 0, 0])
        at = self.clock.at
        # Spread the senders over one interval (golden-ratio steps) so they do not fire together.
        due = times.start + ((spec.sender * 0.6180339887) % 1.0) * interval
        seq = 0
        try:
            while due < times.window_end:
                await trio.sleep_until(at(due))
                now_ns = time.monotonic_ns()
                now = now_ns / 1e9
                sent_us = now_ns // 1000
                lag = now - due
                if lag > s.send_max_lag_s and now >= times.window_start:
                    s.send_max_lag_s = lag
                body = "%d:%d:%d" % (spec.sender, seq, sent_us)
                if len(body) < min_chars:
                    body += ":" + "x" * (min_chars - len(body) - 1)
                await ws.send_message('{"type":"message","body":"%s"}' % body)
                seq += 1
                if sent_us < s.win_start_us:
                    sent[0] += 1
                elif sent_us < s.win_end_us:
                    sent[1] += 1
                else:
                    sent[2] += 1
                second = (sent_us - s.t0_us) // 1_000_000
                s.sent_per_second[second] = s.sent_per_second.get(second, 0) + 1
                due += interval
                behind = time.monotonic() - due
                if behind > interval:
                    missed = int(behind / interval)
                    s.skipped_sends += missed
                    due += missed * interval
        except trio_websocket.ConnectionClosed:
            pass  # the receive task records why

    async def cpu_ticker(self, times: Times) -> None:
        for mark in sample_marks(times):
            await trio.sleep_until(self.clock.at(mark))
            self.stats.cpu_samples.append((mark, time.process_time()))


class _Link:
    """The pipe to the coordinator, without blocking the trio loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def send(self, message: Any) -> None:
        await trio.to_thread.run_sync(self.conn.send, message)

    async def recv(self) -> Any:
        return await trio.to_thread.run_sync(self.conn.recv, abandon_on_cancel=True)


async def _run(plan: WorkerPlan, conn: Connection) -> None:
    link = _Link(conn)
    worker = Worker(plan)
    s = worker.stats
    await link.send(("ready", plan.index))
    with trio.move_on_at(worker.clock.at(plan.hard_deadline)):
        async with trio.open_nursery() as nursery:
            command = await link.recv()
            if command[0] != "connect":
                return
            t_connect = command[1]
            await trio.sleep_until(worker.clock.at(t_connect))
            cpu0 = time.process_time()
            storm = None
            if worker.pump is not None:
                nursery.start_soon(worker.pump.run)
                # Blocks this loop, which has nothing else to do meanwhile:
                # the coordinator waits for the report, the pump for members.
                storm = worker.storm()
                storm.run(t_connect + plan.connect_timeout_s)
                worker.take_storm(storm, nursery)
            else:
                for spec in plan.members:
                    nursery.start_soon(worker.member, spec)
            with trio.move_on_at(worker.clock.at(t_connect + plan.connect_timeout_s)):
                await worker.all_settled.wait()
            worker.connect_over = True
            if storm is not None:
                if storm.pending:
                    nursery.start_soon(worker.finish_storm, storm, nursery)
                else:
                    storm.close()
            s.connect_cpu_s = time.process_time() - cpu0
            s.connect_wall_s = time.monotonic() - t_connect
            await link.send(("joined", s.join_report()))
            command = await link.recv()
            if command[0] == "go":
                times: Times = command[1]
                s.t0_us = int(times.start * 1e6)
                s.win_start_us = int(times.window_start * 1e6)
                s.win_end_us = int(times.window_end * 1e6)
                worker.times = times
                worker.go.set()
                nursery.start_soon(worker.cpu_ticker, times)
                await trio.sleep_until(worker.clock.at(times.drain_end) + 0.05)
                await link.send(("result", s.result()))
                command = await link.recv()
            worker.closing.set()
            with trio.move_on_after(plan.close_timeout_s):
                await worker.all_done.wait()
            nursery.cancel_scope.cancel()


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """multiprocessing target."""
    # The coordinator stops workers; a terminal's Ctrl-C is its business.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        profile_dir = os.environ.get("GARIN_BENCH_PROFILE")
        if profile_dir:  # where the client's own CPU goes: python -m pstats DIR/worker-0.prof
            import cProfile

            cProfile.runctx(
                "trio.run(_run, plan, conn)", globals(), {"plan": plan, "conn": conn, "trio": trio},
                os.path.join(profile_dir, f"worker-{plan.index}.prof"),
            )
        else:
            trio.run(_run, plan, conn)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        raise SystemExit(1) from None

"""The connect phase of `bench.py --client lean`: a worker's members connect,
upgrade, authenticate and join through ONE plain epoll loop.

Why: a trio task per member, trio's open_tcp_stream and several awaits per
step cost the load generator ~360 us of CPU per connection, about as much as
garin's router, so on a 2-core machine the client capped the measured
connect rate. Here a member is a small record that one loop moves through
its steps, one non-blocking system call per step.

Each member does exactly what a GarinChat client does, in these states:

  CONNECTING  non-blocking TCP connect; once writable, send the HTTP upgrade
  UPGRADING   read to the end of the response head; 101 with the right
              Sec-WebSocket-Accept, else ConnectionRejected / HandshakeError;
              then send the auth and join frames, in one write (as a browser
              sending two messages back to back)
  JOINING     read frames until the member's own `join` comes back (a ping
              is answered; a close frame is answered and ends it)
  JOINED      settled; still read, so that the server never meets a stalled
              reader: what follows the join is kept as `leftover`, for the
              LeanWebSocket that takes the socket over (`take`)

A failure carries the exception the trio clients raise for the same thing
(trio_websocket's, trio.TooSlowError), so the worker names it the same way.
At most `concurrency` members are between their start and their join; each
has `connect_timeout_s` for its handshake and `join_timeout_s` for its join.
The loop blocks whoever runs it: the worker's trio thread while nothing else
is due there, or a thread of its own (then `stop` ends it from outside).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, ConnectionTimeout, HandshakeError

from garin_bench.wsframe import (
    OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, MaskedFrameError, accept_for, client_frame, frame_at, new_key,
    upgrade_request,
)

RECEIVE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
# How often a loop running in its own thread looks at `stop`.
STOP_CHECK_S = 0.25
# A write still pending at the hand-over (never seen: the server's echo of
# the join proves the frames went out) is finished blocking, this long at most.
HAND_OVER_SEND_S = 1.0

CONNECTING, UPGRADING, JOINING, JOINED, FAILED = range(5)


@dataclass(frozen=True, slots=True)
class Job:
    url: str
    username: str  # whose `join` event ends the member's connect phase
    texts: tuple[str, ...]  # the messages sent once upgraded (auth, join)


@dataclass(frozen=True, slots=True)
class _Target:
    family: int
    address: tuple[str, int] | tuple[str, int, int, int]
    host: str
    port: int
    path: str


class Member:
    """One member's progress; once settled, its outcome: `error`, or a
    joined `sock` with its `leftover` bytes. Times are time.monotonic():
    t0 start, t1 handshake done, t2 own join received."""

    __slots__ = ("index", "job", "sock", "state", "t0", "t1", "t2", "key", "buf", "out", "parts", "after", "error")

    def __init__(self, index: int, job: Job) -> None:
        self.index = index
        self.job = job
        self.sock: socket.socket | None = None
        self.state = CONNECTING
        self.t0 = self.t1 = self.t2 = 0.0
        self.key = b""
        self.buf = b""  # the response head, then frames, read so far
        self.out = b""  # written, not yet taken by the kernel
        self.parts: list[bytes] = []  # a fragmented message's frames
        self.after: list[bytes] = []  # what came after the own join
        self.error: BaseException | None = None

    @property
    def leftover(self) -> bytes:
        return b"".join(self.after)


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


def _broken(exc: OSError) -> BaseException:
    """What trio's SocketStream raises for a socket error (and trio clients report)."""
    return _caused(trio.BrokenResourceError(f"socket connection broken: {exc}"), exc)


def _closed(code: int = 1006, reason: str | None = None) -> ConnectionClosed:
    return ConnectionClosed(CloseReason(code, reason))


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path with query) of a ws:// URL, else HandshakeError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise HandshakeError(f"the lean client speaks ws:// only, not {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def upgrade_response(data: bytes, key: bytes) -> bytes | None:
    """The bytes after the response head in `data` if it holds a whole head
    that accepts `key`; None while the head is incomplete; else
    ConnectionRejected (not 101) or HandshakeError."""
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        if len(data) > MAX_HEADER_BYTES:
            raise _caused(HandshakeError(), ConnectionError("upgrade response too large"))
        return None
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
    headers = tuple(
        (name.strip().lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines[1:])
    )
    if code != 101:
        raise ConnectionRejected(code, headers, rest)
    if dict(headers).get(b"sec-websocket-accept") != accept_for(key):
        raise _caused(HandshakeError(), ConnectionError("bad Sec-WebSocket-Accept"))
    return rest


class Storm:
    def __init__(
        self, jobs: Sequence[Job], origin: str, concurrency: int, connect_timeout_s: float, join_timeout_s: float
    ) -> None:
        self._jobs = jobs
        self._next = 0  # the next job to start
        self._origin = origin
        self._concurrency = max(1, concurrency)
        self._connect_timeout_s = connect_timeout_s
        self._join_timeout_s = join_timeout_s
        self._epoll = select.epoll()
        self._by_fd: dict[int, Member] = {}
        self._targets: dict[str, _Target | BaseException] = {}
        # Members by deadline: they start (and finish handshakes) in order and
        # share one timeout each, so each deque is sorted by its deadline.
        self._handshaking: deque[Member] = deque()
        self._joining: deque[Member] = deque()
        self._settled: list[Member] = []
        self._stopped = False
        self.in_flight = 0
        self.first_start: float | None = None
        self.events: dict[str, int] = {}  # "KIND (connect phase)": count, like the worker's

    @property
    def pending(self) -> int:
        """Members not settled yet (started or not)."""
        return self.in_flight + len(self._jobs) - self._next

    def stop(self) -> None:
        """Ends `run` soon (from another thread) and closes what is left."""
        self._stopped = True

    # -- the loop -----------------------------------------------------------

    def run(self, until: float | None) -> None:
        """Drives the members until every one has settled, `until` (monotonic)
        has come or `stop` was called; runs again from where it stopped."""
        poll = self._epoll.poll
        by_fd = self._by_fd
        step = self._step
        now = time.monotonic()
        while not self._stopped:
            self._start_more()
            if not self.in_flight or (until is not None and now >= until):
                break
            for fd, events in poll(self._wait_s(now, until)):
                member = by_fd.get(fd)
                if member is not None:
                    try:
                        step(member, events)
                    except Exception as exc:
                        self._fail(member, exc)
            now = time.monotonic()
            self._expire(now)
        if self._stopped:
            self.close()

    def _wait_s(self, now: float, until: float | None) -> float:
        """Until the first deadline (the deques' heads are live after _expire)."""
        wake = now + STOP_CHECK_S
        if until is not None:
            wake = min(wake, until)
        if self._handshaking:
            wake = min(wake, self._handshaking[0].t0 + self._connect_timeout_s)
        if self._joining:
            wake = min(wake, self._joining[0].t1 + self._join_timeout_s)
        return max(0.0, wake - now)

    def _start_more(self) -> None:
        jobs = self._jobs
        while self.in_flight < self._concurrency and self._next < len(jobs):
            member = Member(self._next, jobs[self._next])
            self._next += 1
            self.in_flight += 1
            try:
                self._start(member)
            except Exception as exc:
                self._fail(member, exc)

    def _start(self, m: Member) -> None:
        m.t0 = time.monotonic()
        if self.first_start is None:
            self.first_start = m.t0
        self._handshaking.append(m)
        target = self._target(m.job.url)
        sock = m.sock = socket.socket(target.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's SocketStream does
        m.key = new_key()
        m.out = upgrade_request(target.host, target.port, target.path, self._origin, m.key)
        err = sock.connect_ex(target.address)
        if err not in (0, errno.EINPROGRESS):
            raise self._refused(target, err)
        fd = sock.fileno()
        self._by_fd[fd] = m
        self._epoll.register(fd, select.EPOLLOUT)

    def _target(self, url: str) -> _Target:
        """Where `url` points, resolved once per URL (a failure too)."""
        target = self._targets.get(url)
        if target is None:
            try:
                host, port, path = parse_url(url)
                try:
                    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                except OSError as exc:
                    raise _caused(HandshakeError(), exc) from None
                target = _Target(family, address, host, port, path)  # type: ignore[arg-type]  # IP families only
            except Exception as exc:
                target = exc
            self._targets[url] = target
        if isinstance(target, BaseException):
            raise target
        return target

    @staticmethod
    def _refused(target: _Target, err: int) -> BaseException:
        # In the words of trio.open_tcp_stream, so that the error kind reads the same.
        host = f"[{target.host}]" if ":" in target.host else target.host
        failed = OSError(f"all attempts to connect to {host}:{target.port} failed")
        return _caused(HandshakeError(), _caused(failed, OSError(err, os.strerror(err))))

    def _step(self, m: Member, events: int) -> None:
        state = m.state
        sock = m.sock
        assert sock is not None
        if state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise self._refused(self._target(m.job.url), err)
            m.state = UPGRADING
            request, m.out = m.out, b""
            self._write(m, request)
            if not m.out:
                self._epoll.modify(sock.fileno(), select.EPOLLIN)
            return
        if events & select.EPOLLOUT and m.out:
            pending, m.out = m.out, b""
            self._write(m, pending)
            if not m.out:
                self._epoll.modify(sock.fileno(), select.EPOLLIN)
        if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            if state == UPGRADING:
                raise _broken(exc) from None
            data = b""
        if state == JOINED:
            if data:
                m.after.append(data)
            else:  # EOF stays readable: the LeanWebSocket meets it too
                self._forget(m)
        elif state == JOINING:
            if not data:
                raise _closed()
            self._frames(m, m.buf + data if m.buf else data)
        else:
            if not data:
                raise _caused(HandshakeError(), ConnectionError("server closed during the upgrade"))
            m.buf += data
            rest = upgrade_response(m.buf, m.key)
            if rest is None:
                return
            m.t1 = time.monotonic()
            m.buf = b""
            m.state = JOINING
            self._joining.append(m)
            self._write(m, b"".join(client_frame(OP_TEXT, text.encode()) for text in m.job.texts))
            if rest:
                self._frames(m, rest)

    def _frames(self, m: Member, buf: bytes) -> None:
        """Reads a joining member's frames (as LeanWebSocket does) up to its own join."""
        pos = 0
        events = self.events
        try:
            while (frame := frame_at(buf, pos)) is not None:
                b0, start, pos = frame
                text = self._text(m, b0, buf[start:pos])
                if text is None:
                    continue
                msg = json.loads(text)
                kind = msg.get("type")
                key = f"{kind} (connect phase)"
                events[key] = events.get(key, 0) + 1
                if kind == "join" and msg.get("username") == m.job.username:
                    m.t2 = time.monotonic()
                    m.state = JOINED
                    if pos < len(buf):
                        m.after.append(buf[pos:])
                    self.in_flight -= 1
                    self._settled.append(m)
                    return
        except MaskedFrameError as exc:
            raise HandshakeError(str(exc)) from None
        m.buf = buf[pos:]

    def _text(self, m: Member, b0: int, payload: bytes) -> str | None:
        """The text message a frame completes, if any. A ping is answered; a
        close frame is answered and ends the member."""
        if b0 == 0x81:  # the common case: a whole text message in one frame
            return payload.decode()
        opcode = b0 & 0x0F
        if opcode in (0x0, 0x1, 0x2):
            m.parts.append(payload)
            if not b0 & 0x80:
                return None
            text = b"".join(m.parts).decode(errors="replace")
            m.parts.clear()
            return text
        if opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            try:  # answered as LeanWebSocket answers it
                self._write(m, client_frame(OP_CLOSE, (1000 if code == 1005 else code).to_bytes(2, "big")))
            except ConnectionClosed:
                pass
            raise _closed(code, payload[2:].decode(errors="replace") or None)
        if opcode == OP_PING:
            self._write(m, client_frame(OP_PONG, payload))
        return None

    def _write(self, m: Member, data: bytes) -> None:
        """Sends `data` after what is still pending; the rest waits for EPOLLOUT."""
        sock = m.sock
        assert sock is not None
        if not m.out:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if m.state == UPGRADING:
                    raise _broken(exc) from None
                raise _closed() from None
            data = data[sent:]
            if not data:
                return
            self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        m.out += data

    def _expire(self, now: float) -> None:
        handshaking = self._handshaking
        while handshaking and (handshaking[0].state not in (CONNECTING, UPGRADING)
                               or handshaking[0].t0 + self._connect_timeout_s <= now):
            m = handshaking.popleft()
            if m.state in (CONNECTING, UPGRADING):
                self._fail(m, ConnectionTimeout())
        joining = self._joining
        while joining and (joining[0].state != JOINING or joining[0].t1 + self._join_timeout_s <= now):
            m = joining.popleft()
            if m.state == JOINING:
                self._fail(m, trio.TooSlowError())

    # -- outcomes -----------------------------------------------------------

    def _forget(self, m: Member) -> None:
        """Takes a member's socket out of the loop (it stays open)."""
        if m.sock is not None and self._by_fd.pop(m.sock.fileno(), None) is not None:
            self._epoll.unregister(m.sock.fileno())

    def _fail(self, m: Member, exc: BaseException) -> None:
        self._forget(m)
        if m.state == JOINED:
            return  # settled already: its new owner meets the broken socket
        if m.sock is not None:
            m.sock.close()
            m.sock = None
        m.state = FAILED
        m.error = exc
        self.in_flight -= 1
        self._settled.append(m)

    def take(self) -> list[Member]:
        """The members settled since the last take: failed ones, and joined
        ones whose sockets (blocking mode off) now belong to the caller."""
        settled, self._settled = self._settled, []
        for m in settled:
            if m.state == JOINED and m.sock is not None:
                self._forget(m)
                if m.out:
                    m.sock.settimeout(HAND_OVER_SEND_S)
                    try:
                        m.sock.sendall(m.out)
                    except OSError:
                        pass  # the new owner finds the socket broken
                    m.out = b""
                    m.sock.setblocking(False)
        return settled

    def close(self) -> None:
        """Closes the epoll set and every socket not taken (in flight or settled)."""
        for m in list(self._by_fd.values()) + self._settled:
            if m.sock is not None:
                m.sock.close()
                m.sock = None
        self._by_fd.clear()
        self._epoll.close()

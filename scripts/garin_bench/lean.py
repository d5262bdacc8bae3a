"""A lean client WebSocket for the load generator (`bench.py --client lean`).

Why: trio-websocket spends about 35 us of client CPU per received message
(a reader task, wsproto events, a memory channel hand-off per frame). At
50k deliveries/s that is nearly two cores, so on a 2-core machine the load
generator, not the server, sets every limit. This client reads whole socket
buffers and cuts the frames out itself, which costs a few microseconds per
message, so the server can be measured at the rates it is meant for.

It is NOT a general WebSocket client: no extensions, no fragmented sends, and
it trusts the server (a garin router or any RFC 6455 server) to send
well-formed unmasked frames. It speaks exactly the client side of RFC 6455
that a GarinChat member needs once joined: masked text frames out,
text/close/ping frames in (the bytes framed by wsframe.py), and a closing
handshake. The connection is opened and joined by storm.py, which hands the
socket over with whatever it read after the join (`leftover`). It raises
trio-websocket's exception types so the worker's error reporting is the same
for both clients.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from collections.abc import Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError

from garin_bench.wsframe import MaskedFrameError, client_frame, frame_at

RECEIVE_BYTES = 64 * 1024


class LeanWebSocket:
    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self._stream = stream
        self._buf = b""
        self._messages: deque[str] = deque()
        self._parts: list[bytes] = []
        self._send_lock = trio.Lock()
        self._pongs: list[bytes] = []
        self.closed: CloseReason | None = None  # set once the server's close frame (or EOF) arrived
        self._close_sent = False
        if leftover:
            self._parse(leftover)

    def fileno(self) -> int:
        return self._stream.socket.fileno()

    # -- receiving ----------------------------------------------------------

    async def get_message(self) -> str:
        messages = self._messages
        while not messages:
            if self.closed is not None:
                await self._answer_close()
                raise ConnectionClosed(self.closed)
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = CloseReason(1006, None)
                continue
            self._parse(data)
            if self._pongs:
                await self.send_pongs()
        return messages.popleft()

    async def send_pongs(self) -> None:
        """Answer the pings parsed so far (a server closes a member that
        does not: garin after GARIN_PING_INTERVAL + GARIN_PING_TIMEOUT)."""
        pongs, self._pongs = self._pongs, []
        for payload in pongs:
            await self._send_frame(0xA, payload)

    def _parse(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        messages = self._messages
        while True:
            try:
                frame = frame_at(buf, pos)
            except MaskedFrameError as exc:
                raise HandshakeError(str(exc)) from None
            if frame is None:
                break
            b0, start, end = frame
            opcode = b0 & 0x0F
            if b0 == 0x81:  # the common case: a whole text message in one frame
                messages.append(buf[start:end].decode())
            elif opcode in (0x0, 0x1, 0x2):
                self._parts.append(buf[start:end])
                if b0 & 0x80:
                    payload = b"".join(self._parts)
                    self._parts.clear()
                    messages.append(payload.decode(errors="replace"))
            elif opcode == 0x8:
                payload = buf[start:end]
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.closed = CloseReason(code, payload[2:].decode(errors="replace") or None)
            elif opcode == 0x9:
                self._pongs.append(buf[start:end])
            pos = end
        self._buf = buf[pos:] if pos < len(buf) else b""

    # -- sending ------------------------------------------------------------

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(client_frame(opcode, payload))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self.closed is None:
                    self.closed = CloseReason(1006, None)
                raise ConnectionClosed(self.closed) from None

    async def send_message(self, text: str) -> None:
        if self.closed is not None or self._close_sent:
            raise ConnectionClosed(self.closed)
        await self._send_frame(0x1, text.encode())

    # -- closing ------------------------------------------------------------

    async def _answer_close(self) -> None:
        if self._close_sent or self.closed is None or self.closed.code == 1006:
            return
        self._close_sent = True
        code = self.closed.code if self.closed.code not in (1005, 1006) else 1000
        try:
            await self._send_frame(0x8, code.to_bytes(2, "big"))
        except ConnectionClosed:
            pass

    async def aclose(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            if not self._close_sent and self.closed is None:
                self._close_sent = True
                try:
                    await self._send_frame(0x8, (1000).to_bytes(2, "big"))
                except ConnectionClosed:
                    pass
            while self.closed is None:  # wait for the server's close (or EOF)
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                self._parse(data)
        await self._stream.aclose()


class Pump:
    """Reads every registered member socket from ONE task through one epoll set.

    A task per connection costs a trio wake-up (~10 us of Python) per received
    message; here one wake-up serves every socket that became readable, and
    each is read with one non-blocking `os.read` of up to RECEIVE_BYTES. The
    epoll set's own fd is what trio waits on. Members are handed over after
    their join (`add`) and taken back before their closing handshake
    (`remove`); sending stays with the member's own task, but for pongs: a
    task each (pings are rare: one per member per GARIN_PING_INTERVAL of
    silence), so that the Pump never waits on one member's socket.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._members: dict[int, tuple[LeanWebSocket, Callable[[str, int], None], Callable[[CloseReason], None]]] = {}

    def add(
        self, ws: LeanWebSocket, on_text: Callable[[str, int], None], on_closed: Callable[[CloseReason], None]
    ) -> None:
        now_us = time.monotonic_ns() // 1000
        while ws._messages:
            on_text(ws._messages.popleft(), now_us)
        if ws.closed is not None:
            on_closed(ws.closed)
            return
        fd = ws.fileno()
        self._members[fd] = (ws, on_text, on_closed)
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, ws: LeanWebSocket) -> None:
        fd = ws.fileno()
        if self._members.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as pongs:
                await self._pump(pongs)
        finally:
            self._epoll.close()

    async def _pump(self, pongs: trio.Nursery) -> None:
        epoll = self._epoll
        members = self._members
        read = os.read
        now_ns = time.monotonic_ns
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0):
                entry = members.get(fd)
                if entry is None:
                    continue
                ws, on_text, on_closed = entry
                try:
                    data = read(fd, RECEIVE_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    ws._parse(data)
                    if ws._pongs:
                        pongs.start_soon(_answer_pings, ws)
                else:
                    ws.closed = CloseReason(1006, None)
                now_us = now_ns() // 1000
                messages = ws._messages
                while messages:
                    on_text(messages.popleft(), now_us)
                if ws.closed is not None:
                    self.remove(ws)
                    on_closed(ws.closed)


async def _answer_pings(ws: LeanWebSocket) -> None:
    try:
        await ws.send_pongs()
    except ConnectionClosed:
        pass  # the Pump hears the close or EOF and reports it

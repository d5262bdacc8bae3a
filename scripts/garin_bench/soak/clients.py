"""The soak's connections: open one (trio-websocket over a socket of our
own, so that it can be reset or given a small receive buffer), read it,
authenticate and join, hang up. What arrives is checked by receive.py.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import trio
import trio_websocket

from garin_bench.server import TokenMinter
from garin_bench.soak.receive import check_frame
from garin_bench.soak.records import Conn, Ledger, Membership, SoakPlan, now, trio_at

RECEIVE_BUFFER_BYTES = 64 * 1024
MESSAGE_QUEUE_SIZE = 64
CONNECT_TIMEOUT_S = 5.0
JOIN_WAIT_S = 5.0  # own join broadcast after sending join
CLOSE_WAIT_S = 6.0  # a close after the offending frame (timeouts add their own)


class Clients:
    def __init__(self, plan: SoakPlan, ledger: Ledger, host: str, port: int, origin: str,
                 minter: TokenMinter) -> None:
        self.plan = plan
        self.ledger = ledger
        self.minter = minter
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.family: int = family
        self.addr: tuple[Any, ...] = addr
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.headers = [(b"Origin", origin.encode())]
        self._cids: Iterator[int] = iter(range(1, 2**62))

    def new_conn(self, kind: str) -> Conn:
        cid = next(self._cids)
        prefix = {"member": "m", "misbehaver": "x", "feeder": "f", "slow": "s", "probe": "p"}[kind]
        self.ledger.conns[kind] += 1
        return Conn(cid, kind, f"{prefix}{self.plan.run_id}-{cid}")

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
        self.ledger.open_conns += 1
        self.ledger.max_open_conns = max(self.ledger.max_open_conns, self.ledger.open_conns)
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
        self.ledger.open_conns -= 1
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
        await self.send(conn, {"type": "auth", "body": self.minter(f"soak-{self.plan.run_id}-{conn.cid}")})

    async def join(self, conn: Conn, room: int, refusal_ok: bool = False) -> Membership | None:
        """Join and wait for the own join broadcast; None (an error counted,
        unless `refusal_ok` and the server closed the connection) if it never came."""
        m = Membership(conn.cid, conn.username, room, conn.kind, now())
        conn.pending = m
        self.ledger.memberships.append(m)
        await self.send(conn, {"type": "join", "username": conn.username, "room": self.plan.rooms[room]})
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
                self.ledger.error(f"{conn.kind} closed while joining: {conn.close_text()}", conn.username)
            else:
                self.ledger.error(f"{conn.kind} join not confirmed within {JOIN_WAIT_S:g}s", conn.username)
            return None
        return m

    async def enter(self, conn: Conn, nursery: trio.Nursery, room: int) -> Membership | None:
        """Open, read, authenticate and join `room` (as join)."""
        await self.open(conn, nursery)
        self.start_reader(conn, nursery)
        await self.auth(conn)
        return await self.join(conn, room)

    async def wait_closed_until(self, conn: Conn, t: float) -> bool:
        """Sleep until t; True if the connection was closed meanwhile."""
        with trio.move_on_at(trio_at(t)):
            await conn.closed.wait()
        return conn.closed.is_set()

    def on_frame(self, conn: Conn, text: str | bytes, t: float) -> None:
        check_frame(self.plan, self.ledger, conn, text, t)

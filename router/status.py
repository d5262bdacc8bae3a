"""The operator's port: GET /metrics (Prometheus) and GET /health.

Off by default (GARIN_METRICS_PORT=0) and on 127.0.0.1 unless told otherwise.
Every router binds it with SO_REUSEPORT, so with several routers any of them
answers; each sees every shard, so any answer about shard reachability holds.

A tiny h11 server: one request per connection, bounded in time and size.
GET and HEAD are answered (HEAD with GET's headers and no body, as RFC 9110
9.3.2 asks); any other method gets 405, an HTTP version but 1.0 and 1.1 505. Whatever arrives on this port, a
handler never raises: a peer's bad bytes are logged at debug and answered
with h11's suggested 4xx when possible, anything else (a bug of ours) at
warning; either way the connection is closed and the router keeps serving.
"""

from __future__ import annotations

import json
import logging
import socket as stdlib_socket
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from garin import metrics

log = logging.getLogger("garin.router")

REQUEST_TIMEOUT_S = 5.0
# A request head larger than this is refused (431); h11's default is 16 KiB
# too, and these requests are a dozen short lines.
MAX_REQUEST_BYTES = 16 * 1024

# Named parts ("shards", and "redis" with GARIN_REDIS_URL), each name -> up.
Health = Callable[[], dict[str, dict[str, bool]]]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: bool = False  # add `Allow: GET, HEAD` (a 405)


def reply_events(method: bytes, reply: Reply) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    """The h11 events that answer a `method` request; a HEAD gets no body."""
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("connection", "close"),
    ]
    if reply.allow:
        headers.append(("allow", "GET, HEAD"))
    events: list[h11.Response | h11.Data | h11.EndOfMessage] = [
        h11.Response(status_code=reply.status, headers=headers)
    ]
    if method != b"HEAD":
        events.append(h11.Data(data=reply.body))
    events.append(h11.EndOfMessage())
    return events


async def _route(request: h11.Request, health: Health) -> Reply:
    # h11 parses any HTTP/1.x-looking version (HTTP/9.9 included) as 1.x.
    if request.http_version not in (b"1.0", b"1.1"):
        return Reply(505, b"HTTP/1.0 or HTTP/1.1 only\n")
    if request.method not in (b"GET", b"HEAD"):
        return Reply(405, b"GET or HEAD only\n", allow=True)
    target = request.target.split(b"?", 1)[0]
    if target == b"/metrics":
        text = await trio.to_thread.run_sync(metrics.render)
        return Reply(200, text, "text/plain; version=0.0.4; charset=utf-8")
    if target == b"/health":
        parts = health()
        ok = all(all(part.values()) for part in parts.values())
        body = json.dumps({"status": "ok" if ok else "degraded", **parts}).encode() + b"\n"
        return Reply(200 if ok else 503, body, "application/json")
    return Reply(404, b"try /metrics or /health\n")


def _send(conn: h11.Connection, events: list[h11.Response | h11.Data | h11.EndOfMessage]) -> bytes:
    return b"".join(conn.send(event) or b"" for event in events)


async def _refuse(stream: trio.abc.Stream, conn: h11.Connection, exc: h11.RemoteProtocolError) -> None:
    """Best effort: tell a peer that sent a bad request why (400, 431, ...)."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        data = _send(conn, reply_events(b"GET", Reply(exc.error_status_hint, b"bad request\n")))
    except h11.LocalProtocolError:
        return
    await stream.send_all(data)


async def handle_status_request(stream: trio.abc.Stream, health: Health, peer: str = "?") -> None:
    """Answer one request on `stream`, then close it. Never raises (but Cancelled)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                event: object = h11.NEED_DATA
                while event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(MAX_REQUEST_BYTES)))
                    event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                log.debug("status port: bad request from %s: %s", peer, exc)
                await _refuse(stream, conn, exc)
                return
            if not isinstance(event, h11.Request):
                return  # the peer closed without a request
            reply = await _route(event, health)
            await stream.send_all(_send(conn, reply_events(event.method, reply)))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("status port: connection from %s lost: %s", peer, exc)
    except Exception:
        log.warning("status port: error answering %s; closing", peer, exc_info=True)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


async def serve_status(bound: stdlib_socket.socket, health: Health) -> None:
    """Serve on `bound` (garin.ports.bind_metrics: bound before the router started)."""
    host, port = bound.getsockname()[:2]
    sock = trio.socket.from_stdlib_socket(bound)
    sock.listen(64)
    log.info("metrics and health on http://%s:%d/metrics, /health", host, port)

    async def handle(stream: trio.SocketStream) -> None:
        await handle_status_request(stream, health, _peer(stream))

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])

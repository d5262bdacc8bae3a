"""The operator's port: GET /metrics (Prometheus) and GET /health.

Off by default (GARIN_METRICS_PORT=0) and on 127.0.0.1 unless told otherwise.
Every router binds it with SO_REUSEPORT, so with several routers any of them
answers; each sees every shard, so any answer about shard reachability holds.
A tiny h11 server: one request per connection, bounded in time and size.
"""

from __future__ import annotations

import json
import logging
import socket as stdlib_socket
from collections.abc import Callable

import h11
import trio

from garin import metrics

log = logging.getLogger("garin.router")

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 * 1024


def _respond(status: int, body: bytes, content_type: str) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    headers = [("content-type", content_type), ("content-length", str(len(body))), ("connection", "close")]
    return [h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()]


async def _handle(stream: trio.SocketStream, health: Callable[[], dict[str, bool]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            event: object = h11.NEED_DATA
            while event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
                event = conn.next_event()
            if not isinstance(event, h11.Request):
                return
            target = event.target.split(b"?", 1)[0]
            if event.method not in (b"GET", b"HEAD"):
                reply = _respond(405, b"GET only\n", "text/plain")
            elif target == b"/metrics":
                text = await trio.to_thread.run_sync(metrics.render)
                reply = _respond(200, text, "text/plain; version=0.0.4; charset=utf-8")
            elif target == b"/health":
                shards = health()
                ok = all(shards.values())
                body = json.dumps({"status": "ok" if ok else "degraded", "shards": shards}).encode() + b"\n"
                reply = _respond(200 if ok else 503, body, "application/json")
            else:
                reply = _respond(404, b"try /metrics or /health\n", "text/plain")
            await stream.send_all(b"".join(conn.send(part) or b"" for part in reply))
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve_status(host: str, port: int, health: Callable[[], dict[str, bool]]) -> None:
    sock = trio.socket.socket(stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    await sock.bind((host, port))
    sock.listen(64)
    log.info("metrics and health on http://%s:%d/metrics, /health", host, port)

    async def handle(stream: trio.SocketStream) -> None:
        await _handle(stream, health)

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])

"""The operator's port: Prometheus metrics across processes, and /health."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import (
    GarinServer,
    auth_frame,
    expect_close,
    expect_join,
    free_port,
    join_frame,
    message_frame,
    new_room,
    recv_json,
    running_server,
)

pytestmark = pytest.mark.e2e


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.2)


def test_metrics_and_health_across_routers_and_shards() -> None:
    port = free_port()
    with running_server(GARIN_METRICS_PORT=str(port), GARIN_ROUTERS="2", GARIN_RATE_LIMIT_COUNT="0") as server:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> str | None:
            # Ready means a router serves every shard; the other router may
            # still be linking (degraded, 503) for a moment.
            status, body = get(base + "/health")
            return body if status == 200 else None

        assert json.loads(eventually(healthy)) == {"status": "ok", "shards": {str(i): True for i in range(server.shards)}}

        room = new_room("metrics")
        with server.connect() as a, server.connect() as b, server.connect() as c:
            a.send(auth_frame(server.token("alice")))
            a.send(join_frame("alice", room))
            expect_join(a, "alice", 1)
            b.send(auth_frame(server.token("bobby")))
            b.send(join_frame("bobby", room))
            expect_join(b, "bobby", 2)
            expect_join(a, "bobby", 2)
            for n in range(5):
                a.send(message_frame(f"m{n}"))
                assert recv_json(b)["body"] == f"m{n}"
            c.send("{not json")
            expect_close(c, 1008, "invalid json")

            def counted() -> str | None:
                text = get(base + "/metrics")[1]
                ok = (
                    sample(text, "garin_connections") >= 2
                    and sample(text, "garin_messages_in_total") >= 5
                    and sample(text, "garin_deliveries_total") >= 5
                    and sample(text, "garin_joins_total") >= 2
                    and sample(text, "garin_closes_total", code="1008", reason="invalid json") >= 1
                    and sum(sample(text, "garin_members", shard=str(i)) for i in range(server.shards)) >= 2
                    and all(sample(text, "garin_shard_link_up", shard=str(i)) == 1 for i in range(server.shards))
                )
                return text if ok else None

            text = eventually(counted)
            assert "garin_slow_consumer_drops_total" in text and "garin_rooms" in text
            assert "garin_redis" not in text  # one host, no Redis: no Redis metrics
        status, _ = get(base + "/nope")
        assert status == 404


def test_health_reports_unreachable_shards(tmp_path) -> None:
    server = GarinServer(shards=2)
    metrics_port = free_port()
    env = {**server.env(), "GARIN_METRICS_PORT": str(metrics_port)}
    # A router alone: no shard is running, so none is reachable.
    router = subprocess.Popen(
        [sys.executable, "-m", "garin", "router"], env=env, cwd=server.workdir,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def degraded() -> dict | None:
            try:
                status, body = get(f"http://127.0.0.1:{metrics_port}/health")
            except OSError:
                return None
            return json.loads(body) if status == 503 else None

        assert eventually(degraded) == {"status": "degraded", "shards": {"0": False, "1": False}}
    finally:
        router.terminate()
        assert router.wait(timeout=15) == 0
        shutil.rmtree(server.workdir, ignore_errors=True)  # never started: stop() would not


def test_restarts_are_counted_per_child() -> None:
    from test_faults import replaced, roles

    port = free_port()
    with running_server(GARIN_METRICS_PORT=str(port)) as server:
        assert server.process is not None
        shard = roles(server.process.pid)["shard 0"]
        os.kill(shard, signal.SIGKILL)
        replaced(server, "shard 0", shard)

        def counted() -> str | None:
            text = get(f"http://127.0.0.1:{port}/metrics")[1]
            return text if sample(text, "garin_restarts_total", child="shard 0") == 1 else None

        text = eventually(counted)
        assert sample(text, "garin_restarts_total", child="shard 1") == 0


def raw_exchange(port: int, data: bytes, half_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send `data` to 127.0.0.1:`port` on a plain socket; all it answers until it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            # ENOTCONN: the server already answered and hung up (a busy
            # machine lets it get there before this line).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


@pytest.mark.usefixtures("hard_cap")
def test_nothing_sent_to_the_status_port_stops_the_router() -> None:
    from test_faults import roles

    port = free_port()
    with running_server(GARIN_METRICS_PORT=str(port)) as server:
        assert server.process is not None
        before = roles(server.process.pid)
        room = new_room("status")
        with server.connect() as ws:
            ws.send(auth_frame(server.token("watcher")))
            ws.send(join_frame("watcher", room))
            expect_join(ws, "watcher", 1)

            for target in (b"/health", b"/metrics", b"/nope"):
                for version, host in ((b"HTTP/1.1", b"Host: x\r\n"), (b"HTTP/1.0", b"")):
                    answer = raw_exchange(port, b"HEAD " + target + b" " + version + b"\r\n" + host + b"\r\n")
                    head, _, body = answer.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 "), answer
                    assert b"content-length: " in head.lower() and body == b"", answer
            for bad in (
                b"\x00\xff\xfe garbage\r\n\r\n",
                b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n",
                b"G@T / HTTP/1.1\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 3,
                b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.0\r\n\r\n",
                b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
                b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(200),
                b"",
            ):
                answer = raw_exchange(port, bad)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (bad[:40], answer)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.close()  # hang up before the answer

            # The router that was there is still there, and still serving.
            assert roles(server.process.pid) == before
            ws.send(message_frame("still here"))
            status, body = get(f"http://127.0.0.1:{port}/health")
            assert status == 200 and json.loads(body)["status"] == "ok"
            with server.connect() as other:
                other.send(auth_frame(server.token("newcomer")))
                other.send(join_frame("newcomer", room))
                expect_join(other, "newcomer", 2)
                expect_join(ws, "newcomer", 2)
        assert "Too much data for declared Content-Length" not in server.log_tail(200)

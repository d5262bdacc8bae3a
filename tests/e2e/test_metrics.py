"""The operator's port: Prometheus metrics across processes, and /health."""

from __future__ import annotations

import json
import os
import signal
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
        status, body = get(base + "/health")
        assert status == 200
        assert json.loads(body) == {"status": "ok", "shards": {str(i): True for i in range(server.shards)}}

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

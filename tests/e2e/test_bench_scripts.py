"""The benchmark and soak scripts run end to end on tiny loads.

Their numbers are read by people (README, "Performance"); what is checked here
is that each script still starts its own garin, drives it, stops it and
writes a result that the rest of the tooling reads: a broken script would
otherwise go unnoticed until the next performance run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ALLOWED_ORIGIN, ServerFactory

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("client", ["lean", "trio-websocket"])
def test_bench_spawns_garin_loads_it_and_reports(tmp_path: Path, client: str) -> None:
    out = tmp_path / "bench.json"
    ok(run(
        "bench.py", "--spawn", "--client", client, "--rooms", "2", "--members", "3", "--interval", "0.005",
        "--warmup", "0.5", "--duration", "1", "--drain", "0.5", "--no-plot", "--out", str(out), "--floor", "0.5",
    ))
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["connect"]["joined"] == 6 and result["connect"]["errors"] == 0
    traffic = result["traffic"]
    # 2 rooms x 1 sender every 5 ms x 2 other members, for about a second:
    # enough for the server's CPU to span several of /proc's 10 ms ticks.
    assert traffic["delivered"] >= 400 and traffic["lost"] == 0 and traffic["duplicates"] == 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    server = result["server"]
    assert server["spawned"] and server["cpu_us_per_delivery"] > 0 and server["rss_end_kib"] > 0
    # --floor: the same sockets written without a server, right after the run.
    floor = result["floor"]
    assert floor["conns"] == 6 and floor["group"] == 2 and floor["us_per_write"] > 0
    assert floor["server_ratio"] == round(server["cpu_us_per_delivery"] / floor["us_per_write"], 2)
    table = ok(run("bench_summary.py", f"smoke={out}"))
    assert "| smoke | 1.00 |" in table


def test_lean_members_answer_the_servers_keepalive_pings(tmp_path: Path, garin_factory: ServerFactory) -> None:
    # Listeners send nothing, so garin pings them after GARIN_PING_INTERVAL
    # and closes them 1011 if no frame comes within GARIN_PING_TIMEOUT: the
    # lean client's Pump must answer for them (a long run lost its listeners).
    server = garin_factory(GARIN_PING_INTERVAL="0.3", GARIN_PING_TIMEOUT="0.5")
    out = tmp_path / "bench.json"
    ok(run(
        "bench.py", "--url", server.url, "--secret", server.secret, "--origin", ALLOWED_ORIGIN, "--client", "lean",
        "--rooms", "2", "--members", "3", "--interval", "0.01", "--warmup", "0.5", "--duration", "2.5",
        "--drain", "0.5", "--no-plot", "--out", str(out),
    ))
    traffic = json.loads(out.read_text())["traffic"]
    assert traffic["disconnects"] == {} and traffic["lost"] == 0, traffic
    assert "keepalive ping timeout" not in server.log_path.read_text()


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
def test_bench_hosts_splits_rooms_over_two_hosts_through_redis(tmp_path: Path) -> None:
    out = tmp_path / "hosts.json"
    # Members join one at a time, as the recorded runs did.
    stdout = ok(run(
        "bench.py", "--spawn", "--hosts", "2", "--client", "lean", "--rooms", "2", "--members", "4",
        "--interval", "0.005", "--warmup", "0.5", "--duration", "1", "--drain", "0.5", "--out", str(out),
        "--connect-concurrency", "1", timeout=180.0,
    ))
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["schema"] == "garin-bench-hosts/1"
    assert [r["setup"] for r in result["runs"]] == ["1 host", "2 hosts + Redis"]
    reference, split = (r["result"] for r in result["runs"])
    for one in (reference, split):
        assert one["connect"]["joined"] == 8 and one["connect"]["errors"] == 0
        traffic = one["traffic"]
        assert traffic["delivered"] >= 400 and traffic["lost"] == 0 and traffic["duplicates"] == 0
        assert one["latency_ms"]["p50"] <= one["latency_ms"]["p99"]
    # The reference is a plain run: nothing about hosts in it.
    assert "hosts" not in reference and "hosts" not in reference["config"]
    hosts = split["hosts"]
    assert hosts["count"] == 2 and split["config"]["hosts"] == 2 and split["config"]["redis"]
    per_host = hosts["per_host"]
    # Each room's 4 members are split 2 and 2, so each host has half of
    # every room, and receives deliveries of both rooms' messages.
    assert [h["members"] for h in per_host] == [4, 4]
    assert len({h["pid"] for h in per_host}) == 2 and len({h["url"] for h in per_host}) == 2
    for h in per_host:
        assert h["local_deliveries_per_s"] > 0 and h["cpu_us_per_local_delivery"] > 0
    assert sum(h["local_deliveries_per_s"] for h in per_host) == pytest.approx(
        split["traffic"]["deliveries_per_s"], abs=0.2)
    redis = hosts["redis"]
    assert redis["cpu_s"] >= 0 and redis["messages_published"] == split["traffic"]["sent_window"] > 0
    goals = result["summary"]["goals"]
    medians = result["summary"]["medians"]
    assert goals["host_cpu_ratio"] == round(
        medians["2 hosts + Redis"]["host_us_per_local_delivery"] / medians["1 host"]["garin_us_per_delivery"], 2)
    assert "goal: p99 < 10 ms" in stdout and "| 2 hosts + Redis |" in stdout
    # Every host and the redis-server it started are gone.
    for pid in [h["pid"] for h in per_host] + [redis["pid"]]:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived the benchmark"


def test_bench_room_times_a_message_to_every_member(tmp_path: Path) -> None:
    out = tmp_path / "room.json"
    ok(run("bench_room.py", "--spawn", "--members", "30", "--messages", "2", "--timeout", "60", "--out", str(out)))
    result = json.loads(out.read_text())
    assert "error" not in result and result["members"] == 30
    assert len(result["messages"]) == 2
    for message in result["messages"]:
        assert 0 < message["first_ms"] <= message["median_ms"] <= message["last_ms"]


def test_a_killed_bench_room_stops_the_garin_it_spawned() -> None:
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_room.py"), "--spawn", "--members", "3000", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    try:
        assert bench.stdout is not None
        line = bench.stdout.readline()  # blocks until the server is up (or the script ends)
        found = re.search(r"spawned garin run \(pid (\d+)\)", line)
        assert found, line + bench.stdout.read()
        server = int(found.group(1))
        bench.send_signal(signal.SIGTERM)  # while the room is still filling
        bench.wait(timeout=30)
        # It stopped its server (in a session of its own) before exiting.
        assert not os.path.exists(f"/proc/{server}"), f"garin run {server} outlived the benchmark"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if bench.stdout is not None:
            bench.stdout.close()


def test_bench_floor_measures_plain_writes() -> None:
    stdout = ok(run("bench_floor.py", "--conns", "20", "--group", "5", "--rate", "2000", "--seconds", "1"))
    assert "us CPU/write" in stdout


def test_a_short_soak_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    ok(run("soak.py", "--spawn", "--minutes", "0.2", "--out", str(out), timeout=180.0))
    result = json.loads(out.read_text())
    assert result["ok"] and result["errors"] == {} and result["loss"]["lost"] == 0
    assert result["messages"]["deliveries"] > 0 and result["connections"]["total"] > 0

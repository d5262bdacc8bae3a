"""bench.py --hosts N / --redis: the load on several garin hosts sharing one
Redis, beside the same load on one host without Redis.

Every host is a private `garin run` (server.SpawnedServer: its own port,
socket directory and work directory, one JWT secret for all), with
GARIN_REDIS_URL pointing at one private redis-server started here on a free
loopback port without persistence (`--save '' --appendonly no`) and stopped
by PID after. bench.py splits each room's members over the hosts and runs
the rounds; this module starts and stops what a run needs, and turns the
rounds into medians and the issue's two goals (a host's CPU per local
delivery within 1.5x of one host; p99 under 10 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garin_bench.options import ToolError
from garin_bench.server import ORIGIN, SpawnedServer, TokenMinter, free_port
from garin_bench.stats import median

SCHEMA = "garin-bench-hosts/1"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# The goals for the split load.
CPU_RATIO_GOAL = 1.5
P99_GOAL_MS = 10.0
REFERENCE = "1 host"


def setup_name(hosts: int) -> str:
    return f"{hosts} host{'s' if hosts > 1 else ''} + Redis"


@dataclass
class RedisProcess:
    """A throwaway redis-server on 127.0.0.1, no persistence, stopped by PID."""

    binary: str
    port: int = 0
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gbr-", dir="/tmp"))
        self.port = free_port()
        with open(self.workdir / "redis.log", "wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.workdir)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # Not in our process group: a Ctrl-C reaches us, and we stop it.
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None:
                raise ToolError(f"redis-server exited with code {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ToolError(f"redis-server did not answer PING within {READY_TIMEOUT_S:g}s: {self.log_tail()}")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        assert self.workdir is not None
        try:
            return " | ".join((self.workdir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a deadline; only our own child, by PID."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Hosts:
    """What a --hosts run talks to."""

    servers: list[SpawnedServer]
    redis: RedisProcess
    minter: TokenMinter
    origin: str = ORIGIN
    stop_codes: list[int | None] = field(default_factory=list)


def find_redis_server(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if "/" not in name and Path(p).exists()), None
    )
    if found is None:
        raise ToolError(f"{name} not found: install it (Debian: apt-get install redis-server) or pass --redis-server")
    return found


def check_python_has_redis_client(python: str) -> str | None:
    result = subprocess.run([python, "-c", "import coredis"], cwd="/", capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return "it cannot import coredis: install garin's redis extra (pip install '.[redis]' in garin's checkout)"
    return None


@contextlib.contextmanager
def open_hosts(args: argparse.Namespace, tool: str, token_ttl_s: float) -> Iterator[Hosts]:
    """A private redis-server and args.hosts `garin run` on it, ready; all
    stopped (by PID) and their files removed on the way out."""
    problem = check_python_has_redis_client(args.python)
    if problem:
        raise ToolError(f"{args.python}: {problem}; or pass --python")
    redis = RedisProcess(find_redis_server(args.redis_server))
    servers: list[SpawnedServer] = []
    try:
        redis.start()
        secret = None
        for _ in range(args.hosts):
            server = SpawnedServer(args.python, args.shards, args.routers, args.server_log_level,
                                   env_overrides={"GARIN_REDIS_URL": redis.url})
            if secret is None:
                secret = server.secret
            server.secret = secret  # one deployment: every host takes every token
            servers.append(server)
            server.start()
        assert secret is not None
        hosts = Hosts(servers, redis, TokenMinter(secret, token_ttl_s))
        t0 = time.monotonic()
        for server in servers:
            try:
                server.wait_ready(hosts.minter)
            except RuntimeError as exc:
                raise ToolError(str(exc)) from None
        pids = ", ".join(str(s.pid) for s in servers)
        print(f"{tool}: spawned {args.hosts} garin run (pids {pids}, {args.shards} shards and {args.routers} "
              f"router(s) each) on redis-server pid {redis.pid} port {redis.port}, ready in "
              f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield hosts
    finally:
        for server in servers:
            code = server.stop()
            if code not in (0, None):
                print(f"{tool}: a spawned host exited with code {code}:\n{server.log_tail()}",
                      file=sys.stderr)
            server.cleanup()
        redis.stop()
        redis.cleanup()


# -- the rounds in numbers ---------------------------------------------------


def numbers(result: dict[str, Any]) -> dict[str, float | None]:
    """One run's figures that the comparison takes medians of. For one host
    without Redis, its CPU per delivery is its CPU per local delivery."""
    server = result.get("server") or {}
    hosts = result.get("hosts") or {}
    redis = hosts.get("redis") or {}
    garin_us = server.get("cpu_us_per_delivery")
    total_us = None
    if garin_us is not None and redis.get("cpu_s") is not None and result["traffic"]["deliveries_per_s"]:
        duration = result["phases_s"]["window"]
        total_us = garin_us + redis["cpu_s"] * 1e6 / (result["traffic"]["deliveries_per_s"] * duration)
    return {
        "deliveries_per_s": result["traffic"]["deliveries_per_s"],
        "sent_per_s": result["traffic"]["sent_per_s"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "lost": result["traffic"]["lost"],
        "garin_cores": server.get("cpu_cores"),
        "garin_us_per_delivery": garin_us,
        "host_us_per_local_delivery": hosts.get("max_cpu_us_per_local_delivery", garin_us),
        "redis_cores": redis.get("cpu_cores"),
        "redis_us_per_message": redis.get("cpu_us_per_message"),
        "all_us_per_delivery": total_us if hosts else garin_us,
        "client_cores": result["client"]["cpu_cores_total"],
        "machine_busy_cores": result["machine"]["busy_cores"],
    }


def compare(runs: list[dict[str, Any]], hosts: int) -> dict[str, Any]:
    """Medians per setup over the rounds, and the issue's goals against them."""
    by_setup: dict[str, list[dict[str, float | None]]] = {}
    for run in runs:
        by_setup.setdefault(run["setup"], []).append(numbers(run["result"]))
    medians = {
        setup: {key: median(row[key] for row in rows) for key in rows[0]} | {"runs": len(rows)}
        for setup, rows in by_setup.items()
    }
    split = medians.get(setup_name(hosts), {})
    reference = medians.get(REFERENCE, {})
    summary: dict[str, Any] = {"medians": medians}
    ratio = None
    host_us, reference_us = split.get("host_us_per_local_delivery"), reference.get("garin_us_per_delivery")
    if host_us and reference_us:
        ratio = round(host_us / reference_us, 2)
    p99 = split.get("p99_ms")
    summary["goals"] = {
        "host_cpu_ratio": ratio,
        "host_cpu_ratio_goal": CPU_RATIO_GOAL,
        "host_cpu_met": None if ratio is None else ratio <= CPU_RATIO_GOAL,
        "p99_ms": p99,
        "p99_goal_ms": P99_GOAL_MS,
        "p99_met": None if p99 is None else p99 < P99_GOAL_MS,
    }
    return summary


COLUMNS = (
    ("runs", "runs"), ("deliveries_per_s", "deliveries/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
    ("lost", "lost"), ("garin_cores", "garin cores"), ("host_us_per_local_delivery", "host us/local delivery"),
    ("redis_cores", "Redis cores"), ("redis_us_per_message", "Redis us/message"),
    ("all_us_per_delivery", "all us/delivery"), ("client_cores", "client cores"),
    ("machine_busy_cores", "busy cores"),
)


def print_comparison(summary: dict[str, Any], rounds: int) -> None:
    print(f"medians of {rounds} interleaved round(s); host us/local delivery: the busiest host's CPU over the "
          "deliveries to its own members (one host: all of it)")
    print("| setup | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for setup, row in summary["medians"].items():
        cells = []
        for key, _ in COLUMNS:
            v = row.get(key)
            cells.append("-" if v is None else f"{v:,.0f}" if abs(v) >= 100 or key in ("runs", "lost") else f"{v:.2f}")
        print(f"| {setup} | " + " | ".join(cells) + " |")
    goals = summary["goals"]
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    ratio = "-" if goals["host_cpu_ratio"] is None else f"{goals['host_cpu_ratio']}x"
    print(f"goal: a host's CPU per local delivery <= {CPU_RATIO_GOAL}x one host's: {ratio}, "
          f"{verdict[goals['host_cpu_met']]}")
    print(f"goal: p99 < {P99_GOAL_MS:g} ms: {goals['p99_ms']} ms, {verdict[goals['p99_met']]}")

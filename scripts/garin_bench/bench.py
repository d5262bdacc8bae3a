"""garin benchmark: R rooms x M members, S senders per room, against a live server.

    python scripts/bench.py --spawn --rooms 10 --members 50 --senders 1 --interval 0.01
    python scripts/bench.py --url ws://127.0.0.1:8080/ --secret ... --server-pid PID

Theory of operation. The coordinator (this file, plain blocking Python) plans
who joins which room, mints one JWT per member, and starts --procs worker
processes (worker.py, trio + trio-websocket), each with its share of
the members. Then, all on one monotonic clock:

  connect  every member connects, authenticates and joins; the coordinator
           waits until all are in (or --connect-timeout), reading server RSS
           before and after
  warmup   senders send every --interval; deliveries are not counted
  window   --duration seconds: what is sent here is counted, and server CPU,
           worker CPU and machine CPU are read at both edges
  drain    senders are quiet; late deliveries of window messages still count
  close    workers close their connections; with --spawn the server gets SIGTERM

Loss = 1 - (deliveries of window messages) / (window messages x (room members - 1)).
Deliveries/s counts deliveries received during the window. Latency is
receive time - send time (the body carries it) for every delivery of a window
message. Results go to --out (JSON) and a PNG next to it.

Several hosts (--hosts N, --redis; hosts.py): each run spawns a private
redis-server and N `garin run` sharing it, and every room's members are
split over the hosts; --rounds alternate it with the same load on one host
without Redis, and the report adds each host's CPU per delivery to its own
members, Redis's CPU per message and the medians of the rounds.

The whole run is bounded: every wait has a deadline and an alarm ends the run
after --timeout seconds whatever happens. Traffic goes to loopback only unless
--allow-remote is given.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from garin_bench import hosts, worker
from garin_bench.worker import MemberSpec, Times, WorkerPlan
from garin_bench.report import (
    Run, Sample, build_result, print_summary, sleep_until, summarize_connect, write_outputs, fmt,
)
from garin_bench.options import ToolError, open_target, run_bounded, tool_parser
from garin_bench.server import TokenMinter, shard_for

WORKER_START_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
SETTLE_AFTER_JOIN_S = 0.5
# --floor opens this many loopback connections at most (two fds each).
FLOOR_MAX_CONNS = 5000


class BenchError(ToolError):
    """The run cannot go on; str() says why."""


# -- options ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser("bench.py", "Load generator and report for garin (or any GarinChat-protocol server).",
                    verb="load", routers=1, remote=True)

    load = p.add_argument_group("load")
    load.add_argument("--rooms", type=int, default=10, help="rooms, each with its own members")
    load.add_argument("--members", type=int, default=50, help="members per room (senders included)")
    load.add_argument("--senders", type=int, default=1, help="senders per room")
    load.add_argument("--interval", type=float, default=0.01, help="seconds between two messages of one sender")
    load.add_argument("--body-bytes", type=int, default=0,
                      help="pad message bodies to at least this many characters (unpadded: ~20)")
    load.add_argument("--procs", type=int, default=1, help="client worker processes the members are split over")
    load.add_argument("--client", choices=("trio-websocket", "lean"), default="trio-websocket",
                      help="client WebSocket implementation: trio-websocket (a real client library, ~35 us CPU "
                           "per received message) or lean (garin_bench/lean.py, a few us: use it to load the server "
                           "harder than trio-websocket can on a small machine)")
    load.add_argument("--connect-concurrency", type=int, default=100,
                      help="connections each worker opens at once")

    timing = p.add_argument_group("timing")
    timing.add_argument("--warmup", type=float, default=2.0, help="seconds of traffic before measuring")
    timing.add_argument("--duration", type=float, default=10.0, help="measured window, seconds")
    timing.add_argument("--drain", type=float, default=2.0, help="seconds after the window for late deliveries")
    timing.add_argument("--connect-timeout", type=float, default=30.0, help="budget for all members to join")
    timing.add_argument("--timeout", type=float, default=None,
                        help="hard limit for the whole run [default: connect-timeout + warmup + duration + drain + 60]")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="bench-results/bench.json", help="JSON result path (folders are created)")
    out.add_argument("--plot", default=None, help="PNG path [default: --out with .png]")
    out.add_argument("--no-plot", action="store_true")
    out.add_argument("--floor", type=float, default=0.0, metavar="SECONDS",
                     help="after the run, measure for SECONDS the write floor of this machine (scripts/bench_floor.py: "
                          "the same sockets and writes per second without a server) and report the server's "
                          "CPU per delivery as a multiple of it; 0: off")
    several = p.add_argument_group("several hosts (GARIN_REDIS_URL)")
    several.add_argument("--hosts", type=int, default=1,
                         help="--spawn: this many `garin run` hosts (each --shards and --routers) sharing one private "
                              "redis-server; each room's members are split over them, its first sender on host "
                              "room %% hosts. More than 1 implies --redis")
    several.add_argument("--redis", action="store_true",
                         help="--spawn: start a private redis-server on a free loopback port (no persistence) and give "
                              "the host(s) GARIN_REDIS_URL. The report adds each host's CPU per delivery to its own "
                              "members and Redis's CPU per message; --out holds every run (schema garin-bench-hosts/1), "
                              "no plot")
    several.add_argument("--rounds", type=int, default=1,
                         help="with --redis: rounds of the same load on one host without Redis (the reference) and "
                              "on the hosts through Redis, their order alternating; the report gives medians")
    several.add_argument("--no-reference", action="store_true", help="with --redis: skip the one-host reference runs")
    several.add_argument("--redis-server", default="redis-server", help="with --redis: the redis-server binary")
    args = p.parse_args(argv)

    def bad(message: str) -> None:
        p.error(message)

    if args.rooms < 1 or args.members < 1:
        bad("--rooms and --members must be at least 1")
    if not 0 <= args.senders <= args.members:
        bad("--senders must be between 0 and --members")
    if args.interval <= 0 or args.duration <= 0 or args.warmup < 0 or args.drain < 0:
        bad("--interval and --duration must be > 0; --warmup and --drain >= 0")
    if args.procs < 1 or args.procs > args.rooms * args.members:
        bad("--procs must be between 1 and rooms x members")
    if args.connect_concurrency < 1:
        bad("--connect-concurrency must be at least 1")
    if args.body_bytes < 0:
        bad("--body-bytes must be >= 0")
    if args.floor < 0:
        bad("--floor must be >= 0 (seconds; 0: off)")
    if args.spawn and args.server_pid is not None:
        bad("--spawn measures the server it starts; drop --server-pid")
    if args.hosts < 1 or args.rounds < 1:
        bad("--hosts and --rounds must be at least 1")
    if args.hosts > 1:
        args.redis = True  # several hosts share rooms only through Redis
    if args.redis and not args.spawn:
        bad("--hosts and --redis start their own hosts and Redis: add --spawn")
    if args.redis and args.floor:
        bad("--floor measures one server's write floor; run it without --hosts/--redis")
    if (args.rounds > 1 or args.no_reference) and not args.redis:
        bad("--rounds and --no-reference go with --hosts or --redis")
    if args.redis:
        args.no_plot = True  # the result holds every run of every round
    if args.timeout is None:
        args.timeout = args.connect_timeout + args.warmup + args.duration + args.drain + 60.0
    if args.plot is None:
        args.plot = os.path.splitext(args.out)[0] + ".png"
    return args


# -- the plan ---------------------------------------------------------------


def balanced_rooms(run_id: str, count: int, shards: int) -> list[str]:
    """Room names whose shards take turns (room r on shard r % shards), so
    that every shard carries an equal share of the load."""
    rooms = []
    for r in range(count):
        salt = 0
        while shard_for(name := f"bench-{run_id}-{r}-{salt}", shards) != r % shards:
            salt += 1
        rooms.append(name)
    return rooms


def make_plans(args: argparse.Namespace, url: str, origin: str, minter: TokenMinter, run_id: str,
               hard_deadline: float, host_urls: list[str] | None = None) -> tuple[list[WorkerPlan], list[str]]:
    """Members go round-robin over the workers, so every room's fan-out is
    shared by all of them. With `host_urls`, member i of room r connects to
    host (r + i) % hosts: every room is split evenly, and the first sender of
    room r is on host r % hosts."""
    shares: list[list[MemberSpec]] = [[] for _ in range(args.procs)]
    rooms = balanced_rooms(run_id, args.rooms, args.shards if args.spawn else 1)
    n = 0
    for r, room in enumerate(rooms):
        for i in range(args.members):
            username = f"u{r}-{i}"
            sender = r * args.senders + i if i < args.senders else -1
            host = (r + i) % len(host_urls) if host_urls else 0
            member_url = host_urls[host] if host_urls else ""
            shares[n % args.procs].append(MemberSpec(r, room, username, minter(username), sender, host, member_url))
            n += 1
    plans = [
        WorkerPlan(
            index=k, url=url, origin=origin, members=tuple(share), interval_s=args.interval,
            body_pad=args.body_bytes, connect_concurrency=args.connect_concurrency,
            connect_timeout_s=args.connect_timeout, close_timeout_s=CLOSE_TIMEOUT_S,
            hard_deadline=hard_deadline, client=args.client,
        )
        for k, share in enumerate(shares)
    ]
    return plans, rooms


# -- workers ----------------------------------------------------------------


@dataclass
class WorkerHandle:
    index: int
    process: Any
    conn: multiprocessing.connection.Connection


def start_workers(plans: list[WorkerPlan]) -> list[WorkerHandle]:
    # spawn, not fork: each worker is a clean interpreter with its own trio loop.
    ctx = multiprocessing.get_context("spawn")
    handles = []
    for plan in plans:
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=worker.worker_main, args=(plan, child), name=f"bench-worker-{plan.index}", daemon=True
        )
        process.start()
        child.close()
        handles.append(WorkerHandle(plan.index, process, parent))
    return handles


def gather(handles: list[WorkerHandle], expect: str, timeout: float) -> list[Any]:
    """One `expect` message from every worker, or BenchError."""
    deadline = time.monotonic() + timeout
    answers: list[Any] = [None] * len(handles)
    pending = {h.conn: h for h in handles}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(str(h.index) for h in pending.values())
            raise BenchError(f"worker(s) {names} did not report {expect!r} within {timeout:.0f}s")
        for ready in multiprocessing.connection.wait(list(pending), timeout=min(remaining, 1.0)):
            handle = pending.pop(ready)  # type: ignore[call-overload]
            try:
                kind, body = handle.conn.recv()
            except (EOFError, OSError):
                handle.process.join(1)
                raise BenchError(f"worker {handle.index} died (exit code {handle.process.exitcode})") from None
            if kind == "error":
                raise BenchError(f"worker {handle.index} failed:\n{body}")
            if kind != expect:
                raise BenchError(f"worker {handle.index} said {kind!r}, expected {expect!r}")
            answers[handle.index] = body
    return answers


def broadcast(handles: list[WorkerHandle], message: Any) -> None:
    for handle in handles:
        try:
            handle.conn.send(message)
        except (OSError, ValueError):
            pass


def stop_workers(handles: list[WorkerHandle], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for handle in handles:
        handle.process.join(max(0.0, deadline - time.monotonic()))
    for handle in handles:
        if handle.process.is_alive():
            handle.process.terminate()
            handle.process.join(2)
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join(2)
        handle.conn.close()


# -- the run ----------------------------------------------------------------


def run_bench(run: Run, minter: TokenMinter, hard_deadline: float) -> dict[str, Any]:
    args = run.args
    run_id = secrets.token_hex(3)
    connections = args.rooms * args.members
    host_urls = [host.url for host in run.hosts]
    plans, rooms = make_plans(args, run.url, run.origin, minter, run_id, hard_deadline, host_urls)
    run.host_members = [sum(1 for plan in plans for m in plan.members if m.host == k) for k in range(len(host_urls))]
    where = f"{len(host_urls)} hosts ({', '.join(host_urls)})" if len(host_urls) > 1 else run.url
    print(f"bench: {connections} members over {args.procs} worker process(es) -> {where}", file=sys.stderr)
    handles = start_workers(plans)
    graceful = False
    try:
        result = _drive(run, handles, rooms)
        graceful = True
        return result
    finally:
        # After a failure or the hard timeout, workers are terminated at once.
        broadcast(handles, ("close",))
        stop_workers(handles, CLOSE_TIMEOUT_S + 3 if graceful else 0.5)


def _drive(run: Run, handles: list[WorkerHandle], rooms: list[str]) -> dict[str, Any]:
    args = run.args
    connections = args.rooms * args.members
    gather(handles, "ready", WORKER_START_TIMEOUT_S)
    cpu_self0 = os.times()

    before = run.sample()
    t_connect = time.monotonic() + 0.2
    broadcast(handles, ("connect", t_connect))
    joins = gather(handles, "joined", args.connect_timeout + 15)
    time.sleep(SETTLE_AFTER_JOIN_S)
    after_join = run.sample()
    connect = summarize_connect(joins, t_connect, connections)
    print(
        f"bench: {connect['joined']}/{connections} joined in {fmt(connect['all_joined_s'], 's')} "
        f"({fmt(connect['joins_per_s'])}/s), {connect['errors']} errors",
        file=sys.stderr,
    )
    if connect["errors"]:
        run.warn(f"{connect['errors']} of {connections} members did not join: {connect['errors_by_kind']}")
    if connect["joined"] == 0:
        raise BenchError(f"no member could join: {connect['errors_by_kind']}")

    start = time.monotonic() + 0.3
    window_start = start + args.warmup
    window_end = window_start + args.duration
    # Whole seconds, so that the per-second timeline ends on the last sample.
    drain_end = start + math.ceil(args.warmup + args.duration + args.drain)
    times = Times(start, window_start, window_end, drain_end)
    broadcast(handles, ("go", times))
    print(
        f"bench: traffic for {args.warmup:g}s warmup + {args.duration:g}s window + "
        f"{drain_end - window_end:.1f}s drain",
        file=sys.stderr,
    )
    samples: dict[float, Sample] = {}
    for mark in worker.sample_marks(times):
        sleep_until(mark)
        samples[mark] = run.sample()
        for spawned in run.servers():
            if spawned.process is not None and spawned.process.poll() is not None:
                raise BenchError(f"the spawned server exited during the run:\n{spawned.log_tail()}")
    results = gather(handles, "result", 15)
    end = run.sample()
    for spawned in run.servers():
        problems = spawned.log_problems()
        if problems:
            run.warn(f"the spawned server logged {len(problems)} warning/error line(s), e.g. {problems[0]!r}")
            run.notes.extend(f"server log: {line}" for line in problems[:10])
    cpu_self1 = os.times()
    coordinator_cpu = (cpu_self1.user + cpu_self1.system) - (cpu_self0.user + cpu_self0.system)
    return build_result(run, rooms, connect, joins, results, times, samples, before, after_join, end, coordinator_cpu)


def add_floor(result: dict[str, Any], members: int, body_bytes: int, seconds: float) -> None:
    """The write floor for this run's load, measured now, and the server against it.

    The host's load moves CPU figures by tens of percent within minutes; a
    floor measured right after the run says how busy the host was then (it
    explains part of that noise, not all of it: README, Performance)."""
    from garin_bench import floor as write_floor

    rate = result["traffic"]["deliveries_per_s"]
    if not rate:
        result["notes"].append("--floor: nothing was delivered, so there is no load to measure a floor for")
        return
    conns = min(result["connect"]["connections"], FLOOR_MAX_CONNS)
    group = max(1, min(members - 1, conns))
    # About the size of the frames delivered: ~70 bytes with ~20 of body.
    frame = write_floor.text_frame(len(write_floor.FRAME) + max(0, body_bytes - 20))
    print(f"bench: measuring the write floor for {seconds:g}s ({conns} sockets, {rate:,.0f} writes/s)", file=sys.stderr)
    try:
        floor = write_floor.measure(conns, group, rate, seconds, frame)
    except Exception as exc:  # the run's own result still counts
        result["notes"].append(f"--floor: not measured ({type(exc).__name__}: {exc})")
        return
    server = result.get("server")
    if server and server.get("cpu_us_per_delivery"):
        floor["server_ratio"] = round(server["cpu_us_per_delivery"] / floor["us_per_write"], 2)
    result["floor"] = floor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redis:
        runs = len(hosts_order(args))
        return run_bounded("bench", args.timeout * runs, 1, lambda: _bench_hosts(args))
    return run_bounded("bench", args.timeout, 1, lambda: _bench(args))


def _bench(args: argparse.Namespace) -> int:
    run = Run(args, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    hard_deadline = time.monotonic() + args.timeout
    with open_target(args, "bench", args.token_ttl) as target:
        run.url, run.origin, run.server_pid, run.spawned = target.url, target.origin, target.server_pid, target.spawned
        result = run_bench(run, target.minter, hard_deadline)
        signal.alarm(0)
        if args.floor > 0:
            add_floor(result, args.members, args.body_bytes, args.floor)
        print_summary(result)
        write_outputs(result, args)
    return 0


def hosts_order(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(round, setup) in the order they run: the reference and the hosts
    take turns going first, so that both meet the machine's drift alike."""
    split = hosts.setup_name(args.hosts)
    order = []
    for k in range(1, args.rounds + 1):
        pair = [split] if args.no_reference else [hosts.REFERENCE, split]
        order += [(k, setup) for setup in (pair if k % 2 else pair[::-1])]
    return order


def _bench_hosts(args: argparse.Namespace) -> int:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    for k, setup in hosts_order(args):
        print(f"bench: round {k}/{args.rounds}: {setup}", file=sys.stderr)
        run = Run(args, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        hard_deadline = time.monotonic() + args.timeout
        if setup == hosts.REFERENCE:
            with open_target(args, "bench", args.token_ttl) as target:
                run.url, run.origin, run.server_pid, run.spawned = (
                    target.url, target.origin, target.server_pid, target.spawned)
                result = run_bench(run, target.minter, hard_deadline)
        else:
            with hosts.open_hosts(args, "bench", args.token_ttl) as spawned:
                first = spawned.servers[0]
                run.url, run.origin, run.server_pid, run.spawned = first.url, spawned.origin, first.pid, first
                run.hosts, run.redis_pid = spawned.servers, spawned.redis.pid
                result = run_bench(run, spawned.minter, hard_deadline)
        print(f"== round {k}: {setup}")
        print_summary(result)
        runs.append({"round": k, "setup": setup, "result": result})
    signal.alarm(0)
    summary = hosts.compare(runs, args.hosts)
    print(f"== garin bench: {args.rooms} rooms x {args.members} members, {hosts.setup_name(args.hosts)}")
    hosts.print_comparison(summary, args.rounds)
    config: dict[str, Any] = {"reference": not args.no_reference} | {key: vars(args)[key] for key in (
        "hosts", "rounds", "shards", "routers", "rooms", "members", "senders", "interval",
        "body_bytes", "procs", "client", "warmup", "duration", "drain",
    )}
    write_outputs({
        "schema": hosts.SCHEMA, "started_at": started_at, "config": config,
        "summary": summary,
        "warnings": [f"round {r['round']}, {r['setup']}: {w}" for r in runs for w in r["result"]["warnings"]],
        "runs": runs,
    }, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

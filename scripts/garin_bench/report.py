"""Turning the workers' raw counts and /proc samples into the result.

`build_result` is the one place that decides what the numbers mean: loss is
counted per room against the members that really joined, deliveries/s by
receive time inside the window, latency over every delivery of a message sent
in the window, CPU as differences of samples taken at the window's edges. It
also raises the warnings (a saturated client or machine, loss, disconnects,
senders behind schedule), because whether a number can be trusted belongs
next to the number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from garin_bench import procfs, stats
from garin_bench.worker import Times
from garin_bench.server import SpawnedServer, shard_for

SCHEMA = "garin-bench/1"
QUANTILES = (0.5, 0.9, 0.99, 0.999)
# A worker above this share of one core is the bottleneck, not the server.
CLIENT_SATURATED_SHARE = 0.90
MACHINE_BUSY_SHARE = 0.90


@dataclass
class Run:
    args: argparse.Namespace
    started_at: str
    url: str = ""
    origin: str = ""
    server_pid: int | None = None
    spawned: SpawnedServer | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # bench.py --hosts/--redis: every host's `garin run` (the first is also
    # `spawned`), how many members each has, and the private redis-server.
    hosts: list[SpawnedServer] = field(default_factory=list)
    host_members: list[int] = field(default_factory=list)
    redis_pid: int | None = None

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def sample(self) -> Sample:
        return take_sample(self.server_pid, [host.pid for host in self.hosts], self.redis_pid)

    def servers(self) -> list[SpawnedServer]:
        """The garin processes this run spawned (none for --url)."""
        return self.hosts or ([self.spawned] if self.spawned is not None else [])


# -- sampling ---------------------------------------------------------------


@dataclass
class Sample:
    t: float
    tree: procfs.TreeSample | None
    machine: tuple[int, int]
    hosts: list[procfs.TreeSample] = field(default_factory=list)
    redis: procfs.TreeSample | None = None


def take_sample(server_pid: int | None, host_pids: list[int] | None = None, redis_pid: int | None = None) -> Sample:
    """The server's tree (with several hosts: all of them as one, and each
    alone), Redis's process, and the machine."""
    hosts = [procfs.sample_tree(pid) for pid in host_pids or ()]
    if hosts:
        tree: procfs.TreeSample | None = procfs.merged_samples(hosts)
    else:
        tree = procfs.sample_tree(server_pid) if server_pid is not None else None
    redis = procfs.sample_tree(redis_pid) if redis_pid is not None else None
    return Sample(time.monotonic(), tree, procfs.machine_ticks(), hosts, redis)


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- results ----------------------------------------------------------------


def summarize_connect(joins: list[dict[str, Any]], t_connect: float, connections: int) -> dict[str, Any]:
    joined = sum(j["joined"] for j in joins)
    errors: dict[str, int] = {}
    for j in joins:
        for kind, n in j["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    last = max((j["last_joined"] for j in joins if j["last_joined"] is not None), default=None)
    all_joined_s = round(last - t_connect, 3) if last is not None else None
    connect_ms = [v for j in joins for v in j["connect_ms"]]
    join_ms = [v for j in joins for v in j["join_ms"]]
    total_ms = [a + b for j in joins for a, b in zip(j["connect_ms"], j["join_ms"])]
    cpu_share = [round(j["cpu_s"] / j["wall_s"], 3) if j["wall_s"] > 0 else None for j in joins]
    return {
        "connections": connections,
        "joined": joined,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "all_joined_s": all_joined_s,
        "joins_per_s": round(joined / all_joined_s, 1) if all_joined_s else None,
        "handshake_ms": stats.exact_percentiles_ms(connect_ms, (0.5, 0.99, 1.0)),
        "auth_join_ms": stats.exact_percentiles_ms(join_ms, (0.5, 0.99, 1.0)),
        "total_ms": stats.exact_percentiles_ms(total_ms, (0.5, 0.99, 1.0)),
        "client_cpu_share_per_proc": cpu_share,
    }


def _merge_counts(tables: list[dict[Any, int]]) -> dict[Any, int]:
    total: dict[Any, int] = {}
    for table in tables:
        for key, n in table.items():
            total[key] = total.get(key, 0) + n
    return total


def build_result(
    run: Run,
    rooms: list[str],
    connect: dict[str, Any],
    joins: list[dict[str, Any]],
    results: list[dict[str, Any]],
    times: Times,
    samples: dict[float, Sample],
    before: Sample,
    after_join: Sample,
    end: Sample,
    coordinator_cpu_s: float,
) -> dict[str, Any]:
    args = run.args
    duration = times.window_end - times.window_start
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    # traffic and loss
    joined_by_room = _merge_counts([j["joined_by_room"] for j in joins])
    sent_window: dict[int, int] = {}
    sent_total = 0
    for r in results:
        for room, counts in r["sent_by_room"].items():
            sent_window[room] = sent_window.get(room, 0) + counts[1]
            sent_total += sum(counts)
    received_by_room = _merge_counts([r["received_by_room"] for r in results])
    expected_by_room = {room: n * max(0, joined_by_room.get(room, 0) - 1) for room, n in sent_window.items()}
    expected = sum(expected_by_room.values())
    received = sum(received_by_room.values())
    lossy_rooms = sorted(
        room for room, n in expected_by_room.items() if received_by_room.get(room, 0) < n
    )
    in_window = sum(r["received_in_window"] for r in results)
    window_sent = sum(sent_window.values())
    target_rate = args.rooms * args.senders / args.interval
    skipped = sum(r["skipped_sends"] for r in results)
    max_lag_ms = round(max(r["send_max_lag_s"] for r in results) * 1000, 3)
    traffic = {
        "target_send_per_s": round(target_rate, 1),
        "sent_per_s": round(window_sent / duration, 1),
        "sent_window": window_sent,
        "sent_total": sent_total,
        "expected_deliveries": expected,
        "delivered": received,
        "lost": max(0, expected - received),
        "loss_ratio": round(1 - received / expected, 6) if expected else None,
        "rooms_with_loss": [rooms[r] for r in lossy_rooms][:20],
        "deliveries_per_s": round(in_window / duration, 1),
        "duplicates": sum(r["duplicates"] for r in results),
        "unparsed_bodies": sum(r["foreign"] for r in results),
        "bad_frames": sum(r["bad_frames"] for r in results),
        "sender_max_lag_ms": max_lag_ms,
        "skipped_sends": skipped,
        "other_events": _merge_counts([r["events"] for r in results]),
        "disconnects": _merge_counts([r["disconnects"] for r in results]),
        "late_joins": sum(r["late_joins"] for r in results),
    }

    # latency of window messages
    hist = stats.merged(r["window_hist"] for r in results)
    count = sum(hist.values())
    max_us = max(r["window_max_us"] for r in results)
    latency = stats.percentiles_ms(hist, QUANTILES, max_us)
    latency["max"] = round(max_us / 1000, 3) if count else None
    latency["mean"] = round(sum(r["window_sum_us"] for r in results) / count / 1000, 3) if count else None
    latency["count"] = count

    # CPU: server tree, workers, machine
    w0, w1 = samples[times.window_start], samples[times.window_end]
    worker_cpu = []
    for r in results:
        cpu = dict(r["cpu_samples"])
        worker_cpu.append(round((cpu[times.window_end] - cpu[times.window_start]) / duration, 3))
    busy = (w1.machine[0] - w0.machine[0]) / max(1, w1.machine[1] - w0.machine[1])
    client = {
        "procs": args.procs, "impl": args.client,
        "cpu_share_per_proc": worker_cpu,
        "max_proc_cpu_share": max(worker_cpu),
        "cpu_cores_total": round(sum(worker_cpu), 3),
        "saturated": max(worker_cpu) > CLIENT_SATURATED_SHARE,
        "coordinator_cpu_s": round(coordinator_cpu_s, 3),
    }
    machine = {
        "cpus": cpus,
        "busy_fraction": round(busy, 3),
        "busy_cores": round(busy * cpus, 3),
        "loadavg_end": list(os.getloadavg()),
    }
    server: dict[str, Any] | None = None
    if run.server_pid is not None and w0.tree is not None and w1.tree is not None:
        cpu_s = w1.tree.cpu_s - w0.tree.cpu_s
        per_process = []
        for pid in w1.tree.pids:
            if pid in w0.tree.per_pid_cpu_s:
                delta = w1.tree.per_pid_cpu_s[pid] - w0.tree.per_pid_cpu_s[pid]
                per_process.append({
                    "pid": pid, "name": procfs.process_name(pid),
                    "cpu_cores": round(delta / duration, 3),
                })
        joined = connect["joined"]
        rss_before = before.tree.rss_kib if before.tree else None
        rss_join = after_join.tree.rss_kib if after_join.tree else None
        server = {
            "pid": run.server_pid,
            "spawned": run.spawned is not None,
            "processes": len(w1.tree.pids),
            "cpu_s": round(cpu_s, 3),
            "cpu_cores": round(cpu_s / duration, 3),
            "cpu_us_per_delivery": round(cpu_s * 1e6 / in_window, 3) if in_window else None,
            "per_process": per_process,
            "rss_before_connect_kib": rss_before,
            "rss_after_join_kib": rss_join,
            "rss_end_kib": end.tree.rss_kib if end.tree else None,
            "rss_per_connection_kib": (
                round((rss_join - rss_before) / joined, 2) if rss_before is not None and rss_join is not None and joined else None
            ),
        }
        if cpu_s < 50 / procfs.CLK_TCK:
            run.notes.append(
                f"the server used only {cpu_s:.2f}s CPU in the window and /proc counts in "
                f"{1000 / procfs.CLK_TCK:g} ms ticks: CPU per delivery is coarse; measure longer or harder"
            )
        if set(w0.tree.pids) != set(w1.tree.pids):
            run.warn(
                f"the server's processes changed during the window ({sorted(w0.tree.pids)} -> "
                f"{sorted(w1.tree.pids)}): a child died or was restarted; its CPU is not all counted"
            )
    elif run.server_pid is None:
        run.notes.append("no --server-pid: server CPU and memory were not measured")

    timeline = build_timeline(results, times, samples, run.server_pid is not None, cpus, args)

    # warnings
    for k, share in enumerate(worker_cpu):
        if share > CLIENT_SATURATED_SHARE:
            run.warn(
                f"CLIENT SATURATED: worker {k} used {share:.0%} of a CPU core during the window; "
                "these numbers measure the benchmark client, not the server "
                f"(try --procs {args.procs + 1} or less load)"
            )
    if busy > MACHINE_BUSY_SHARE:
        run.warn(
            f"MACHINE SATURATED: all {cpus} CPUs were {busy:.0%} busy during the window; "
            "server and client competed for CPU, so neither number is a clean limit"
        )
    if traffic["lost"]:
        run.warn(f"{traffic['lost']} of {expected} expected deliveries did not arrive by the end of the drain")
    if traffic["duplicates"]:
        run.warn(f"{traffic['duplicates']} duplicate or out-of-order deliveries")
    if traffic["disconnects"]:
        hint = ""
        if any("rate limit" in kind for kind in traffic["disconnects"]):
            hint = " (the server's rate limit: run it with GARIN_RATE_LIMIT_COUNT=0, or send less often)"
        run.warn(f"members were disconnected during the run: {traffic['disconnects']}{hint}")
    if args.senders and not window_sent:
        run.warn("no message was sent in the measured window")
    if skipped or max_lag_ms > args.interval * 1000:
        run.warn(
            f"senders fell behind their schedule (max lag {max_lag_ms} ms, {skipped} sends skipped): "
            f"sent {traffic['sent_per_s']}/s of {traffic['target_send_per_s']}/s wanted"
        )
    hosts = hosts_section(run, results, w0, w1, duration, window_sent) if run.hosts else None
    shard_rooms = None
    if run.spawned is not None:
        counts = [0] * run.spawned.shards
        for room in rooms:
            counts[shard_for(room, run.spawned.shards)] += 1
        shard_rooms = counts
        if len(counts) > 1 and max(counts) > 1.5 * (len(rooms) / len(counts)):
            run.notes.append(f"rooms per shard were uneven: {counts}")

    config: dict[str, Any] = {
        "url": run.url, "origin": run.origin, "spawn": args.spawn,
        "shards": args.shards if args.spawn else None, "routers": args.routers if args.spawn else None,
        "rooms": args.rooms, "members": args.members, "senders": args.senders,
        "interval_s": args.interval, "body_bytes": args.body_bytes, "procs": args.procs, "client": args.client,
        "warmup_s": args.warmup, "duration_s": args.duration, "drain_s": round(times.drain_end - times.window_end, 3),
        "connect_concurrency": args.connect_concurrency,
    }
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": run.started_at,
        "config": config,
        "phases_s": {"warmup": args.warmup, "window": duration, "drain": round(times.drain_end - times.window_end, 3)},
        "connect": connect,
        "traffic": traffic,
        "latency_ms": latency,
        "server": server,
        "rooms_per_shard": shard_rooms,
        "client": client,
        "machine": machine,
        "timeline": timeline,
        "warnings": run.warnings,
        "notes": run.notes,
    }
    if hosts is not None:  # only then: a plain run's result keeps its shape
        config["hosts"] = len(run.hosts)
        config["redis"] = run.redis_pid is not None
        result["hosts"] = hosts
    return result


def hosts_section(
    run: Run, results: list[dict[str, Any]], w0: Sample, w1: Sample, duration: float, window_sent: int
) -> dict[str, Any]:
    """Each host's CPU against the deliveries to its own members, and Redis's
    CPU against the messages published (one PUBLISH per chat message)."""
    local = _merge_counts([r["received_in_window_by_host"] for r in results])
    per_host: list[dict[str, Any]] = []
    for k, (host, a, b) in enumerate(zip(run.hosts, w0.hosts, w1.hosts)):
        cpu_s = b.cpu_s - a.cpu_s
        delivered = local.get(k, 0)
        per_host.append({
            "host": k, "pid": host.pid, "url": host.url,
            "members": run.host_members[k] if k < len(run.host_members) else None,
            "cpu_s": round(cpu_s, 3),
            "cpu_cores": round(cpu_s / duration, 3),
            "local_deliveries_per_s": round(delivered / duration, 1),
            "cpu_us_per_local_delivery": round(cpu_s * 1e6 / delivered, 3) if delivered else None,
        })
    redis = None
    if run.redis_pid is not None and w0.redis is not None and w1.redis is not None:
        cpu_s = w1.redis.cpu_s - w0.redis.cpu_s
        redis = {
            "pid": run.redis_pid,
            "cpu_s": round(cpu_s, 3),
            "cpu_cores": round(cpu_s / duration, 3),
            "messages_published": window_sent,
            "cpu_us_per_message": round(cpu_s * 1e6 / window_sent, 3) if window_sent else None,
        }
        if w1.redis.pids != w0.redis.pids:
            run.warn("redis-server exited or restarted during the window: its CPU is not all counted")
    per_delivery = [h["cpu_us_per_local_delivery"] for h in per_host if h["cpu_us_per_local_delivery"] is not None]
    return {
        "count": len(run.hosts),
        "per_host": per_host,
        "max_cpu_us_per_local_delivery": max(per_delivery, default=None),
        "redis": redis,
    }


def build_timeline(
    results: list[dict[str, Any]], times: Times, samples: dict[float, Sample], with_server: bool,
    cpus: int, args: argparse.Namespace,
) -> list[dict[str, Any]]:
    seconds = round(times.drain_end - times.start)
    worker_cpu = [dict(r["cpu_samples"]) for r in results]
    rows = []
    for s in range(seconds):
        a, b = times.start + s, times.start + s + 1
        hist = stats.merged(r["second_hist"].get(s, {}) for r in results)
        max_us = max((r["second_max_us"].get(s, -1) for r in results), default=-1)
        pct = stats.percentiles_ms(hist, (0.5, 0.9, 0.99), max_us if max_us >= 0 else None)
        sa, sb = samples.get(a), samples.get(b)
        server_cores = machine_cores = client_cores = None
        if sa is not None and sb is not None:
            dt = sb.t - sa.t
            if with_server and sa.tree is not None and sb.tree is not None and dt > 0:
                server_cores = round((sb.tree.cpu_s - sa.tree.cpu_s) / dt, 3)
            total = sb.machine[1] - sa.machine[1]
            if total > 0:
                machine_cores = round((sb.machine[0] - sa.machine[0]) / total * cpus, 3)
        if all(a in c and b in c for c in worker_cpu):
            client_cores = round(sum(c[b] - c[a] for c in worker_cpu), 3)
        phase = "warmup" if b <= times.window_start + 1e-9 else "drain" if a >= times.window_end - 1e-9 else "window"
        rows.append({
            "t_s": s,
            "phase": phase,
            "sent": sum(r["sent_per_second"].get(s, 0) for r in results),
            "deliveries": sum(hist.values()),
            "p50_ms": pct["p50"], "p90_ms": pct["p90"], "p99_ms": pct["p99"],
            "max_ms": round(max_us / 1000, 3) if max_us >= 0 else None,
            "server_cpu_cores": server_cores,
            "client_cpu_cores": client_cores,
            "machine_busy_cores": machine_cores,
        })
    return rows


# -- output -----------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:,}{unit}" if isinstance(value, (int, float)) else f"{value}{unit}"


def print_summary(result: dict[str, Any]) -> None:
    c, t, lat, srv, cl, m = (result[k] for k in ("connect", "traffic", "latency_ms", "server", "client", "machine"))
    cfg = result["config"]
    lines = [
        f"garin bench  {cfg['rooms']} rooms x {cfg['members']} members, {cfg['senders']} sender(s)/room every "
        f"{cfg['interval_s']:g}s, {cfg['procs']} {cfg.get('client', 'trio-websocket')} client proc(s), window {cfg['duration_s']:g}s",
        f"  connect    {c['joined']}/{c['connections']} joined in {fmt(c['all_joined_s'], 's')} "
        f"({fmt(c['joins_per_s'])}/s), errors {c['errors']}, per member p50 {fmt(c['total_ms']['p50'], ' ms')} "
        f"p99 {fmt(c['total_ms']['p99'], ' ms')}",
        f"  traffic    sent {t['sent_per_s']:,}/s (wanted {t['target_send_per_s']:,}/s), "
        f"deliveries {t['deliveries_per_s']:,}/s, loss {t['lost']}/{t['expected_deliveries']}"
        + (f" ({t['loss_ratio']:.4%})" if t["loss_ratio"] is not None else ""),
        f"  latency    p50 {fmt(lat['p50'], ' ms')}  p90 {fmt(lat['p90'], ' ms')}  p99 {fmt(lat['p99'], ' ms')}  "
        f"p99.9 {fmt(lat['p999'], ' ms')}  max {fmt(lat['max'], ' ms')}  ({lat['count']:,} deliveries)",
    ]
    if srv is not None:
        lines.append(
            f"  server     {srv['cpu_cores']} cores, {fmt(srv['cpu_us_per_delivery'], ' us')} CPU/delivery, "
            f"RSS {fmt(srv['rss_before_connect_kib'])} -> {fmt(srv['rss_after_join_kib'])} KiB "
            f"({fmt(srv['rss_per_connection_kib'])} KiB/connection)"
        )
        busiest = sorted(srv["per_process"], key=lambda p: -p["cpu_cores"])[:4]
        lines.append("             cores: " + ", ".join(f"{p['name']} {p['cpu_cores']}" for p in busiest))
    hosts = result.get("hosts")
    if hosts is not None:
        lines.append("  hosts      " + "; ".join(
            f"host {h['host']} {h['cpu_cores']} cores, {fmt(h['cpu_us_per_local_delivery'], ' us')} CPU/local "
            f"delivery ({h['local_deliveries_per_s']:,}/s)" for h in hosts["per_host"]
        ))
        redis = hosts["redis"]
        if redis is not None:
            lines.append(
                f"  redis      {redis['cpu_cores']} cores, {fmt(redis['cpu_us_per_message'], ' us')} CPU/message "
                f"({redis['messages_published']:,} published in the window)"
            )
    lines.append(
        f"  client     {cl['cpu_cores_total']} cores; per proc {cl['cpu_share_per_proc']} of a core"
        + ("  <-- SATURATED" if cl["saturated"] else "")
    )
    lines.append(f"  machine    {m['busy_cores']} of {m['cpus']} cores busy in the window")
    floor = result.get("floor")
    if floor is not None:
        lines.append(
            f"  floor      {floor['us_per_write']} us CPU/write, the same writes without a server, measured after "
            f"the run" + (f": the server used {floor['server_ratio']}x that per delivery" if "server_ratio" in floor else "")
        )
    print("\n".join(lines))
    for note in result["notes"]:
        print(f"  note: {note}")
    if result["warnings"]:
        bar = "!" * 78
        print(bar, file=sys.stderr)
        for warning in result["warnings"]:
            print(f"WARNING: {warning}", file=sys.stderr)
        print(bar, file=sys.stderr)


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    if args.no_plot:
        return
    from garin_bench import plot

    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    skipped = plot.plot(result, args.plot)
    if skipped is None:
        print(f"wrote {args.plot}")
    else:
        print(f"plot skipped: {skipped}")

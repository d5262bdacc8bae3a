"""The soak's result: the JSON (schema garin-soak/1, the same fields as
before the soak became a package, so old results compare), the summary
printed for people, and the spawned server's log read for errors.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from garin_bench.server import SpawnedServer
from garin_bench.soak.analysis import analyse_events, analyse_loss
from garin_bench.soak.run import Soak
from garin_bench.stats import percentile

SCHEMA = "garin-soak/1"


EXCEPTION_LINE = re.compile(r"^[\s|]*((?:\w+\.)*\w*(?:Error|Exception|Exit)\w*: .*)$")


def check_server_log(soak: Soak, spawned: SpawnedServer) -> None:
    """A spawned server's log: errors, tracebacks (by their exception line) and child exits are errors."""
    try:
        lines = spawned.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if line.startswith("Traceback") or line.startswith("  + Exception Group Traceback"):
            soak.ledger.error("server logged a traceback")
        elif (match := EXCEPTION_LINE.match(line)) and len(soak.ledger.error_examples["server logged a traceback"]) < 5:
            soak.ledger.error_examples["server logged a traceback"].append(match.group(1)[:200])
        elif " ERROR " in line:
            soak.ledger.error("server logged an error", line[:200])
        elif " exited with code " in line:
            soak.ledger.error("server child process exited (the supervisor restarted it)", line[:200])
        elif " WARNING " in line:
            soak.ledger.warnings.append(f"server log: {line[:200]}")


def build_result(soak: Soak, server: dict[str, Any], started_at: str) -> dict[str, Any]:
    args = soak.plan.args
    loss = analyse_loss(soak.plan, soak.ledger)
    if loss["lost"]:
        soak.ledger.error("lost messages", loss["examples"][0] if loss["examples"] else None, loss["lost"])
    events = analyse_events(soak.plan, soak.ledger)
    processes = soak.watch.analyse_processes()
    lat = sorted(soak.ledger.latencies)
    for role, row in processes.items():
        rss = row["rss_kib"]
        slope, late = rss["slope_per_min_after_warmup"], rss["slope_per_min_last_half"]
        grew = rss["end"] - rss["start"]
        if slope is not None and late is not None and min(slope, late) > 1024 and grew > 4096:
            soak.ledger.warnings.append(
                f"{role}: RSS grew {grew / 1024:.1f} MiB and still climbs ({slope / 1024:.2f} MiB/min after "
                f"warmup, {late / 1024:.2f} MiB/min over the last half): a leak, or a run too short to level off"
            )
    if soak.spawned is not None:
        check_server_log(soak, soak.spawned)
    behaviour_rows = {
        name: {"runs": soak.ledger.mis_runs[name], "ok": soak.ledger.mis_ok[name]} for name in sorted(soak.ledger.mis_runs)
    }
    lost_or_wrong = sum(soak.ledger.errors.values())
    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "ok": lost_or_wrong == 0,
        "target": {"url": soak.url, **server},
        "settings": {
            "minutes": args.minutes, "members": args.members, "misbehavers": args.misbehavers,
            "rooms": args.rooms, "stay_s": list(args.stay), "settle_s": args.settle, "drain_s": args.drain,
            "warmup_s": args.warmup, "sample_every_s": args.sample_every, "seed": args.seed,
            "rate_limit": [args.rate_limit_count, args.rate_limit_window],
            "join_limit": [args.join_limit_count, args.join_limit_window],
            "auth_timeout_s": args.auth_timeout, "join_timeout_s": args.join_timeout,
            "max_message_bytes": args.max_message_bytes, "max_body_chars": args.max_body_chars,
            "max_outbox_bytes": args.max_outbox_bytes, "stop_reader_expected_s": round(soak.misbehavers.slow_expected, 1),
        },
        "duration_s": round(soak.plan.t_stop - soak.plan.t0, 1),
        "connections": {"total": sum(soak.ledger.conns.values()), "by_kind": dict(soak.ledger.conns),
                        "max_open": soak.ledger.max_open_conns},
        "memberships": len(soak.ledger.memberships),
        "leaves": dict(soak.ledger.leaves),
        "messages": {
            "sent": soak.ledger.sent, "deliveries": soak.ledger.deliveries, "noise_sent": soak.ledger.noise_sent,
            "noise_received": soak.ledger.noise_received,
            "latency_ms": {q: _ms(percentile(lat, p))
                           for q, p in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))},
        },
        "loss": loss,
        "room_events": {"received": dict(soak.ledger.events), **events, "ghost_members": soak.ledger.ghosts},
        "misbehaviours": behaviour_rows,
        "misbehaviours_cut_by_deadline": soak.ledger.mis_cut,
        "stop_reader_closed_after_s": [round(s, 2) for s in soak.ledger.slow_close_s],
        "errors": dict(soak.ledger.errors),
        "error_examples": dict(soak.ledger.error_examples),
        "warnings": soak.ledger.warnings,
        "processes": processes,
        "samples": soak.watch.samples,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def fmt_mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def fmt_slope(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:+.{digits}f}"


def print_summary(result: dict[str, Any]) -> None:
    w = sys.stdout.write
    s = result["settings"]
    t = result["target"]
    w(f"\ngarin soak: {result['duration_s']:.0f} s against {t['url']}")
    if t.get("spawned"):
        w(f" (spawned garin run: {t['shards']} shards, {t['routers']} routers)")
    w(f"\n  {s['members']} members + {s['misbehavers']} misbehavers, {s['rooms']} rooms, "
      f"rate limit {s['rate_limit'][0]}/{s['rate_limit'][1]:g}s, settle {s['settle_s']:g}s\n")
    c = result["connections"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["by_kind"].items()))
    w(f"connections: {c['total']} opened ({kinds}), at most {c['max_open']} at once\n")
    leaves = ", ".join(f"{k} {v}" for k, v in sorted(result["leaves"].items()))
    w(f"memberships: {result['memberships']}; member leaves: {leaves}\n")
    msg = result["messages"]
    lat = msg["latency_ms"]
    w(f"messages: {msg['sent']} sent, {msg['deliveries']} deliveries; latency p50 {lat['p50']} ms, "
      f"p99 {lat['p99']} ms, p99.9 {lat['p999']} ms, max {lat['max']} ms\n")
    loss = result["loss"]
    w(f"loss: {loss['lost']} lost of {loss['expected']} expected deliveries "
      f"({loss['lost_timed_rule']} timed rule, {loss['lost_gap_rule']} gap rule) "
      f"over {loss['memberships_checked']} member stays\n")
    for line in loss["examples"][:5]:
        w(f"  e.g. {line}\n")
    ev = result["room_events"]
    w(f"room events: {ev['expected']} joins/leaves expected, {ev['missing_joins']} joins and "
      f"{ev['missing_leaves']} leaves missing; ghost members after the soak: {sum(ev['ghost_members'].values())}\n")
    w("misbehaviours (runs/as expected): ")
    w(", ".join(f"{k} {v['ok']}/{v['runs']}" for k, v in result["misbehaviours"].items()) + "\n")
    if "stops reading" not in result["misbehaviours"]:
        w(f"  stops reading: not run (each takes ~{result['settings']['stop_reader_expected_s']:.0f}s with "
          f"a {result['settings']['max_outbox_bytes']} byte outbox; run longer)\n")
    if result["stop_reader_closed_after_s"]:
        vals = result["stop_reader_closed_after_s"]
        w(f"  a stopped reader was closed 'too slow' after {min(vals):.1f}-{max(vals):.1f} s\n")
    procs = result["processes"]
    if procs:
        w("server processes       CPU |  RSS MiB start/end/max  slope MiB/min |  fds start/end/max  slope/min | "
          "idle fds before/after\n")
        for role, row in procs.items():
            r, f = row["rss_kib"], row["fds"]
            cpu = row.get("cpu_share")
            w(f"  {role:<12} {'-' if cpu is None else f'{cpu:.0%}':>9} | {fmt_mib(r['start']):>6} {fmt_mib(r['end']):>6} {fmt_mib(r['max']):>6}"
              f"  {fmt_slope(r['slope_per_min_after_warmup'], 1024):>8}     | {f['start']:>5} {f['end']:>5} "
              f"{f['max']:>5}  {fmt_slope(f['slope_per_min_after_warmup'], 1, 1):>6}    | "
              f"{row['idle_fds_before']}/{row['idle_fds_after']}\n")
    else:
        w("server processes: not sampled (no --server-pid)\n")
    for warning in result["warnings"]:
        w(f"warning: {warning}\n")
    if result["errors"]:
        w("ERRORS:\n")
        for kind, n in sorted(result["errors"].items(), key=lambda kv: -kv[1]):
            w(f"  {n:>6}  {kind}\n")
            for ex in result["error_examples"].get(kind, [])[:2]:
                w(f"          e.g. {ex}\n")
    w(f"result: {'PASS' if result['ok'] else 'FAIL'}\n")


def write_result(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    print(f"soak: wrote {path}", file=sys.stderr)

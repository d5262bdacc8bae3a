"""`python scripts/soak.py` (or `python -m garin_bench.soak`): the options,
the target (a spawned server, or a running one), the run and its result."""

from __future__ import annotations

import argparse
import shutil
import signal
from datetime import datetime, timezone
from pathlib import Path

import trio

from garin_bench.options import ToolError, check_target, open_target, run_bounded, tool_parser
from garin_bench.soak.report import build_result, print_summary, write_result
from garin_bench.soak.run import Soak

END_BUDGET_S = 45.0  # probes and idle checks after the deadline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser("soak.py", "Bounded soak test for garin: churn, misbehaviour, loss, leaks.",
                    verb="soak", routers=2, remote=False)

    limits = p.add_argument_group("the server's limits (set with --spawn; must match the server otherwise)")
    limits.add_argument("--rate-limit-count", type=int, default=5, help="GARIN_RATE_LIMIT_COUNT (>= 1)")
    limits.add_argument("--rate-limit-window", type=float, default=1.0, help="GARIN_RATE_LIMIT_WINDOW, seconds")
    limits.add_argument("--join-limit-count", type=int, default=10, help="GARIN_JOIN_LIMIT_COUNT (0: off)")
    limits.add_argument("--join-limit-window", type=float, default=20.0, help="GARIN_JOIN_LIMIT_WINDOW, seconds")
    limits.add_argument("--auth-timeout", type=float, default=2.0, help="GARIN_AUTH_TIMEOUT")
    limits.add_argument("--join-timeout", type=float, default=2.0, help="GARIN_JOIN_TIMEOUT")
    limits.add_argument("--max-message-bytes", type=int, default=65536, help="GARIN_MAX_MESSAGE_BYTES")
    limits.add_argument("--max-body-chars", type=int, default=4096, help="GARIN_MAX_BODY_CHARS")
    limits.add_argument("--max-outbox-bytes", type=int, default=None,
                        help="GARIN_MAX_OUTBOX_BYTES [default: 65536 with --spawn, so that a stopped reader is "
                             "closed within seconds; else garin's default 1048576]")

    load = p.add_argument_group("population")
    load.add_argument("--minutes", type=float, default=2.0, help="how long clients run (the whole soak is bounded)")
    load.add_argument("--members", type=int, default=60, help="well-behaved members cycling at any time")
    load.add_argument("--misbehavers", type=int, default=8, help="misbehaving clients cycling at any time")
    load.add_argument("--rooms", type=int, default=6, help="rooms the members and misbehavers use")
    load.add_argument("--stay", type=float, nargs=2, default=(3.0, 15.0), metavar=("MIN", "MAX"),
                      help="seconds a member stays in a room before it leaves or switches")
    load.add_argument("--seed", type=int, default=None, help="random seed (choices, not timing)")

    check = p.add_argument_group("checks and output")
    check.add_argument("--settle", type=float, default=1.0,
                       help="a message sent this long before a member began to leave must have reached it")
    check.add_argument("--drain", type=float, default=3.0, help="seconds of no sending before the deadline")
    check.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS/fd samples")
    check.add_argument("--warmup", type=float, default=None,
                       help="seconds excluded from the slopes [default: a quarter of the run, at most 60]")
    check.add_argument("--out", default="bench-results/soak.json", help="JSON result (folders are created)")
    args = p.parse_args(argv)

    if not 0 < args.minutes <= 24 * 60:
        p.error("--minutes must be > 0 (and at most a day)")
    if args.members < 2 or args.rooms < 1 or args.misbehavers < 0:
        p.error("--members must be at least 2, --rooms at least 1, --misbehavers at least 0")
    if args.rate_limit_count < 1 or args.rate_limit_window <= 0:
        p.error("the soak needs a rate limit: --rate-limit-count >= 1 and --rate-limit-window > 0")
    if not 0 < args.stay[0] <= args.stay[1]:
        p.error("--stay MIN MAX with 0 < MIN <= MAX")
    if args.join_limit_count < 0 or args.join_limit_window <= 0:
        p.error("--join-limit-count must be >= 0 and --join-limit-window > 0")
    if args.join_limit_count > 0 and args.stay[0] < args.join_limit_window / args.join_limit_count:
        p.error("members would switch rooms faster than the join limit allows: "
                "--stay MIN must be at least --join-limit-window / --join-limit-count")
    if args.spawn and (args.server_pid is not None or args.secret is not None):
        p.error("--spawn soaks the server it starts; drop --server-pid and --secret")
    duration = args.minutes * 60
    if args.drain >= duration / 2:
        p.error("--drain must be shorter than half the run")
    if args.warmup is None:
        args.warmup = min(60.0, duration / 4)
    if args.max_outbox_bytes is None:
        args.max_outbox_bytes = 65536 if args.spawn else 1048576
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = args.minutes * 60 + END_BUDGET_S + 60
    return run_bounded("soak", budget, 2, lambda: _soak(args))


def _soak(args: argparse.Namespace) -> int:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {
        "GARIN_RATE_LIMIT_COUNT": str(args.rate_limit_count),
        "GARIN_RATE_LIMIT_WINDOW": str(args.rate_limit_window),
        "GARIN_JOIN_LIMIT_COUNT": str(args.join_limit_count),
        "GARIN_JOIN_LIMIT_WINDOW": str(args.join_limit_window),
        "GARIN_AUTH_TIMEOUT": str(args.auth_timeout),
        "GARIN_JOIN_TIMEOUT": str(args.join_timeout),
        "GARIN_MAX_MESSAGE_BYTES": str(args.max_message_bytes),
        "GARIN_MAX_BODY_CHARS": str(args.max_body_chars),
        "GARIN_MAX_OUTBOX_BYTES": str(args.max_outbox_bytes),
        # Every client comes from 127.0.0.1, and misbehaving is the point.
        "GARIN_MAX_CONNECTIONS_PER_IP": "0",
        "GARIN_BAN_STRIKES": "0",
    }
    with open_target(args, "soak", 3600, env) as target:
        spawned = target.spawned
        if spawned is not None:
            server = {"spawned": True, "shards": args.shards, "routers": args.routers, "pid": target.server_pid}
        else:
            server = {"spawned": False, "pid": target.server_pid}
        host, port = check_target(target.url, allow_remote=False)
        soak = Soak(args, target.url, host, port, target.origin, target.minter, target.server_pid, spawned)
        try:
            trio.run(soak.run)
        except RuntimeError as exc:
            raise ToolError(str(exc)) from None
        stop_code = target.stop()
        if spawned is not None and stop_code != 0:
            soak.ledger.error("spawned server did not exit 0 on SIGTERM", f"exit code {stop_code}")
        signal.alarm(0)
        result = build_result(soak, server, started_at)
        if spawned is not None:
            result["target"]["exit_code_on_sigterm"] = stop_code
            log_copy = str(Path(args.out).with_suffix(".server.log"))
            Path(log_copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spawned.log_path, log_copy)
            result["target"]["server_log"] = log_copy
        print_summary(result)
        write_result(result, args.out)
        return 0 if result["ok"] else 1

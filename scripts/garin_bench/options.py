"""What bench.py and soak.py share around a run: the target options (spawn a
private server, or measure a running one), the target itself, and the
scaffolding that keeps a run bounded (a hard timeout, SIGTERM as Ctrl-C, one
line and an exit code for every way a run ends early).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import resource
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from garin_bench.server import ORIGIN, SpawnedServer, TokenMinter, check_python_has_garin, sigterm_as_interrupt

DEFAULT_URL = "ws://127.0.0.1:8080/"


class ToolError(Exception):
    """The run cannot go on; str() says why."""


class HardTimeout(BaseException):
    """The run's whole time budget is spent (SIGALRM)."""


def tool_parser(prog: str, description: str, *, verb: str, routers: int, remote: bool) -> argparse.ArgumentParser:
    """A tool's parser, its defaults in --help, starting with the "target"
    group: --spawn a private server, or --url (and --secret, --server-pid) a
    running one. `remote` adds --token-ttl and --allow-remote."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_argument_group("target")
    target.add_argument("--url", default=DEFAULT_URL, help=f"server to {verb} (ignored with --spawn)")
    target.add_argument("--spawn", action="store_true", help="start a private `garin run` for this run and stop it after")
    target.add_argument("--shards", type=int, default=2, help="--spawn: GARIN_SHARDS")
    target.add_argument("--routers", type=int, default=routers, help="--spawn: GARIN_ROUTERS")
    target.add_argument("--python", default=sys.executable, help="--spawn: interpreter that runs `-m garin run`")
    target.add_argument("--server-log-level", default="warning", help="--spawn: GARIN_LOG_LEVEL")
    target.add_argument("--server-pid", type=int, default=None,
                        help="PID of the server (its descendants are included) to read CPU, RSS and fds from /proc")
    target.add_argument("--origin", default=ORIGIN, help="Origin header; must be in the server's ALLOWED_ORIGINS")
    target.add_argument("--secret", default=None, help="JWT secret that signs the tokens (else env JWT_DECODE_SECRET)")
    if remote:
        target.add_argument("--token-ttl", type=float, default=3600.0, help="lifetime of the minted tokens, seconds")
        target.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    return p


def check_target(url: str, allow_remote: bool) -> tuple[str, int]:
    """(host, port) of a ws:// URL; ToolError unless it is loopback (or allowed)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ToolError(f"--url must look like ws://127.0.0.1:8080/, not {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {parts.hostname!r}: {exc}") from None
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    remote = sorted(str(a) for a in addresses if not a.is_loopback)
    if remote and not allow_remote:
        raise ToolError(
            f"{parts.hostname} resolves to {', '.join(remote)}, which is not loopback; "
            "this tool sends load only to this machine unless you pass --allow-remote"
        )
    return parts.hostname, port


@dataclass
class Target:
    """The server a run talks to: spawned for it, or given by the options."""

    url: str
    origin: str
    server_pid: int | None
    minter: TokenMinter
    spawned: SpawnedServer | None = None
    stop_code: int | None = None
    stopped: bool = False

    def stop(self) -> int | None:
        """Stop a spawned server now (SIGTERM, then SIGKILL by PID); its exit code."""
        if self.spawned is not None and not self.stopped:
            self.stop_code = self.spawned.stop()
            self.stopped = True
        return self.stop_code


@contextlib.contextmanager
def open_target(
    args: argparse.Namespace, tool: str, token_ttl_s: float, env_overrides: dict[str, str] | None = None
) -> Iterator[Target]:
    """The run's target; a spawned server is stopped and its files removed on the way out."""
    if not args.spawn:
        check_target(args.url, getattr(args, "allow_remote", False))
        secret = args.secret or os.environ.get("JWT_DECODE_SECRET")
        if not secret:
            raise ToolError("no JWT secret: pass --secret or set JWT_DECODE_SECRET (or use --spawn)")
        if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}"):
            raise ToolError(f"--server-pid {args.server_pid}: no such process")
        yield Target(args.url, args.origin, args.server_pid, TokenMinter(secret, token_ttl_s))
        return
    problem = check_python_has_garin(args.python)
    if problem:
        raise ToolError(f"{args.python} cannot import garin ({problem}); pass --python")
    spawned = SpawnedServer(args.python, args.shards, args.routers, args.server_log_level,
                            env_overrides=dict(env_overrides or {}))
    target = Target(spawned.url, ORIGIN, None, TokenMinter(spawned.secret, token_ttl_s), spawned)
    try:
        spawned.start()
        try:
            ready_s = spawned.wait_ready(target.minter)
        except RuntimeError as exc:
            raise ToolError(str(exc)) from None
        target.url, target.server_pid = spawned.url, spawned.pid
        print(f"{tool}: spawned garin run (pid {spawned.pid}, {args.shards} shards, {args.routers} routers) "
              f"on {spawned.url}, ready in {ready_s:.1f}s", file=sys.stderr)
        yield target
    finally:
        if not target.stopped:
            code = target.stop()
            if code not in (0, None):
                print(f"{tool}: the spawned server exited with code {code}:\n{spawned.log_tail()}", file=sys.stderr)
        spawned.cleanup()


def raise_fd_limit(wanted: int | None = None) -> None:
    """Open files up to the hard limit (or `wanted`, if that is less): one per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    goal = hard if wanted is None else min(wanted, hard)
    if soft < goal:
        resource.setrlimit(resource.RLIMIT_NOFILE, (goal, hard))


def _on_alarm(signum: int, frame: Any) -> None:
    raise HardTimeout()


def run_bounded(tool: str, budget_s: float, error_code: int, body: Callable[[], int]) -> int:
    """Run `body` under a hard timeout of `budget_s` (then exit 3), with SIGTERM
    stopping it like Ctrl-C (130), and a ToolError as one line (`error_code`)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    sigterm_as_interrupt()  # like Ctrl-C: the `finally`s that stop workers and a spawned server run
    signal.alarm(max(1, math.ceil(budget_s)))
    raise_fd_limit()
    try:
        return body()
    except ToolError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return error_code
    except HardTimeout:
        print(f"{tool}: error: hard timeout of {budget_s:.0f}s reached; stopped", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; stopped", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)

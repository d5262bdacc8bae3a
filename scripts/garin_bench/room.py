"""One big room: how long until a message reaches its last member.

    python scripts/bench_room.py --spawn --members 10000 [--messages 5] [--out room.json]
    python scripts/bench_room.py --url ws://127.0.0.1:8080/ --secret S --members 10000

Every member connects (one process, plain non-blocking sockets), sends the
upgrade, its token and its join in one go, and then only drains its socket.
Building the room is itself a load test: GarinChat's protocol announces every
join to everyone already in the room, so N members receive N(N+1)/2 join
frames (50 million for 10,000); the script reports how long that took. Once
every member has seen the last join (`"totalUsers":N`), member 0 sends
`--messages` messages one second apart, each with a unique marker, and the
script records when each member's socket received it: the time to the first,
the median and the last delivery, per message. Members are not parsed as
WebSocket streams, only searched for the markers, so the client stays far
cheaper than the server. They do not answer pings: against a running server,
turn keepalive off (GARIN_PING_INTERVAL=0) and allow long auth and join
timeouts, as --spawn does. Loopback only; every phase has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from garin_bench.wsframe import client_frame, upgrade_request
from garin_bench.options import raise_fd_limit
from garin_bench.server import ORIGIN, SpawnedServer, TokenMinter, sigterm_as_interrupt


class Member:
    __slots__ = ("sock", "tail", "seen", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tail = b""  # the end of the last read, for markers split across reads
        self.seen = False
        self.closed = False


def drain_until(
    members: dict[int, Member], marker: bytes | None, deadline: float, poller: select.epoll
) -> list[float]:
    """Read every member until each has received `marker` (None: only drain
    until the deadline); the arrival times."""
    if marker is not None:
        for m in members.values():
            m.seen = False
    times: list[float] = []
    left = len(members)
    while (left or marker is None) and time.monotonic() < deadline:
        for fd, _ in poller.poll(0.2 if marker is not None else max(0.0, deadline - time.monotonic())):
            m = members[fd]
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                m.closed = True
                if not m.seen:
                    m.seen = True
                    left -= 1
                continue
            if marker is not None and not m.seen:
                if marker in (m.tail + data):
                    m.seen = True
                    left -= 1
                    times.append(time.monotonic())
                m.tail = data[-(len(marker) - 1):]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080/")
    parser.add_argument("--spawn", action="store_true", help="start a private `garin run` and stop it after")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--routers", type=int, default=1)
    parser.add_argument("--secret", default=os.environ.get("JWT_DECODE_SECRET"))
    parser.add_argument("--members", type=int, default=10000)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--connect-batch", type=int, default=100, help="connections opened per burst")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit for the whole run, seconds")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    sigterm_as_interrupt()
    end = time.monotonic() + args.timeout

    raise_fd_limit(args.members + 64)

    server = None
    try:
        if args.spawn:
            # While the room fills, each join is announced to everyone in it: a
            # newcomer's auth and join wait behind that, longer than GarinChat's
            # 2 s. And these members never answer keepalive pings.
            server = SpawnedServer(
                sys.executable, args.shards, args.routers, "warning",
                env_overrides={"GARIN_AUTH_TIMEOUT": "60", "GARIN_JOIN_TIMEOUT": "60", "GARIN_PING_INTERVAL": "0"},
            )
            server.start()
            url, secret = server.url, server.secret
            server.wait_ready(TokenMinter(secret, 3600))
            print(f"bench_room: spawned garin run (pid {server.pid}) on {url}", flush=True)
        else:
            url, secret = args.url, args.secret
            if not secret:
                parser.error("--secret (or JWT_DECODE_SECRET) is needed without --spawn")
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        if not host.startswith("127.") and host not in ("localhost", "::1"):
            parser.error("loopback addresses only")
        tokens = TokenMinter(secret, 3600)
        result: dict[str, object] = {"members": args.members, "url": url}
        members: dict[int, Member] = {}
        poller = select.epoll()
        try:
            t0 = time.monotonic()
            for i in range(args.members):
                sock = socket.create_connection((host, port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                name = f"m{i:05d}"
                sock.sendall(
                    upgrade_request(host, port, "/", ORIGIN)
                    + client_frame(0x1, json.dumps({"type": "auth", "body": tokens(name)}).encode())
                    + client_frame(0x1, json.dumps({"type": "join", "username": name, "room": "bigroom"}).encode())
                )
                sock.setblocking(False)
                members[sock.fileno()] = Member(sock)
                poller.register(sock.fileno(), select.EPOLLIN)
                if i % args.connect_batch == args.connect_batch - 1:
                    # Drain between bursts, or the join announcements pile up unread.
                    drain_until(members, None, time.monotonic() + 0.05, poller)
                if time.monotonic() > end:
                    raise TimeoutError("connecting took longer than --timeout")
            full = b'"totalUsers":%d}' % args.members
            joined_times = drain_until(members, full, end, poller)
            build_s = time.monotonic() - t0
            if len(joined_times) < args.members:
                closed = sum(1 for m in members.values() if m.closed)
                raise TimeoutError(
                    f"only {len(joined_times)} of {args.members} members saw the room full ({closed} closed)"
                    + (f"; server log: {server.log_problems()[-3:]}" if server is not None else "")
                )
            result["room_built_s"] = round(build_s, 3)
            print(f"room   {args.members} members joined and saw every join in {build_s:.1f} s "
                  f"({args.members * (args.members + 1) // 2:,} join frames)")
            sender = next(iter(members.values()))
            others = {fd: m for fd, m in members.items() if m is not sender}
            runs = []
            for n in range(args.messages):
                marker = f"marker-{n}-{os.getpid()}".encode()
                body = json.dumps({"type": "message", "body": marker.decode()}).encode()
                sent = time.monotonic()
                sender.sock.sendall(client_frame(0x1, body))
                times = drain_until(others, marker, min(end, sent + 30), poller)
                if len(times) < len(others):
                    raise TimeoutError(f"message {n} reached {len(times)} of {len(others)} members in 30 s")
                ms = sorted((t - sent) * 1000 for t in times)
                runs.append({"first_ms": round(ms[0], 2), "median_ms": round(statistics.median(ms), 2),
                             "last_ms": round(ms[-1], 2)})
                print(f"msg {n}  reached {len(ms)} members: first {ms[0]:.1f} ms, median {statistics.median(ms):.1f} ms, "
                      f"last {ms[-1]:.1f} ms")
                time.sleep(1)
            result["messages"] = runs
            result["last_delivery_ms_median"] = statistics.median(r["last_ms"] for r in runs)
            print(f"time to the last delivery, median of {len(runs)} messages: {result['last_delivery_ms_median']:.1f} ms")
        except (TimeoutError, OSError) as exc:
            print(f"bench_room: {exc}", file=sys.stderr)
            result["error"] = str(exc)
        finally:
            for m in members.values():
                m.sock.close()
            poller.close()
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 1 if "error" in result else 0
    finally:
        if server is not None:
            server.stop()
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())

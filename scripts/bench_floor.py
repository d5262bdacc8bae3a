#!/usr/bin/env python3
"""The system-call floor of fan-out on this machine, without garin.

    python scripts/bench_floor.py [--conns 500] [--group 50] [--rate 50000] [--seconds 5]

A writer process holds `--conns` loopback TCP connections to a reader process
(which drains them with epoll, like a lean load generator). Every 1000/rate*group
ms the writer writes one 70-byte WebSocket text frame to each of the next
`--group` sockets with `os.write`, in a tight loop: the least work any server
written in any language does per delivery. It prints the writer's CPU time per
write (user + system, from getrusage). garin's bench.py figure of "CPU per
delivery" can be read against it: what is above this line is garin's own cost.
Loopback only; the run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import select
import socket
import time

FRAME = b"\x81\x44" + b'{"type":"message","username":"user3","body":"12:345:1234567890123xx"}'[:68]


def reader(port: int, conns: int, ready: multiprocessing.synchronize.Event, seconds: float) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=conns)
    ready.set()
    socks = [listener.accept()[0] for _ in range(conns)]
    poller = select.epoll()
    by_fd = {}
    for s in socks:
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    end = time.monotonic() + seconds + 3
    while time.monotonic() < end:
        for fd, _ in poller.poll(0.5):
            try:
                if not os.read(fd, 65536):
                    poller.unregister(fd)
            except BlockingIOError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--group", type=int, default=50, help="sockets written per burst (a room)")
    parser.add_argument("--rate", type=float, default=50000.0, help="writes per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=reader, args=(port, args.conns, ready, args.seconds), daemon=True)
    proc.start()
    ready.wait(10)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.conns)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    fds = [s.fileno() for s in socks]
    groups = [fds[i : i + args.group] for i in range(0, len(fds), args.group)]
    period = args.group / args.rate
    write = os.write
    writes = 0
    start_usage = resource.getrusage(resource.RUSAGE_SELF)
    start = next_at = time.monotonic()
    end = start + args.seconds
    g = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now < next_at:
            time.sleep(next_at - now)
            continue
        for fd in groups[g]:
            try:
                write(fd, FRAME)
            except BlockingIOError:
                pass
        writes += len(groups[g])
        g = (g + 1) % len(groups)
        next_at += period
    usage = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - start
    user = usage.ru_utime - start_usage.ru_utime
    system = usage.ru_stime - start_usage.ru_stime
    print(
        f"floor  {writes / elapsed:,.0f} writes/s of {len(FRAME)} bytes to {args.conns} loopback sockets, "
        f"{args.group} per burst: {(user + system) / writes * 1e6:.2f} us CPU/write "
        f"(user {user / writes * 1e6:.2f}, system {system / writes * 1e6:.2f})"
    )
    for s in socks:
        s.close()
    proc.join(args.seconds + 10)


if __name__ == "__main__":
    main()

"""The system-call floor of fan-out on this machine, without garin.

    python scripts/bench_floor.py [--conns 500] [--group 50] [--rate 50000] [--seconds 5]

A writer process holds `--conns` loopback TCP connections to a reader process
(which drains them with epoll, like a lean load generator). Every 1000/rate*group
ms the writer writes one 70-byte WebSocket text frame to each of the next
`--group` sockets with `os.write`, in a tight loop: the least work any server
written in any language does per delivery. It prints the writer's CPU time per
write (user + system, from getrusage). garin's bench.py figure of "CPU per
delivery" can be read against it: what is above this line is garin's own cost
(`bench.py --floor SECONDS` measures it for the run's load, right after it).
Loopback only; the run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import select
import socket
import sys
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


def text_frame(size: int) -> bytes:
    """A server-to-client text frame of `size` bytes in all (header included)."""
    if size - 2 < 126:
        return bytes([0x81, size - 2]) + b"x" * (size - 2)
    # (At 128 and 129 bytes a 16-bit length encodes a payload that would fit
    # in 7 bits: no reader here minds.)
    if size - 4 < 65536:
        return bytes([0x81, 126]) + (size - 4).to_bytes(2, "big") + b"x" * (size - 4)
    return bytes([0x81, 127]) + (size - 10).to_bytes(8, "big") + b"x" * (size - 10)


def measure(conns: int, group: int, rate: float, seconds: float, frame: bytes = FRAME) -> dict[str, float]:
    """Write `frame` to `group` of `conns` loopback sockets at a time, `rate`
    writes per second in all, for `seconds`; the writer's CPU per write."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=reader, args=(port, conns, ready, seconds), daemon=True)
    proc.start()
    if not ready.wait(10):
        proc.kill()
        raise RuntimeError("the reader process did not start")
    socks: list[socket.socket] = []
    try:
        # Inside the try: a connection refused halfway (out of fds) still
        # closes the others and waits for the reader.
        socks.extend(socket.create_connection(("127.0.0.1", port)) for _ in range(conns))
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        fds = [s.fileno() for s in socks]
        groups = [fds[i : i + group] for i in range(0, len(fds), group)]
        write = os.write
        writes = 0
        start_usage = resource.getrusage(resource.RUSAGE_SELF)
        start = next_at = time.monotonic()
        end = start + seconds
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
                    write(fd, frame)
                except BlockingIOError:
                    pass
            writes += len(groups[g])
            # The last group may be short: its share of the period only.
            next_at += len(groups[g]) / rate
            g = (g + 1) % len(groups)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.monotonic() - start
    finally:
        for s in socks:
            s.close()
        proc.join(seconds + 10)
    if not writes:
        raise ValueError(f"no write in {seconds:g}s")
    user = usage.ru_utime - start_usage.ru_utime
    system = usage.ru_stime - start_usage.ru_stime
    return {
        "conns": conns, "group": group, "frame_bytes": len(frame), "seconds": round(elapsed, 2),
        "writes_per_s": round(writes / elapsed, 1),
        "us_per_write": round((user + system) / writes * 1e6, 3),
        "user_us_per_write": round(user / writes * 1e6, 3),
        "system_us_per_write": round(system / writes * 1e6, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--group", type=int, default=50, help="sockets written per burst (a room)")
    parser.add_argument("--rate", type=float, default=50000.0, help="writes per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    r = measure(args.conns, args.group, args.rate, args.seconds)
    print(
        f"floor  {r['writes_per_s']:,.0f} writes/s of {r['frame_bytes']} bytes to {args.conns} loopback sockets, "
        f"{args.group} per burst: {r['us_per_write']:.2f} us CPU/write "
        f"(user {r['user_us_per_write']:.2f}, system {r['system_us_per_write']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Micro-benchmarks of garin's per-message Python work, without sockets or trio.

    python scripts/bench_micro.py          # medians of 5 repeats, microseconds per call

Each line times one step of a chat message's way through the server, hot (in
a loop), so it shows what the Python costs and nothing of the system calls or
scheduling around it. Use it to compare two versions of the code on one
machine; the end-to-end truth is bench.py.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garin import protocol, wire  # noqa: E402
from garin.frames import text_frame  # noqa: E402
from garin.shard.rooms import Rooms  # noqa: E402

BODY = "12:345:1234567890123"
TEXT = protocol.message_text("user3", BODY)


def main() -> None:
    rooms = Rooms()
    for member in range(50):
        rooms.join(1, member, "room-a", f"user{member}")
    publish = wire.encode(wire.Publish(3, BODY))
    deliver = wire.encode(wire.Deliver("room-a", 3, TEXT))
    shard_decoder = wire.Decoder()
    router_decoder = wire.Decoder()

    def shard_publish() -> None:
        # decode a Publish, decide, build the text, encode the Deliver
        for message in shard_decoder.feed(publish):
            for _, out in rooms.publish(1, message.member, message.body):  # type: ignore[union-attr]
                wire.encode(out)

    def router_deliver() -> None:
        # decode a Deliver and build its frame
        for message in router_decoder.feed(deliver):
            text_frame(message.text)  # type: ignore[union-attr]

    cases = {
        "wire.encode(Publish)": lambda: wire.encode(wire.Publish(3, BODY)),
        "wire decode Publish": lambda: list(shard_decoder.feed(publish)),
        "protocol.message_text": lambda: protocol.message_text("user3", BODY),
        "protocol.parse_client_text": lambda: protocol.parse_client_text(
            '{"type":"message","body":"%s"}' % BODY, protocol.NameLimits()),
        "shard: Publish in -> Deliver out": shard_publish,
        "router: Deliver in -> frame": router_deliver,
    }
    number = 20000
    for name, fn in cases.items():
        runs = [timeit.timeit(fn, number=number) / number * 1e6 for _ in range(5)]
        print(f"{name:36s} {statistics.median(runs):7.2f} us")


if __name__ == "__main__":
    main()

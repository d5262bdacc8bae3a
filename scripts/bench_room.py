#!/usr/bin/env python3
"""One big room: how long until a message reaches its last member: `python scripts/bench_room.py --help`; the code is garin_bench.room (scripts/garin_bench/)."""

import sys

from garin_bench.room import main

if __name__ == "__main__":
    sys.exit(main())

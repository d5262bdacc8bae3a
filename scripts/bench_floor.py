#!/usr/bin/env python3
"""The system-call floor of fan-out on this machine: `python scripts/bench_floor.py --help`; the code is garin_bench.floor (scripts/garin_bench/)."""

import sys

from garin_bench.floor import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Load generator and report for garin: `python scripts/bench.py --help`; the code is garin_bench.bench (scripts/garin_bench/)."""

import sys

from garin_bench.bench import main

if __name__ == "__main__":
    sys.exit(main())

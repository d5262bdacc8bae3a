#!/usr/bin/env python3
"""Medians of several bench.py results, as a table and a plot: `python scripts/bench_summary.py --help`; the code is garin_bench.summary (scripts/garin_bench/)."""

import sys

from garin_bench.summary import main

if __name__ == "__main__":
    sys.exit(main())

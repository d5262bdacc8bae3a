#!/usr/bin/env python3
"""Bounded soak test for garin: `python scripts/soak.py --help`; the code is garin_bench.soak.cli (scripts/garin_bench/)."""

import sys

from garin_bench.soak.cli import main

if __name__ == "__main__":
    sys.exit(main())

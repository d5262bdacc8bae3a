"""Switching prometheus-client to multi-process mode, before it is imported.

prometheus_client decides at import whether values live in memory or in
files shared across processes, from PROMETHEUS_MULTIPROC_DIR. This module
sets that variable and must not import prometheus_client (or garin.metrics)
itself: importing garin.metrics to call this would be too late for the
calling process, which then counts in memory where no scrape can see it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable(directory: str, fresh: bool) -> None:
    """Turn on multi-process mode (before anything imports prometheus_client)."""
    path = Path(directory)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if fresh and path.exists():
        shutil.rmtree(path)  # counters from a previous run would be summed in
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[ENV] = str(path)

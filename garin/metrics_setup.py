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

from garin.config import Config
from garin.socketdir import prepare_socket_dir

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_for(config: Config, fresh: bool, forget_dead: bool = False) -> None:
    """`enable` in the socket directory, if the metrics port is on and no
    parent (`garin run`) did it already. ConfigError: an unusable
    GARIN_SOCKET_DIR."""
    if config.metrics_port and not os.environ.get(ENV):
        prepare_socket_dir(Path(config.socket_dir))
        enable(str(config.metrics_dir), fresh, forget_dead)


def enable(directory: str, fresh: bool, forget_dead: bool = False) -> None:
    """Turn on multi-process mode (before anything imports prometheus_client).

    `fresh`: start an empty directory (`garin run`). `forget_dead`: remove the
    files of processes that are gone (a Procfile's processes, each started on
    its own: the last run's counters would otherwise be summed in)."""
    path = Path(directory)
    if fresh and path.exists():
        shutil.rmtree(path)  # counters from a previous run would be summed in
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if forget_dead:
        for file in path.glob("*_*.db"):
            pid = file.stem.rpartition("_")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                file.unlink(missing_ok=True)
    os.environ[ENV] = str(path)

"""Process tuning: the garbage collector, and opt-in CPU profiling.

`tune_gc()` runs once a router or shard has started (see its docstring).

Opt-in CPU profiling of a router or shard process, for performance work:

Set `GARIN_PROFILE=DIR` (an existing directory) and every router and shard
started with it runs its trio loop under cProfile and writes
`DIR/<role>-<pid>.prof` when it exits (a graceful stop: SIGTERM or Ctrl-C).
Read one with `python -m pstats DIR/router-0-1234.prof`. cProfile follows
trio's tasks fine (a resumed coroutine is a call), but it slows Python code
down several times (it times with process CPU time): compare call counts and
shares, not absolute times. Unset, this costs nothing. It is a debugging switch, not a setting: it has no click option.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

PROFILE_ENV = "GARIN_PROFILE"


def run_trio(role: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    out_dir = os.environ.get(PROFILE_ENV)
    if not out_dir:
        return trio.run(fn, *args)
    import cProfile

    import time

    # CPU time, not wall time: a blocked epoll_wait or a preempted send costs nothing.
    profile = cProfile.Profile(time.process_time)
    try:
        return profile.runcall(trio.run, fn, *args)
    finally:
        profile.dump_stats(os.path.join(out_dir, f"{role}-{os.getpid()}.prof"))


def tune_gc() -> None:
    """Each connection allocates a few hundred objects and each message
    dozens: at the default threshold (700) the collector ran ~90 times per
    1,000 connects, ~8% of a router's CPU in a connect burst, and a shard
    fanning out walks its members' objects as often. 10,000 allocations
    between young collections is about a MiB. What start-up built is never
    garbage: frozen, no collection walks it again."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)

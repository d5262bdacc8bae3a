"""Prometheus metrics, aggregated across garin's processes.

Every process (routers, shards, the supervisor) updates its own metrics;
with metrics on, prometheus-client's multi-process mode keeps them in
memory-mapped files in one directory, and whichever router answers a scrape
sums them all. PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client
is first imported (it picks its value storage then), so
`garin.metrics_setup.enable()` runs early in each process, from the CLI, and
this module is imported only after it.

Counters are bumped once per event, never per delivered frame in a loop:
`DELIVERIES.inc(n)` once per fan-out keeps the hot path free of them.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge

from garin.metrics_setup import ENV

CONNECTIONS = Gauge("garin_connections", "Open client connections.", multiprocess_mode="livesum")
JOINS = Counter("garin_joins", "Room joins announced.")
LEAVES = Counter("garin_leaves", "Members that left a room (any reason).")
MESSAGES_IN = Counter("garin_messages_in", "Chat messages received from clients.")
DELIVERIES = Counter("garin_deliveries", "Frames written to client sockets by fan-out.")
CLOSES = Counter("garin_closes", "Connections closed by the server.", ["code", "reason"])
SLOW_CONSUMER_DROPS = Counter("garin_slow_consumer_drops", "Clients closed for not reading (1013 too slow).")
ROOMS = Gauge("garin_rooms", "Rooms owned by each shard.", ["shard"], multiprocess_mode="livesum")
MEMBERS = Gauge("garin_members", "Members of each shard's rooms.", ["shard"], multiprocess_mode="livesum")
SHARD_LINKS_UP = Gauge(
    "garin_shard_link_up", "1 if the router's link to the shard is up.", ["shard"], multiprocess_mode="livemin"
)
RESTARTS = Counter("garin_restarts", "Children restarted by the supervisor.", ["child"])
# With GARIN_REDIS_URL, the shard processes' Redis link metrics
# (garin_redis_*) are defined in garin/shard/redis_metrics.py, imported only
# then: a single host does not export them.


def mark_dead(pid: int) -> None:
    """A child died: drop its live gauges from the sums."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render() -> bytes:
    """The exposition text for all processes (blocking file reads: run in a thread)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    if not os.environ.get(ENV):
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)

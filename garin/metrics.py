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

from prometheus_client import Counter, Gauge, Histogram

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
# With GARIN_REDIS_URL (garin/shard/cluster.py): each shard process's Redis link.
REDIS_UP = Gauge(
    "garin_redis_up", "1 while the shard's Redis link is up.", ["shard"], multiprocess_mode="livemin"
)
REDIS_QUEUE = Gauge(
    "garin_redis_queue", "Joins, messages and leaves waiting to be sent to Redis.", ["shard"],
    multiprocess_mode="livesum",
)
REDIS_ROUND_TRIP = Histogram(
    "garin_redis_round_trip_seconds",
    "Time from sending a batch of room events to Redis to the writer seeing it answered "
    "(it checks when it next wakes, at least every 50 ms).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
REDIS_CONNECTS = Counter("garin_redis_connects", "Redis links made (the first and every reconnection).")
REDIS_LOST_MESSAGES = Counter(
    "garin_redis_lost_messages", "Messages in flight when the Redis link broke (maybe delivered, never resent)."
)
REDIS_REAPED = Counter("garin_redis_reaped_instances", "Dead shard processes whose members this host removed.")


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

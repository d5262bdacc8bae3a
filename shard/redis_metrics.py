"""A shard process's Redis link, in metrics (with GARIN_REDIS_URL only:
this module is imported by garin/shard/cluster.py, itself imported only
then, so a single host exports no garin_redis_* metric)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

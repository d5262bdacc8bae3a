"""The open-files limit: lifted at start to what the connections need."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("garin")

# Descriptors a process needs besides its clients and links: listeners, logs,
# the ban list, metrics files, a Redis link.
SLACK = 64


def raise_file_limit(max_connections: int, links: int, role: str = "router") -> int:
    """Lift the soft open-files limit towards what `max_connections` needs, as
    the Go runtime does at start; warn if the hard limit is too low. Returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max_connections == 0 or soft == resource.RLIM_INFINITY:
        return soft
    # One socket per client, plus links, listeners, logs and slack.
    wanted = max_connections + links + SLACK
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft < wanted:
        log.warning(
            "%d client connections may be open here but this %s may open only %d files (ulimit -n): "
            "it will refuse connections before the limit is reached",
            max_connections, role, soft,
        )
    return soft


def connections_that_fit(max_connections: int, routers: int) -> int:
    """GARIN_MAX_CONNECTIONS, lowered to what the hard open-files limit lets a
    shard hold: a shard may hold every router's connections (one big room),
    and a socket handed to a shard that cannot open another file is lost
    without a close frame, where one over the limit gets 1013 `server full`.
    0 (no limit) stays 0."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if max_connections == 0 or hard == resource.RLIM_INFINITY:
        return max_connections
    fit = max(1, (hard - routers - SLACK) // routers)
    if fit >= max_connections:
        return max_connections
    log.warning(
        "GARIN_MAX_CONNECTIONS lowered from %d to %d per router: the hard open-files limit (ulimit -Hn) is %d, "
        "and a shard may hold the connections of all %d router(s)",
        max_connections, fit, hard, routers,
    )
    return fit

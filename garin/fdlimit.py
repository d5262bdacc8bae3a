"""The open-files limit: lifted at start to what the connections need."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("garin")


def raise_file_limit(max_connections: int, links: int, role: str = "router") -> int:
    """Lift the soft open-files limit towards what `max_connections` needs, as
    the Go runtime does at start; warn if the hard limit is too low. Returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max_connections == 0 or soft == resource.RLIM_INFINITY:
        return soft
    # One socket per client, plus links, listeners, logs and slack.
    wanted = max_connections + links + 64
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

"""When a (re)started shard may apply new events.

Theory of operation
-------------------
A shard starts knowing no members. Each router that links replays the members
it has on the shard (`Rejoin`, applied silently) and then sends `Replayed`.
Until every router has done so, a join would be counted without the members
of routers still relinking, and a message a router held during the outage
would not reach them. So a starting shard applies `Rejoin`s at once but holds
back every other event until `expected` distinct routers (GARIN_ROUTERS) have
sent `Replayed`, or until a grace period has passed: a router that is itself
down, or more routers than configured, must not stall the shard for long.
Once open, the gate stays open; routers that link later (a restarted router)
only add members the shard is told about in order.
"""

from __future__ import annotations

# Routers retry a lost link every 0.5 s at most, so every live router has
# normally relinked and replayed well within this.
REPLAY_GRACE_S = 2.0


class ReplayGate:
    def __init__(self, expected_routers: int, now: float, grace_s: float = REPLAY_GRACE_S) -> None:
        self.expected = expected_routers
        self.deadline = now + grace_s
        self.replayed_by: set[str] = set()
        self.open = False

    def replayed(self, router_id: str) -> bool:
        """`router_id` has replayed its members; True if the gate is (now) open."""
        self.replayed_by.add(router_id)
        if len(self.replayed_by) >= self.expected:
            self.open = True
        return self.open

    def timeout(self, now: float) -> bool:
        """True if the gate is open at `now`, by replays or by the grace period."""
        if now >= self.deadline:
            self.open = True
        return self.open

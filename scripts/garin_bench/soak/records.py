"""What the soak knows: its plan (settings, run id, rooms, time marks), the
records of every message and membership, and the counters and errors that
become its result. Plain data, no I/O: the clients write it, the analysis
reads it.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import trio
import trio_websocket


@dataclass(eq=False, slots=True)
class MsgRec:
    """One tracked chat message, as sent."""

    room: int
    sender: int
    seq: int
    t_send: float
    body: str
    uncertain: bool = False  # the send itself failed


@dataclass(eq=False)
class Membership:
    """One stay of one connection in one room, as that connection saw it."""

    cid: int
    username: str
    room: int
    kind: str  # member, misbehaver, feeder
    t_join_sent: float
    t_join_seen: float | None = None
    # Leaving: the server cannot have processed the leave before lo; it was
    # started (sent, or the close seen) by hi.
    t_leave_lo: float | None = None
    t_leave_hi: float | None = None
    ended: str = ""
    tracked: bool = True  # losses are counted for members that were never closed on us
    count: int = 0  # totalUsers as last announced
    received: dict[tuple[int, int], float] = field(default_factory=dict)
    last_seq: dict[int, int] = field(default_factory=dict)
    joins_seen: set[str] = field(default_factory=set)
    leaves_seen: set[str] = field(default_factory=set)
    joined: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Conn:
    cid: int
    kind: str
    username: str
    stream: trio.SocketStream | None = None
    ws: trio_websocket.WebSocketConnection | None = None
    opened_at: float = 0.0
    view: Membership | None = None  # the membership receiving events
    pending: Membership | None = None  # a join sent, its broadcast not seen yet
    closed: trio.Event = field(default_factory=trio.Event)
    close: tuple[int, str] | None = None
    closed_at: float | None = None
    seq: int = 0
    leaving: bool = False  # we started the end of this connection

    def close_text(self) -> str:
        if self.close is None:
            return "no close"
        code, reason = self.close
        return f"{code} {reason}".strip()


@dataclass(frozen=True, slots=True)
class Expect:
    """The close a misbehaviour must get: code, reason (None: any), and for
    timeouts how long after `since` it may come."""

    code: int
    reason: str | None
    since: float | None = None
    after_s: tuple[float, float] | None = None


def now() -> float:
    return time.monotonic()


def trio_at(t: float) -> float:
    """A time.monotonic() instant on trio's clock."""
    return trio.current_time() + (t - time.monotonic())


@dataclass(eq=False)
class SoakPlan:
    """The soak's settings and the choices and times every part shares."""

    args: argparse.Namespace
    run_id: str
    rooms: list[str]  # the main rooms first; a stopped reader's room is appended
    rng: random.Random
    t0: float = 0.0
    t_quiet: float = 0.0  # clients stop sending
    t_end: float = 0.0  # clients are cancelled
    t_stop: float = 0.0  # they were
    cut: bool = False  # the server went away: stop early

    @property
    def main_rooms(self) -> int:
        return int(self.args.rooms)


@dataclass(eq=False)
class Ledger:
    """Every record and count of the run, and the errors found."""

    msgs: dict[tuple[int, int], MsgRec] = field(default_factory=dict)
    room_msgs: defaultdict[int, list[MsgRec]] = field(default_factory=lambda: defaultdict(list))
    sender_msgs: defaultdict[int, list[MsgRec]] = field(default_factory=lambda: defaultdict(list))
    memberships: list[Membership] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    conns: Counter[str] = field(default_factory=Counter)
    open_conns: int = 0
    max_open_conns: int = 0
    leaves: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    noise_sent: int = 0
    deliveries: int = 0
    noise_received: int = 0
    events: Counter[str] = field(default_factory=Counter)
    mis_runs: Counter[str] = field(default_factory=Counter)
    mis_ok: Counter[str] = field(default_factory=Counter)
    mis_cut: int = 0  # cut short by the deadline
    slow_close_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    ghosts: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str, detail: str | None = None, n: int = 1) -> None:
        self.errors[kind] += n
        if detail is not None and len(self.error_examples[kind]) < 5:
            self.error_examples[kind].append(detail)

    @staticmethod
    def end_membership(m: Membership | None, lo: float, hi: float, how: str) -> None:
        if m is None or m.t_leave_lo is not None:
            return
        m.t_leave_lo, m.t_leave_hi, m.ended = lo, hi, how

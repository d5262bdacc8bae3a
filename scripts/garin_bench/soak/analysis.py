"""After the run: what the records say about loss and room events."""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from garin_bench.soak.records import Ledger, Membership, SoakPlan


def analyse_loss(plan: SoakPlan, ledger: Ledger) -> dict[str, Any]:
    """Messages a member should have received and did not, by the timed rule
    and the gap rule (soak/__init__.py)."""
    settle = plan.args.settle
    expected = delivered = lost_timed = lost_gap = 0
    examples: list[str] = []
    times = {room: [r.t_send for r in recs] for room, recs in ledger.room_msgs.items()}
    tracked = [m for m in ledger.memberships if m.kind == "member" and m.tracked and m.t_join_seen is not None]
    for m in tracked:
        assert m.t_join_seen is not None and m.t_leave_lo is not None
        recs = ledger.room_msgs.get(m.room, [])
        i = bisect.bisect_right(times.get(m.room, []), m.t_join_seen)
        counted: set[tuple[int, int]] = set()
        for rec in recs[i:]:
            if rec.t_send + settle >= m.t_leave_lo:
                break
            if rec.sender == m.cid or rec.uncertain:
                continue
            key = (rec.sender, rec.seq)
            counted.add(key)
            expected += 1
            if key in m.received:
                delivered += 1
            else:
                lost_timed += 1
                if len(examples) < 10:
                    examples.append(f"{m.username} in {plan.rooms[m.room]} (joined {m.t_join_seen - plan.t0:.2f}s, "
                                    f"left {m.t_leave_lo - plan.t0:.2f}s {m.ended}) missed {key} sent "
                                    f"{rec.t_send - plan.t0:.2f}s")
        for sender, last in m.last_seq.items():
            for rec in ledger.sender_msgs[sender]:
                key = (rec.sender, rec.seq)
                if (rec.room == m.room and rec.seq < last and rec.t_send > m.t_join_seen
                        and key not in m.received and key not in counted and not rec.uncertain):
                    lost_gap += 1
                    if len(examples) < 10:
                        examples.append(f"{m.username} in {plan.rooms[m.room]} missed {key} but got seq {last}")
    return {
        "memberships_checked": len(tracked),
        "expected": expected,
        "delivered": delivered,
        "lost": lost_timed + lost_gap,
        "lost_timed_rule": lost_timed,
        "lost_gap_rule": lost_gap,
        "examples": examples,
    }

def analyse_events(plan: SoakPlan, ledger: Ledger) -> dict[str, Any]:
    """Joins and leaves a member present at the time did not see; counted as errors."""
    settle = plan.args.settle
    by_room: dict[int, list[Membership]] = defaultdict(list)
    for m in ledger.memberships:
        if m.t_join_seen is not None and m.room < plan.main_rooms:
            by_room[m.room].append(m)
    expected = missing_joins = missing_leaves = 0
    join_examples: list[str] = []
    leave_examples: list[str] = []
    for members in by_room.values():
        for m in members:
            if m.kind != "member" or not m.tracked:
                continue
            assert m.t_join_seen is not None and m.t_leave_lo is not None
            for u in members:
                if u is m or u.username == m.username:
                    continue
                assert u.t_join_seen is not None
                if m.t_join_seen < u.t_join_sent and u.t_join_seen + settle < m.t_leave_lo:
                    expected += 1
                    if u.username not in m.joins_seen:
                        missing_joins += 1
                        if len(join_examples) < 5:
                            join_examples.append(f"{m.username} never saw {u.username} join {plan.rooms[m.room]}")
                if (u.t_leave_lo is not None and u.t_leave_hi is not None and u.ended != "deadline"
                        and m.t_join_seen < u.t_leave_lo and u.t_leave_hi + settle < m.t_leave_lo):
                    expected += 1
                    if u.username not in m.leaves_seen:
                        missing_leaves += 1
                        if len(leave_examples) < 5:
                            leave_examples.append(f"{m.username} never saw {u.username} leave "
                                                  f"{plan.rooms[m.room]} ({u.ended})")
    if missing_joins:
        ledger.error("join broadcast missing", join_examples[0], missing_joins)
    if missing_leaves:
        ledger.error("userleave broadcast missing", leave_examples[0], missing_leaves)
    return {"expected": expected, "missing_joins": missing_joins, "missing_leaves": missing_leaves,
            "examples": join_examples + leave_examples}

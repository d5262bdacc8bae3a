"""What a soak client receives, checked as it arrives: its own join first,
then room events whose totalUsers follow on from what it saw, and chat
messages that some soak member sent to this room, unaltered, once, in order
per sender, never its own.
"""

from __future__ import annotations

import json
from typing import Any

from garin_bench.soak.records import Conn, Ledger, Membership, SoakPlan


def check_frame(plan: SoakPlan, ledger: Ledger, conn: Conn, text: str | bytes, t: float) -> None:
    """One frame a client received at `t`: the own join, a room event or a chat message."""
    if isinstance(text, bytes):
        ledger.error("binary frame from the server", conn.username)
        return
    try:
        msg = json.loads(text)
        kind = msg["type"]
    except (ValueError, KeyError, TypeError):
        ledger.error("unparsable frame from the server", text[:80])
        return
    ledger.events[str(kind)] += 1
    pending = conn.pending
    if pending is not None and kind == "join" and msg.get("username") == conn.username:
        count = msg.get("totalUsers")
        if not isinstance(count, int) or count < 1:
            ledger.error("own join with a bad totalUsers", repr(count))
            count = 1
        pending.t_join_seen = t
        pending.count = count
        conn.view, conn.pending = pending, None
        pending.joined.set()
        return
    view = conn.view
    if view is None:
        ledger.error("frame before the own join broadcast", f"{conn.username}: {text[:80]}")
        return
    if kind == "message":
        _check_message(plan, ledger, conn, view, msg, t)
    elif kind in ("join", "userleave"):
        username, count = msg.get("username"), msg.get("totalUsers")
        if username == conn.username:
            ledger.error(f"own {kind} broadcast while in the room", conn.username)
            return
        expected = view.count + (1 if kind == "join" else -1)
        if not isinstance(count, int) or count < 1 or count != expected:
            ledger.error("totalUsers inconsistent",
                       f"{conn.username} in {plan.rooms[view.room]}: after {view.count}, {kind} of {username} "
                       f"said {count!r}, expected {expected}")
        if isinstance(count, int):
            view.count = count
        (view.joins_seen if kind == "join" else view.leaves_seen).add(str(username))
    else:
        ledger.error("unknown event type from the server", str(kind)[:40])

def _check_message(plan: SoakPlan, ledger: Ledger, conn: Conn, view: Membership, msg: dict[str, Any], t: float) -> None:
    body = msg.get("body")
    parts = body.split("|", 4) if isinstance(body, str) else []
    if len(parts) < 4 or parts[0] != plan.run_id:
        ledger.error("message that no soak client sent", repr(body)[:80])
        return
    if parts[1] == "n":
        ledger.noise_received += 1
        return
    try:
        key = (int(parts[2]), int(parts[3]))
    except ValueError:
        ledger.error("message that no soak client sent", repr(body)[:80])
        return
    rec = ledger.msgs.get(key)
    if rec is None or rec.body != body:
        ledger.error("message body altered or unknown", repr(body)[:80])
        return
    if rec.sender == conn.cid:
        ledger.error("own message echoed back", conn.username)
        return
    if rec.room != view.room:
        ledger.error("message from another room",
                   f"{conn.username} in {plan.rooms[view.room]} got one for {plan.rooms[rec.room]}")
        return
    if msg.get("username") != f"m{plan.run_id}-{rec.sender}":
        ledger.error("message with the wrong username", repr(msg.get("username")))
    if key in view.received:
        ledger.error("duplicate delivery", f"{conn.username} got {key} twice")
        return
    view.received[key] = t
    last = view.last_seq.get(rec.sender, -1)
    if rec.seq < last:
        ledger.error("out of order (per sender)", f"{conn.username}: {key} after seq {last}")
    else:
        view.last_seq[rec.sender] = rec.seq
    ledger.deliveries += 1
    ledger.latencies.append(t - rec.t_send)

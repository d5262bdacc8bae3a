"""router.outbox: what a router holds for a dead shard and replays to its successor."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from garin import wire
from garin.wire import Join, Leave, Publish, Rejoin, Replayed
from router.outbox import LinkState, Outbox, Verdict
from shard.rooms import Rooms

MIB = 1024 * 1024


def decode(data: bytes | bytearray | None) -> list[wire.WireMessage]:
    assert data is not None
    return list(wire.Decoder().feed(bytes(data)))


def up_outbox(max_bytes: int = MIB, timeout: float = 10.0) -> Outbox:
    outbox = Outbox(max_bytes, timeout, now=0.0)
    outbox.link_up()
    assert decode(outbox.take()) == [Replayed()]
    outbox.sent()
    return outbox


def deliver(outbox: Outbox) -> list[wire.WireMessage]:
    """The writer sends everything queued, and it arrives."""
    messages = decode(outbox.take())
    outbox.sent()
    return messages


# -- states ------------------------------------------------------------------------


def test_a_new_outbox_holds_until_the_first_link() -> None:
    outbox = Outbox(MIB, 10.0, now=100.0)
    assert outbox.state is LinkState.DOWN
    assert outbox.deadline == 110.0
    assert outbox.add(Join(1, "lobby", "alice")) is Verdict.QUEUED
    assert outbox.take() is None  # nothing is written while down
    outbox.link_up()
    assert outbox.state is LinkState.UP and outbox.deadline is None
    assert deliver(outbox) == [Replayed(), Join(1, "lobby", "alice")]
    assert outbox.take() is None


def test_batches_carry_everything_queued_in_order() -> None:
    outbox = up_outbox()
    messages = [Join(1, "lobby", "alice"), Publish(1, "hi"), Publish(1, "there"), Leave(1)]
    for message in messages:
        assert outbox.add(message) is Verdict.QUEUED
    assert outbox.queued_bytes == sum(len(wire.encode(m)) for m in messages)
    assert deliver(outbox) == messages
    assert outbox.queued_bytes == 0


def test_one_batch_in_flight_at_a_time() -> None:
    outbox = up_outbox()
    outbox.add(Publish(1, "a"))
    assert outbox.take() is not None
    outbox.add(Publish(1, "b"))
    assert outbox.take() is None
    outbox.sent()
    assert decode(outbox.take()) == [Publish(1, "b")]


# -- replay --------------------------------------------------------------------------


def test_replay_rejoins_confirmed_members_then_joins_the_unconfirmed() -> None:
    outbox = up_outbox()
    outbox.add(Join(1, "lobby", "alice"))
    outbox.add(Join(2, "lobby", "bobby"))
    outbox.add(Join(3, "attic", "carol"))
    deliver(outbox)
    outbox.confirm(1, "lobby")
    outbox.confirm(3, "attic")
    assert outbox.link_down(5.0) is False
    assert outbox.state is LinkState.DOWN and outbox.deadline == 15.0
    outbox.link_up()
    assert deliver(outbox) == [
        Rejoin(1, "lobby", "alice"), Rejoin(3, "attic", "carol"), Replayed(), Join(2, "lobby", "bobby"),
    ]
    # The replay is what the next shard knows: a second restart replays it again.
    outbox.link_down(6.0)
    outbox.link_up()
    assert deliver(outbox) == [
        Rejoin(1, "lobby", "alice"), Rejoin(3, "attic", "carol"), Replayed(), Join(2, "lobby", "bobby"),
    ]


def test_confirm_ignores_other_rooms_and_unknown_members() -> None:
    outbox = up_outbox()
    outbox.add(Join(1, "lobby", "alice"))
    deliver(outbox)
    outbox.confirm(1, "attic")
    outbox.confirm(9, "lobby")
    outbox.link_down(0.0)
    outbox.link_up()
    assert deliver(outbox) == [Replayed(), Join(1, "lobby", "alice")]


def test_events_held_during_the_outage_follow_the_replay() -> None:
    outbox = up_outbox()
    outbox.add(Join(1, "lobby", "alice"))
    deliver(outbox)
    outbox.confirm(1, "lobby")
    outbox.link_down(0.0)
    # alice talks, then moves to another room while the shard is down.
    for message in (Publish(1, "in the lobby"), Leave(1), Join(1, "attic", "alice"), Publish(1, "upstairs")):
        assert outbox.add(message) is Verdict.QUEUED
    outbox.link_up()
    assert deliver(outbox) == [
        Rejoin(1, "lobby", "alice"), Replayed(),
        Publish(1, "in the lobby"), Leave(1), Join(1, "attic", "alice"), Publish(1, "upstairs"),
    ]


def test_a_batch_refused_whole_is_sent_again_after_the_restart() -> None:
    outbox = up_outbox()
    outbox.add(Join(1, "lobby", "alice"))
    deliver(outbox)
    outbox.confirm(1, "lobby")
    outbox.add(Publish(1, "hi"))
    outbox.add(Leave(1))
    outbox.add(Join(1, "attic", "alice"))
    assert outbox.take() is not None
    # The socket took none of it: the shard was already dead.
    outbox.link_down(0.0)
    outbox.add(Publish(1, "held"))
    outbox.link_up()
    # alice is replayed where the dead shard had her, so "hi" reaches the lobby.
    assert deliver(outbox) == [
        Rejoin(1, "lobby", "alice"), Replayed(),
        Publish(1, "hi"), Leave(1), Join(1, "attic", "alice"), Publish(1, "held"),
    ]


def test_a_batch_partly_written_counts_as_sent() -> None:
    outbox = up_outbox()
    outbox.add(Join(1, "lobby", "alice"))
    outbox.add(Publish(1, "lost with the shard"))
    outbox.add(Join(2, "lobby", "bobby"))
    outbox.add(Leave(2))
    assert outbox.take() is not None
    outbox.sent()
    outbox.link_down(0.0)
    outbox.link_up()
    # The dead shard may never have applied alice's join: it is announced again.
    assert deliver(outbox) == [Replayed(), Join(1, "lobby", "alice")]


def test_queued_publishes_are_those_not_yet_in_the_socket() -> None:
    outbox = up_outbox()
    outbox.add(Publish(1, "a"))
    outbox.add(Publish(1, "b"))
    outbox.add(Publish(2, "c"))
    assert (outbox.queued_publishes(1), outbox.queued_publishes(2), outbox.queued_publishes(3)) == (2, 1, 0)
    assert outbox.take() is not None
    outbox.add(Publish(1, "d"))
    # The batch being written still counts: a drop would queue it again.
    assert outbox.queued_publishes(1) == 3
    outbox.link_down(0.0)
    assert (outbox.queued_publishes(1), outbox.queued_publishes(2)) == (3, 1)
    outbox.link_up()
    assert [m for m in deliver(outbox) if isinstance(m, Publish)] == [
        Publish(1, "a"), Publish(1, "b"), Publish(2, "c"), Publish(1, "d"),
    ]
    assert (outbox.queued_publishes(1), outbox.queued_publishes(2)) == (0, 0)
    # Held past the bound: dropped, and no longer counted.
    small = up_outbox(max_bytes=30)
    small.link_down(0.0)
    small.add(Publish(1, "x"))
    assert small.queued_publishes(1) == 1
    assert small.add(Publish(1, "y" * 40)) is Verdict.OVERFLOW
    assert small.queued_publishes(1) == 0


# -- bounds --------------------------------------------------------------------------


def test_holding_past_the_byte_bound_gives_up() -> None:
    outbox = up_outbox(max_bytes=100)
    outbox.add(Join(1, "lobby", "alice"))
    deliver(outbox)
    outbox.link_down(0.0)
    assert outbox.add(Publish(1, "x" * 50)) is Verdict.QUEUED
    assert outbox.add(Publish(1, "y" * 50)) is Verdict.OVERFLOW
    assert outbox.state is LinkState.UNAVAILABLE
    assert outbox.queued_bytes == 0 and outbox.deadline is None
    assert outbox.add(Join(2, "lobby", "bobby")) is Verdict.REFUSED
    assert outbox.add(Leave(1)) is Verdict.REFUSED
    assert outbox.expire(1e9) is False
    # Back: nothing is replayed (its clients were closed), and events flow again.
    outbox.link_up()
    assert outbox.state is LinkState.UP
    assert outbox.add(Join(3, "lobby", "carol")) is Verdict.QUEUED
    assert deliver(outbox) == [Replayed(), Join(3, "lobby", "carol")]


def test_the_byte_bound_applies_only_while_down() -> None:
    outbox = up_outbox(max_bytes=10)
    for _ in range(10):
        # A slow but live shard is not a hold.
        assert outbox.add(Publish(1, "x" * 50)) is Verdict.QUEUED
    # Losing it with that much queued starts the hold past its bound.
    assert outbox.link_down(0.0) is True
    assert outbox.state is LinkState.UNAVAILABLE


def test_link_down_with_more_queued_than_the_bound_gives_up_at_once() -> None:
    outbox = up_outbox(max_bytes=100)
    outbox.add(Publish(1, "x" * 200))
    assert outbox.take() is not None
    assert outbox.link_down(0.0) is True
    assert outbox.state is LinkState.UNAVAILABLE and outbox.queued_bytes == 0


@pytest.mark.parametrize("held", [False, True])
def test_the_hold_runs_out_of_time(held: bool) -> None:
    outbox = up_outbox(timeout=10.0)
    outbox.link_down(50.0)
    if held:
        outbox.add(Publish(1, "waiting"))
    assert outbox.expire(59.9) is False
    assert outbox.state is LinkState.DOWN
    assert outbox.expire(60.0) is True
    assert outbox.state is LinkState.UNAVAILABLE and outbox.queued_bytes == 0
    assert outbox.expire(61.0) is False  # it runs out once


def test_expire_does_nothing_while_up() -> None:
    outbox = up_outbox(timeout=0.0)
    assert outbox.expire(1e9) is False
    assert outbox.state is LinkState.UP


def test_zero_bounds_hold_nothing() -> None:
    outbox = up_outbox(max_bytes=0, timeout=0.0)
    outbox.link_down(7.0)
    assert outbox.add(Leave(1)) is Verdict.OVERFLOW
    outbox.link_up()
    deliver(outbox)
    assert outbox.link_down(8.0) is False
    assert outbox.expire(8.0) is True


# -- model: a shard that keeps dying -------------------------------------------------

ROOMS = ["lobby", "attic"]
LINK = 7

Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "publish", "flush", "crash-idle", "crash-refused", "crash-partial", "restart"]),
        st.integers(0, 1),
        st.integers(0, len(ROOMS) - 1),
    ),
    max_size=60,
)


@settings(max_examples=500, deadline=None)
@given(ops)
# A member known to the shard talks, then moves; the batch with all that is
# refused by the dead shard's socket.
@example([("join", 0, 0), ("flush", 0, 0), ("publish", 0, 0), ("leave", 0, 0), ("join", 0, 1),
          ("crash-refused", 0, 0), ("restart", 0, 0)])
def test_a_restarted_shard_ends_with_the_routers_membership(script: list[Op]) -> None:
    """Whatever the crashes, once the link is up and flushed the shard's rooms
    hold exactly the router's members, and every message it applied reached
    the room its sender was in when sending it."""
    outbox = up_outbox()
    shard = Rooms()
    alive = True
    members: dict[int, str] = {}  # the router's truth: member -> room
    published = 0

    def apply(messages: list[wire.WireMessage]) -> None:
        for message in messages:
            if isinstance(message, Join):
                out = shard.join(LINK, message.member, message.room, message.username)
            elif isinstance(message, Rejoin):
                out = shard.rejoin(LINK, message.member, message.room, message.username)
            elif isinstance(message, Leave):
                out = shard.leave(LINK, message.member)
            elif isinstance(message, Publish):
                out = shard.publish(LINK, message.member, message.body)
                for _, event in out:
                    assert isinstance(event, wire.Deliver)
                    assert json.loads(event.text)["body"].split("#")[0] == event.room
            else:
                assert isinstance(message, Replayed)
                out = []
            for _, event in out:
                if isinstance(event, wire.Joined):
                    outbox.confirm(event.member, event.room)

    def flush() -> None:
        if alive and outbox.state is LinkState.UP:
            counted = {member: outbox.queued_publishes(member) for member in (0, 1)}
            batch = outbox.take()
            if batch is not None:
                outbox.sent()
                messages = decode(batch)
                assert counted == {
                    member: sum(1 for m in messages if isinstance(m, Publish) and m.member == member)
                    for member in (0, 1)
                }
                assert (outbox.queued_publishes(0), outbox.queued_publishes(1)) == (0, 0)
                apply(messages)

    for op, member, room_index in script:
        room = ROOMS[room_index]
        if op == "join" and member not in members:
            members[member] = room
            outbox.add(Join(member, room, f"user{member}"))
        elif op == "leave" and member in members:
            del members[member]
            outbox.add(Leave(member))
        elif op == "publish" and member in members:
            published += 1
            outbox.add(Publish(member, f"{members[member]}#{published}"))
        elif op == "flush":
            flush()
        elif op.startswith("crash") and alive:
            alive = False
            shard = Rooms()
            if outbox.state is LinkState.UP:
                if op == "crash-refused":
                    outbox.take()  # written into nothing: the socket refused it whole
                elif op == "crash-partial" and outbox.take() is not None:
                    outbox.sent()  # part reached the shard before it died, unapplied
                outbox.link_down(0.0)
        elif op == "restart" and not alive:
            alive = True
            outbox.link_up()
    if not alive:
        alive = True
        outbox.link_up()
    flush()
    assert {m: shard.room_of(LINK, m) for m in members} == members
    assert shard.members() == len(members)

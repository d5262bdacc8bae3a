"""shard.rooms: solo rooms, and joins held while a solo router gives its room back."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin.protocol import join_text, message_text, userleave_text
from garin.wire import (
    Accept, Deliver, Hello, Join, Joined, Leave, Offer, Publish, Rejoin, Released, Revoke, SoloFrom, WireError,
)
from shard.rooms import Rooms

L1, L2, L3 = 1, 2, 3


def solo_lobby() -> Rooms:
    """lobby, created by alice (L1 m1), with bob (L1 m2): solo on L1."""
    rooms = Rooms()
    assert rooms.handle(L1, Join(1, "lobby", "alice"), 0.0) == [
        (L1, Joined("lobby", 1, join_text("alice", 1), solo=True))]
    assert rooms.handle(L1, Join(2, "lobby", "bob"), 0.0) == [
        (L1, Joined("lobby", 2, join_text("bob", 2), solo=True))]
    return rooms


def test_a_room_is_solo_for_the_link_that_creates_it() -> None:
    rooms = solo_lobby()
    assert rooms.rooms["lobby"].solo == L1
    # Messages sent through the shard anyway still reach the link.
    assert rooms.handle(L1, Publish(2, "hi"), 0.0) == [(L1, Deliver("lobby", 2, message_text("bob", "hi")))]


def test_a_join_from_another_link_waits_for_the_release() -> None:
    rooms = solo_lobby()
    assert rooms.handle(L2, Join(1, "lobby", "carol"), 10.0) == [(L1, Revoke("lobby", 1))]
    # Not a member yet: the solo router may still be fanning out without her.
    assert rooms.room_of(L2, 1) is None and rooms.members() == 2
    # Her later events wait behind the join, in order.
    assert rooms.handle(L2, Publish(1, "first"), 10.1) == []
    assert rooms.handle(L2, Publish(1, "second"), 10.2) == []
    out = rooms.handle(L1, Released("lobby", 1), 10.3)
    joined = join_text("carol", 3)
    first, second = message_text("carol", "first"), message_text("carol", "second")
    assert out == [
        (L1, Deliver("lobby", -1, joined)), (L2, Joined("lobby", 1, joined, solo=False)),
        (L1, Deliver("lobby", -1, first)), (L2, Deliver("lobby", 1, first)),
        (L1, Deliver("lobby", -1, second)), (L2, Deliver("lobby", 1, second)),
    ]
    room = rooms.rooms["lobby"]
    assert room.solo is None and room.held is None
    # Never solo again while the room lives, even with L1's members alone.
    rooms.handle(L2, Leave(1), 11.0)
    assert rooms.handle(L1, Join(3, "lobby", "dave"), 11.0) == [
        (L1, Joined("lobby", 3, join_text("dave", 3), solo=False))]


def test_one_revoke_for_many_held_joins() -> None:
    rooms = solo_lobby()
    assert rooms.handle(L2, Join(1, "lobby", "carol"), 0.0) == [(L1, Revoke("lobby", 1))]
    assert rooms.handle(L3, Join(1, "lobby", "dave"), 0.0) == []
    assert rooms.handle(L2, Join(2, "lobby", "erin"), 0.0) == []
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    assert [(link, m.member, m.text) for link, m in out if isinstance(m, Joined)] == [
        (L2, 1, join_text("carol", 3)), (L3, 1, join_text("dave", 4)), (L2, 2, join_text("erin", 5))]
    assert rooms.members() == 5


def test_the_solo_link_goes_on_while_it_is_asked() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    # L1 has not seen the Revoke yet: its events apply at once, to L1 only.
    assert rooms.handle(L1, Publish(1, "hi"), 0.0) == [(L1, Deliver("lobby", 1, message_text("alice", "hi")))]
    assert rooms.handle(L1, Join(3, "lobby", "dave"), 0.0) == [
        (L1, Joined("lobby", 3, join_text("dave", 3), solo=False))]
    assert rooms.handle(L1, Leave(2), 0.0) == [(L1, Deliver("lobby", -1, userleave_text("bob", 2)))]
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    assert out == [(L1, Deliver("lobby", -1, join_text("carol", 3))),
                   (L2, Joined("lobby", 1, join_text("carol", 3), solo=False))]


def test_a_room_emptied_while_asked_goes_to_the_first_held_joiner() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    rooms.handle(L3, Join(1, "lobby", "dave"), 0.0)
    assert rooms.handle(L1, Leave(1), 0.0) == [(L1, Deliver("lobby", -1, userleave_text("alice", 1)))]
    assert rooms.handle(L1, Leave(2), 0.0) == []
    assert "lobby" in rooms.rooms  # kept for the held joins
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    # carol creates the room anew (solo on L2); dave's join then asks L2.
    assert out == [(L2, Joined("lobby", 1, join_text("carol", 1), solo=True)), (L2, Revoke("lobby", 2))]
    assert rooms.handle(L2, Released("lobby", 2), 0.0) == [
        (L2, Deliver("lobby", -1, join_text("dave", 2))),
        (L3, Joined("lobby", 1, join_text("dave", 2), solo=False))]


def test_a_held_member_that_leaves_before_the_release() -> None:
    rooms = solo_lobby()
    rooms.handle(L1, Join(5, "den", "zed"), 0.0)
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    assert rooms.handle(L2, Leave(1), 0.0) == []
    # A join elsewhere also waits: her events stay in order.
    assert rooms.handle(L2, Join(1, "den", "carol"), 0.0) == []
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    assert out == [
        (L1, Deliver("lobby", -1, join_text("carol", 3))), (L2, Joined("lobby", 1, join_text("carol", 3), solo=False)),
        (L1, Deliver("lobby", -1, userleave_text("carol", 2))),
        (L1, Offer("lobby", 2)),  # all of lobby is on L1 again
        (L1, Revoke("den", 3)),  # den is solo on L1 too
    ]
    assert rooms.room_of(L2, 1) is None
    out = rooms.handle(L1, Released("den", 3), 0.0)
    assert out == [(L1, Deliver("den", -1, join_text("carol", 2))), (L2, Joined("den", 1, join_text("carol", 2), solo=False))]


def test_the_solo_link_dropping_releases_its_rooms() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    rooms.handle(L2, Publish(1, "hello?"), 0.0)
    out = rooms.drop_link(L1, 1.0)
    assert out == [
        (L1, Deliver("lobby", -1, userleave_text("alice", 1))),  # the shell skips a gone link
        (L2, Joined("lobby", 1, join_text("carol", 1), solo=True)),
        (L2, Deliver("lobby", 1, message_text("carol", "hello?"))),
    ]
    assert rooms.members() == 1 and rooms.rooms["lobby"].solo == L2


def test_a_held_link_dropping_forgets_its_held_events() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    rooms.handle(L3, Join(1, "lobby", "dave"), 0.0)
    assert rooms.drop_link(L2, 0.0) == []
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    assert out == [(L1, Deliver("lobby", -1, join_text("dave", 3))), (L3, Joined("lobby", 1, join_text("dave", 3), solo=False))]
    assert rooms.room_of(L2, 1) is None


@pytest.mark.parametrize(
    ("link", "room", "no"),
    [(L1, "den", 1), (L2, "lobby", 1), (L1, "nowhere", 1), (L1, "lobby", 7)],
    ids=["not asked", "not its room", "unknown", "another revocation"],
)
def test_a_stale_release_changes_nothing(link: int, room: str, no: int) -> None:
    rooms = solo_lobby()
    rooms.handle(L1, Join(5, "den", "zed"), 0.0)
    rooms.handle(L3, Join(1, "lobby", "carol"), 0.0)
    assert rooms.handle(link, Released(room, no), 0.0) == []
    assert rooms.rooms["lobby"].held is not None and rooms.rooms["den"].solo == L1


def test_an_answer_replayed_after_a_relink_does_not_end_a_newer_revocation() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)  # Revoke 1 to L1
    # L1 answers, but its link drops before the answer is written: the shard
    # ends the revocation itself.
    rooms.drop_link(L1, 0.0)
    rooms.handle(L2, Leave(1), 0.0)
    # L1 relinks as link L3 and re-creates lobby; its old answer is replayed.
    rooms.handle(L3, Join(9, "lobby", "alice"), 0.0)
    assert rooms.handle(L2, Join(2, "lobby", "dave"), 0.0) == [(L3, Revoke("lobby", 2))]
    assert rooms.handle(L3, Released("lobby", 1), 0.0) == []
    assert rooms.room_of(L2, 2) is None  # still held
    assert [link for link, _ in rooms.handle(L3, Released("lobby", 2), 0.0)] == [L3, L2]
    assert rooms.room_of(L2, 2) == "lobby"


def test_a_rejoin_into_a_solo_room_is_applied_and_revokes_it() -> None:
    rooms = solo_lobby()
    # L2's link came back: its member is replayed, never announced.
    assert rooms.handle(L2, Rejoin(1, "lobby", "carol"), 0.0) == [(L1, Revoke("lobby", 1))]
    assert rooms.room_of(L2, 1) == "lobby"
    # A new join still waits for the release.
    assert rooms.handle(L3, Join(1, "lobby", "dave"), 0.0) == []
    out = rooms.handle(L1, Released("lobby", 1), 0.0)
    assert {link for link, _ in out} == {L1, L2, L3}
    assert rooms.members() == 4 and rooms.rooms["lobby"].solo is None


def test_a_room_rebuilt_from_one_links_replay_is_offered_to_it() -> None:
    rooms = Rooms()  # a restarted shard
    assert rooms.handle(L1, Rejoin(1, "lobby", "alice"), 0.0) == [(L1, Offer("lobby", 1))]
    assert rooms.handle(L1, Rejoin(2, "lobby", "bob"), 0.0) == []
    # Until it accepts, the room is the shard's: a message still comes back.
    assert rooms.handle(L1, Publish(1, "hi"), 0.0) == [(L1, Deliver("lobby", 1, message_text("alice", "hi")))]
    assert rooms.handle(L1, Accept("lobby", 1), 0.0) == [(L1, SoloFrom("lobby", 1))]
    assert rooms.rooms["lobby"].solo == L1
    assert rooms.handle(L1, Join(3, "lobby", "carol"), 0.0) == [
        (L1, Joined("lobby", 3, join_text("carol", 3), solo=True))]


def test_an_offer_is_cancelled_by_another_links_member() -> None:
    rooms = Rooms()
    rooms.handle(L1, Rejoin(1, "lobby", "alice"), 0.0)  # Offer 1 to L1
    assert rooms.handle(L2, Rejoin(1, "lobby", "bob"), 0.0) == []
    assert rooms.handle(L1, Accept("lobby", 1), 0.0) == []
    assert rooms.rooms["lobby"].solo is None
    # bob leaves: all of lobby is on L1 again, a new offer; the old one is void.
    assert rooms.handle(L2, Leave(1), 0.0) == [
        (L1, Deliver("lobby", -1, userleave_text("bob", 1))), (L1, Offer("lobby", 2))]
    assert rooms.handle(L1, Accept("lobby", 1), 0.0) == []
    rooms.handle(L3, Join(1, "lobby", "carol"), 0.0)  # cancels offer 2 as well
    assert rooms.handle(L1, Accept("lobby", 2), 0.0) == []
    assert rooms.rooms["lobby"].solo is None


def test_a_room_left_to_one_link_is_offered_and_taken_back_as_usual() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    rooms.handle(L1, Released("lobby", 1), 0.0)
    out = rooms.handle(L2, Leave(1), 0.0)
    assert out[-1] == (L1, Offer("lobby", 2))
    assert rooms.handle(L1, Accept("lobby", 2), 0.0) == [(L1, SoloFrom("lobby", 2))]
    # Solo again: another link's join waits for a release, as for a new room.
    assert rooms.handle(L3, Join(1, "lobby", "dave"), 0.0) == [(L1, Revoke("lobby", 3))]


def test_overdue_names_links_that_did_not_answer() -> None:
    rooms = solo_lobby()
    rooms.handle(L3, Join(1, "den", "dave"), 0.0)
    rooms.handle(L2, Join(1, "lobby", "carol"), 100.0)
    rooms.handle(L2, Join(2, "den", "erin"), 102.0)
    assert rooms.overdue(104.0, 5.0) == []
    assert rooms.overdue(105.5, 5.0) == [L1]
    assert rooms.overdue(107.5, 5.0) == [L1, L3]
    rooms.handle(L1, Released("lobby", 1), 108.0)
    assert rooms.overdue(108.0, 5.0) == [L3]


def test_a_router_cannot_send_shard_messages() -> None:
    with pytest.raises(WireError, match="unexpected Hello"):
        Rooms().handle(L1, Hello(3, "r", 0, 1, "crc32"), 0.0)


# --- property: any interleaving, answers delayed --------------------------------------------

SOLO_OPS = st.lists(
    st.tuples(
        st.sampled_from(["join", "join", "rejoin", "publish", "leave", "release", "release", "accept"]),
        st.integers(1, 3),  # link
        st.integers(0, 2),  # member
        st.sampled_from(["r0", "r1"]),
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(ops=SOLO_OPS)
def test_solo_rooms_under_any_interleaving(ops: list[tuple[str, int, int, str]]) -> None:
    rooms = Rooms()
    # Revokes each link has received and not answered yet, oldest first.
    asked: dict[int, collections.deque[tuple[str, int]]] = collections.defaultdict(collections.deque)
    offers: dict[int, collections.deque[tuple[str, int]]] = collections.defaultdict(collections.deque)
    # Each member's own events, to compute where it must end up.
    own: dict[tuple[int, int], list[Join | Rejoin | Leave]] = collections.defaultdict(list)

    def run(link: int, event: Join | Rejoin | Publish | Leave | Released | Accept) -> None:
        before = {name: room.solo for name, room in rooms.rooms.items()}
        out = rooms.handle(link, event, 0.0)
        for to, message in out:
            if isinstance(message, Revoke):
                asked[to].append((message.room, message.no))
            elif isinstance(message, Offer):
                offers[to].append((message.room, message.no))
            elif isinstance(message, Joined) and not isinstance(event, Released):
                # No join is applied to a room another link fans out.
                assert before.get(message.room) in (None, to)
        for room in rooms.rooms.values():
            if room.solo is not None and room.held is None:
                assert set(room.per_link) <= {room.solo}, room
            assert (room.held is not None) == (rooms._revoking.get(room.name) is room)

    for op, link, member, name in ops:
        if op == "release":
            if asked[link]:
                run(link, Released(*asked[link].popleft()))
            continue
        if op == "accept":
            if offers[link]:
                run(link, Accept(*offers[link].popleft()))
            continue
        event: Join | Rejoin | Publish | Leave
        if op == "join":
            event = Join(member, name, f"u{link}.{member}")
        elif op == "rejoin":
            event = Rejoin(member, name, f"u{link}.{member}")
        elif op == "publish":
            event = Publish(member, "b")
        else:
            event = Leave(member)
        if not isinstance(event, Publish):
            own[(link, member)].append(event)
        run(link, event)

    while any(asked.values()):
        for link in list(asked):
            if asked[link]:
                run(link, Released(*asked[link].popleft()))
    assert not rooms._held and not rooms._revoking
    assert all(room.held is None for room in rooms.rooms.values())
    # Holding never reordered or lost a member's own events.
    for key, events in own.items():
        where: str | None = None
        for event in events:
            if isinstance(event, Leave):
                where = None
            elif isinstance(event, Join) or where is None:
                where = event.room
        assert rooms.room_of(*key) == where, (key, events)


def test_a_dropped_link_does_not_get_its_rooms_offered_to_the_others() -> None:
    # The router that went away is probably relinking: its replayed members
    # would have to take the room back from a solo router at once.
    rooms = solo_lobby()
    rooms.handle(L2, Join(1, "lobby", "carol"), 0.0)
    rooms.handle(L1, Released("lobby", 1), 0.0)
    assert rooms.drop_link(L2, 0.0) == [(L1, Deliver("lobby", -1, userleave_text("carol", 2)))]
    assert rooms.rooms["lobby"].offered_to is None


def test_a_room_left_to_one_link_by_a_revocation_is_offered() -> None:
    rooms = solo_lobby()
    rooms.handle(L2, Rejoin(1, "lobby", "carol"), 0.0)  # Revoke 1; carol is in at once
    # carol leaves while L1 has not answered: no offer while it is being asked.
    assert rooms.handle(L2, Leave(1), 0.0) == [(L1, Deliver("lobby", -1, userleave_text("carol", 2)))]
    assert rooms.handle(L1, Released("lobby", 1), 0.0) == [(L1, Offer("lobby", 2))]

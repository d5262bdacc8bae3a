"""shard.rooms: membership and fan-out decisions for one shard.

Joins go through `handle()` with every `Revoke` answered at once (`join()`
below), as a router does; tests/unit/test_solo.py covers what happens while
an answer is outstanding."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin.protocol import join_text, message_text, userleave_text
from garin.wire import Deliver, Join, Joined, Rejoin, Released, Revoke, WireMessage
from shard.rooms import Outgoing, Rooms

L1, L2, L3 = 1, 2, 3


def by_link(out: list[Outgoing]) -> dict[int, list[WireMessage]]:
    """What each link gets, in order (order across links does not matter)."""
    grouped: dict[int, list[WireMessage]] = defaultdict(list)
    for link, message in out:
        grouped[link].append(message)
    return dict(grouped)


@pytest.fixture(autouse=True, scope="module")
def no_offers() -> Iterator[None]:
    """Offers of solo to a room's last link are tests/unit/test_solo.py's
    subject; here they would only clutter every leave's output."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Rooms, "_offer", lambda self, room: [])
        yield


def settle(rooms: Rooms, out: list[Outgoing]) -> list[Outgoing]:
    """Answer every `Revoke` in `out` as the router would; what else was sent."""
    done: list[Outgoing] = []
    while out:
        link, message = out.pop(0)
        if isinstance(message, Revoke):
            out.extend(rooms.handle(link, Released(message.room, message.no), 0.0))
        else:
            done.append((link, message))
    return done


def join(rooms: Rooms, link: int, member: int, room: str, username: str) -> list[Outgoing]:
    return settle(rooms, rooms.handle(link, Join(member, room, username), 0.0))


def rejoin(rooms: Rooms, link: int, member: int, room: str, username: str) -> list[Outgoing]:
    return settle(rooms, rooms.handle(link, Rejoin(member, room, username), 0.0))


def populated() -> Rooms:
    """lobby: alice (L1 m1), bob (L1 m2), carol (L2 m1); den: dave (L3 m7)."""
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    join(rooms, L1, 2, "lobby", "bob")
    join(rooms, L2, 1, "lobby", "carol")
    join(rooms, L3, 7, "den", "dave")
    return rooms


def check_invariants(rooms: Rooms) -> None:
    total = 0
    for name, room in rooms.rooms.items():
        assert room.name == name
        assert room.usernames, "empty rooms are dropped"
        per_link: dict[int, int] = defaultdict(int)
        for link, _member in room.usernames:
            per_link[link] += 1
        assert room.per_link == dict(per_link)
        total += len(room.usernames)
        assert room.held is None, "every Revoke was answered"
        if room.solo is not None:
            assert set(room.per_link) == {room.solo}, "a solo room's members are on its link"
    assert rooms.members() == total
    assert len(rooms) == len(rooms.rooms)


# --- join ----------------------------------------------------------------------------


def test_empty() -> None:
    rooms = Rooms()
    assert len(rooms) == 0 and rooms.members() == 0
    assert rooms.room_of(L1, 1) is None


def test_first_join() -> None:
    rooms = Rooms()
    out = join(rooms, L1, 1, "lobby", "alice")
    # A new room: all its members are on L1, whose router may fan it out itself.
    assert out == [(L1, Joined("lobby", 1, join_text("alice", 1), solo=True))]
    assert rooms.room_of(L1, 1) == "lobby"
    assert len(rooms) == 1 and rooms.members() == 1


def test_second_join_same_link_is_one_message() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    out = join(rooms, L1, 2, "lobby", "bob")
    # The router sends the text to all its members of the room, bob included.
    assert out == [(L1, Joined("lobby", 2, join_text("bob", 2), solo=True))]


def test_join_from_another_link() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    join(rooms, L1, 2, "lobby", "bob")
    out = join(rooms, L2, 1, "lobby", "carol")
    text = join_text("carol", 3)
    assert by_link(out) == {
        L1: [Deliver("lobby", -1, text)],
        L2: [Joined("lobby", 1, text)],
    }


def test_join_text_is_built_once() -> None:
    rooms = populated()
    out = join(rooms, L3, 9, "lobby", "erin")
    assert len(out) == 3
    assert len({id(message.text) for _, message in out}) == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_total_users_counts_every_link(n: int) -> None:
    rooms = Rooms()
    for i in range(n):
        out = join(rooms, i % 3, i, "lobby", f"user{i}")
        for _, message in out:
            assert message.text == join_text(f"user{i}", i + 1)  # type: ignore[union-attr]
        links = {i2 % 3 for i2 in range(i + 1)}
        assert {link for link, _ in out} == links
        assert [m for link, m in out if isinstance(m, Joined)] == [
            # Solo only until a second link joins.
            Joined("lobby", i, join_text(f"user{i}", i + 1), solo=i == 0)
        ]
        assert all(m.exclude == -1 for _, m in out if isinstance(m, Deliver))
    assert rooms.members() == n


def test_duplicate_join_is_a_no_op() -> None:
    rooms = populated()
    assert join(rooms, L1, 1, "lobby", "alice") == []
    assert join(rooms, L1, 1, "lobby", "renamed") == []
    assert rooms.members() == 4
    assert rooms.rooms["lobby"].usernames[(L1, 1)] == "alice"
    check_invariants(rooms)


def test_same_member_id_on_different_links_is_different_members() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    out = join(rooms, L2, 1, "lobby", "bob")
    assert out != []
    assert rooms.members() == 2
    assert rooms.room_of(L1, 1) == rooms.room_of(L2, 1) == "lobby"


def test_join_another_room_leaves_the_first() -> None:
    rooms = populated()
    out = join(rooms, L1, 1, "den", "alice")
    assert by_link(out) == {
        # lobby hears that alice left (2 remain: bob on L1, carol on L2) ...
        L1: [Deliver("lobby", -1, userleave_text("alice", 2)),
             # ... then den hears her join.
             Joined("den", 1, join_text("alice", 2))],
        L2: [Deliver("lobby", -1, userleave_text("alice", 2))],
        L3: [Deliver("den", -1, join_text("alice", 2))],
    }
    # The leave comes before the join on L1.
    l1 = [m for link, m in out if link == L1]
    assert isinstance(l1[0], Deliver) and isinstance(l1[1], Joined)
    assert rooms.room_of(L1, 1) == "den"
    assert rooms.members() == 4
    check_invariants(rooms)


def test_moving_out_of_a_room_alone_drops_it() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    out = join(rooms, L1, 1, "den", "alice")
    assert out == [(L1, Joined("den", 1, join_text("alice", 1), solo=True))]
    assert "lobby" not in rooms.rooms
    assert len(rooms) == 1


# --- rejoin (replay after a link comes back) ---------------------------------------------


def test_rejoin_is_silent() -> None:
    rooms = Rooms()
    assert rejoin(rooms, L1, 1, "lobby", "alice") == []
    assert rejoin(rooms, L1, 2, "lobby", "bob") == []
    assert rejoin(rooms, L2, 1, "lobby", "carol") == []
    assert rooms.members() == 3 and rooms.room_of(L2, 1) == "lobby"
    check_invariants(rooms)
    # The counts include replayed members.
    out = join(rooms, L3, 1, "lobby", "dave")
    assert {m.text for _, m in out} == {join_text("dave", 4)}  # type: ignore[union-attr]


def test_rejoin_of_a_known_member_changes_nothing() -> None:
    rooms = populated()
    assert rejoin(rooms, L1, 1, "lobby", "alice") == []
    assert rooms.members() == 4
    check_invariants(rooms)


def test_join_after_rejoin_is_a_no_op() -> None:
    rooms = Rooms()
    rejoin(rooms, L1, 1, "lobby", "alice")
    assert join(rooms, L1, 1, "lobby", "alice") == []


def test_rejoined_members_publish_and_hear() -> None:
    rooms = Rooms()
    rejoin(rooms, L1, 1, "lobby", "alice")
    rejoin(rooms, L2, 1, "lobby", "bob")
    out = rooms.publish(L1, 1, "hi")
    assert by_link(out) == {
        L1: [Deliver("lobby", 1, message_text("alice", "hi"))],
        L2: [Deliver("lobby", -1, message_text("alice", "hi"))],
    }


# --- publish ------------------------------------------------------------------------------


def test_publish_excludes_the_sender_only_on_its_link() -> None:
    rooms = populated()
    out = rooms.publish(L1, 2, "hello")
    text = message_text("bob", "hello")
    assert by_link(out) == {
        L1: [Deliver("lobby", 2, text)],  # alice gets it, bob does not
        L2: [Deliver("lobby", -1, text)],  # carol (member 1 on L2) does
    }
    assert len({id(m.text) for _, m in out}) == 1  # type: ignore[union-attr]


def test_publish_alone_reaches_nobody() -> None:
    # The sender's own link may get the text with the sender excluded (the
    # router then drops it) or nothing at all; never the sender itself.
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    assert rooms.publish(L1, 1, "echo?") in (
        [], [(L1, Deliver("lobby", 1, message_text("alice", "echo?")))]
    )


def test_publish_by_another_link_with_same_member_id() -> None:
    rooms = populated()
    out = rooms.publish(L2, 1, "yo")  # carol, member 1 on L2; alice is member 1 on L1
    text = message_text("carol", "yo")
    assert by_link(out) == {L1: [Deliver("lobby", -1, text)], L2: [Deliver("lobby", 1, text)]}


def test_publish_does_not_cross_rooms() -> None:
    rooms = populated()
    join(rooms, L3, 8, "den", "erin")
    out = rooms.publish(L3, 7, "anyone?")
    assert out == [(L3, Deliver("den", 7, message_text("dave", "anyone?")))]


@pytest.mark.parametrize(("link", "member"), [(L1, 99), (9, 1), (L3, 1)])
def test_publish_by_non_member_is_ignored(link: int, member: int) -> None:
    rooms = populated()
    assert rooms.publish(link, member, "ghost") == []


def test_publish_after_leave_is_ignored() -> None:
    rooms = populated()
    rooms.leave(L1, 1)
    assert rooms.publish(L1, 1, "late") == []


@pytest.mark.parametrize("body", ["", "x" * 70_000, "日本 😀", '"quoted"\n'])
def test_publish_bodies(body: str) -> None:
    rooms = populated()
    text = message_text("bob", body)
    assert by_link(rooms.publish(L1, 2, body)) == {
        L1: [Deliver("lobby", 2, text)], L2: [Deliver("lobby", -1, text)]}


# --- leave ----------------------------------------------------------------------------------


def test_leave_tells_the_rest() -> None:
    rooms = populated()
    out = rooms.leave(L2, 1)
    assert out == [(L1, Deliver("lobby", -1, userleave_text("carol", 2)))]
    assert rooms.room_of(L2, 1) is None
    out = rooms.leave(L1, 1)
    assert out == [(L1, Deliver("lobby", -1, userleave_text("alice", 1)))]
    check_invariants(rooms)


def test_leave_own_link_still_told_when_others_remain_there() -> None:
    rooms = populated()
    out = rooms.leave(L1, 2)
    text = userleave_text("bob", 2)
    assert by_link(out) == {L1: [Deliver("lobby", -1, text)], L2: [Deliver("lobby", -1, text)]}


def test_last_leave_drops_the_room() -> None:
    rooms = populated()
    assert rooms.leave(L3, 7) == []
    assert "den" not in rooms.rooms and len(rooms) == 1
    assert rooms.members() == 3
    check_invariants(rooms)


def test_room_can_be_recreated() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    rooms.leave(L1, 1)
    assert len(rooms) == 0
    assert join(rooms, L2, 5, "lobby", "bob") == [(L2, Joined("lobby", 5, join_text("bob", 1), solo=True))]


@pytest.mark.parametrize(("link", "member"), [(L1, 99), (9, 1), (L3, 1)])
def test_leave_by_non_member_is_ignored(link: int, member: int) -> None:
    rooms = populated()
    assert rooms.leave(link, member) == []
    assert rooms.members() == 4


def test_double_leave() -> None:
    rooms = populated()
    assert rooms.leave(L2, 1) != []
    assert rooms.leave(L2, 1) == []


def test_per_link_counts_shrink() -> None:
    rooms = populated()
    assert rooms.rooms["lobby"].per_link == {L1: 2, L2: 1}
    rooms.leave(L1, 1)
    assert rooms.rooms["lobby"].per_link == {L1: 1, L2: 1}
    rooms.leave(L1, 2)
    assert rooms.rooms["lobby"].per_link == {L2: 1}
    # L1 no longer has members there: it hears nothing more from lobby.
    out = join(rooms, L3, 3, "lobby", "erin")
    assert {link for link, _ in out} == {L2, L3}


# --- drop_link --------------------------------------------------------------------------------


def test_drop_link_removes_its_members_and_tells_the_rooms() -> None:
    rooms = populated()
    join(rooms, L1, 3, "den", "frank")
    out = rooms.drop_link(L1, 0.0)
    assert rooms.members() == 2
    assert rooms.room_of(L1, 1) is None and rooms.room_of(L1, 2) is None
    assert rooms.room_of(L1, 3) is None
    assert rooms.room_of(L2, 1) == "lobby" and rooms.room_of(L3, 7) == "den"
    got = by_link(out)
    # carol hears alice and bob leave, in either order, counts going 2 then 1.
    assert got[L2] in (
        [Deliver("lobby", -1, userleave_text("alice", 2)),
         Deliver("lobby", -1, userleave_text("bob", 1))],
        [Deliver("lobby", -1, userleave_text("bob", 2)),
         Deliver("lobby", -1, userleave_text("alice", 1))],
    )
    assert got[L3] == [Deliver("den", -1, userleave_text("frank", 1))]
    check_invariants(rooms)


def test_drop_link_tells_only_the_remaining_links_anything_useful() -> None:
    # Messages addressed to the dropped link may appear (the shell has already
    # forgotten that link and skips them); what matters is what others get.
    rooms = populated()
    out = rooms.drop_link(L1, 0.0)
    assert {link for link, _ in out} <= {L1, L2}
    for link, message in out:
        assert isinstance(message, Deliver) and message.exclude == -1
    assert len(by_link(out)[L2]) == 2


def test_drop_link_with_only_its_own_members() -> None:
    rooms = Rooms()
    join(rooms, L1, 1, "lobby", "alice")
    join(rooms, L1, 2, "lobby", "bob")
    join(rooms, L1, 3, "den", "carol")
    out = rooms.drop_link(L1, 0.0)
    assert {link for link, _ in out} <= {L1}
    assert len(rooms) == 0 and rooms.members() == 0
    check_invariants(rooms)


def test_drop_unknown_link() -> None:
    rooms = populated()
    assert rooms.drop_link(99, 0.0) == []
    assert rooms.members() == 4


def test_drop_link_alone_in_rooms_drops_them() -> None:
    rooms = populated()
    assert rooms.drop_link(L3, 0.0) == []
    assert "den" not in rooms.rooms
    check_invariants(rooms)


# --- property: invariants under any sequence ------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["join", "join", "rejoin", "publish", "leave", "drop"]),
        st.integers(0, 2),  # link
        st.integers(0, 3),  # member
        st.sampled_from(["r0", "r1", "r2"]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_invariants(ops: list[tuple[str, int, int, str]]) -> None:
    rooms = Rooms()
    for op, link, member, room in ops:
        before = {name: set(r.per_link) for name, r in rooms.rooms.items()}
        if op == "join":
            out = join(rooms, link, member, room, f"u{link}.{member}")
        elif op == "rejoin":
            out = rejoin(rooms, link, member, room, f"u{link}.{member}")
            assert out == []
        elif op == "publish":
            current = rooms.room_of(link, member)
            out = rooms.publish(link, member, "b")
            if current is None:
                assert out == []
            else:
                links = {lk for lk, _ in out}
                assert before[current] - {link} <= links <= before[current]
                if rooms.rooms[current].per_link.get(link, 0) > 1:
                    assert link in links  # others on the sender's link hear it
                for lk, m in out:
                    assert isinstance(m, Deliver)
                    assert m.exclude == (member if lk == link else -1)
        elif op == "leave":
            out = rooms.leave(link, member)
        else:
            out = rooms.drop_link(link, 0.0)
        check_invariants(rooms)
        for lk, m in out:
            assert isinstance(m, (Joined, Deliver))
            # Every message goes to a link that has (or had) members in its room.
            assert lk in before.get(m.room, set()) | set(
                rooms.rooms[m.room].per_link if m.room in rooms.rooms else ()
            )
            if isinstance(m, Joined):
                assert lk == link and m.member == member

"""garin.shard.rooms: one shard's room membership, as a pure object."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from garin.protocol import join_text, userleave_text
from garin.shard.rooms import Announce, Rooms


def test_a_new_shard_has_no_rooms() -> None:
    rooms: Rooms[str] = Rooms()
    assert len(rooms) == 0
    assert rooms.member_count == 0
    assert rooms.members("lobby") == {}


def test_join_announces_to_everyone_in_the_room_the_joiner_included() -> None:
    rooms: Rooms[str] = Rooms()
    first = rooms.join("lobby", 1, "alice", "sock-a")
    assert first.text == join_text("alice", 1)
    assert dict(first.to) == {1: "sock-a"}

    second = rooms.join("lobby", 2, "bob", "sock-b")
    assert second.text == join_text("bob", 2)
    assert dict(second.to) == {1: "sock-a", 2: "sock-b"}

    assert rooms.members("lobby") == {1: "sock-a", 2: "sock-b"}
    assert rooms.member_count == 2
    assert len(rooms) == 1


def test_rooms_are_separate() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", 1, "alice", "a")
    other = rooms.join("den", 2, "bob", "b")
    # The first member of "den": totalUsers counts that room only.
    assert other.text == join_text("bob", 1)
    assert dict(other.to) == {2: "b"}
    assert len(rooms) == 2
    assert rooms.member_count == 2
    assert rooms.members("lobby") == {1: "a"}
    assert rooms.members("den") == {2: "b"}
    # A key is per room: the same key may be in another room (the shell keeps
    # keys unique in the shard; the rooms object does not need to).
    rooms.join("den", 1, "alice", "a")
    assert rooms.members("den") == {2: "b", 1: "a"}
    assert rooms.member_count == 3


def test_leave_announces_to_the_members_left() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", 1, "alice", "a")
    rooms.join("lobby", 2, "bob", "b")
    rooms.join("lobby", 3, "carol", "c")

    left = rooms.leave("lobby", 2)
    assert left is not None
    assert left.text == userleave_text("bob", 2)
    assert dict(left.to) == {1: "a", 3: "c"}
    assert rooms.members("lobby") == {1: "a", 3: "c"}
    assert rooms.member_count == 2

    left = rooms.leave("lobby", 1)
    assert left is not None
    assert left.text == userleave_text("alice", 1)
    assert dict(left.to) == {3: "c"}


def test_the_username_announced_on_leave_is_the_one_joined_with() -> None:
    rooms: Rooms[int] = Rooms()
    rooms.join("lobby", 1, 'al"ice 🙂', 10)
    rooms.join("lobby", 2, "bob", 20)
    left = rooms.leave("lobby", 1)
    assert left is not None
    assert left.text == userleave_text('al"ice 🙂', 1)
    assert b'al\\"ice' in left.text


def test_an_empty_room_is_dropped() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", 1, "alice", "a")
    rooms.join("den", 2, "bob", "b")
    left = rooms.leave("lobby", 1)
    assert left is not None
    # The last member leaves: nobody is left to hear it.
    assert left.text == userleave_text("alice", 0)
    assert dict(left.to) == {}
    assert "lobby" not in rooms.rooms
    assert len(rooms) == 1
    assert rooms.member_count == 1
    assert rooms.members("lobby") == {}
    # Joining again makes a new room, counted from 1.
    again = rooms.join("lobby", 1, "alice", "a")
    assert again.text == join_text("alice", 1)
    assert len(rooms) == 2


def test_leave_of_a_non_member_returns_none_and_changes_nothing() -> None:
    rooms: Rooms[str] = Rooms()
    assert rooms.leave("lobby", 1) is None  # no such room
    rooms.join("lobby", 1, "alice", "a")
    assert rooms.leave("lobby", 2) is None  # not a member
    assert rooms.leave("den", 1) is None  # a member of another room
    assert rooms.members("lobby") == {1: "a"}
    assert rooms.member_count == 1
    assert len(rooms) == 1
    assert rooms.leave("lobby", 1) is not None
    assert rooms.leave("lobby", 1) is None  # already gone
    assert rooms.member_count == 0
    assert len(rooms) == 0


def test_double_join_raises_and_changes_nothing() -> None:
    rooms: Rooms[str] = Rooms()
    rooms.join("lobby", 1, "alice", "a")
    with pytest.raises(ValueError):
        rooms.join("lobby", 1, "alicia", "other")
    assert rooms.members("lobby") == {1: "a"}
    assert rooms.member_count == 1
    left = rooms.leave("lobby", 1)
    assert left is not None and left.text == userleave_text("alice", 0)


def test_announce_is_a_value() -> None:
    a: Announce[str] = Announce(b"x", {1: "a"})
    assert a == Announce(b"x", {1: "a"})
    with pytest.raises(AttributeError):
        a.text = b"y"  # type: ignore[misc]


# -- against a model ---------------------------------------------------------------

ROOM_NAMES = ["lobby", "den", "attic"]
KEYS = st.integers(0, 7)


class RoomsMachine(RuleBasedStateMachine):
    """Random joins and leaves across rooms; `model` is room -> key -> username."""

    def __init__(self) -> None:
        super().__init__()
        self.rooms: Rooms[tuple[int, str]] = Rooms()
        self.model: dict[str, dict[int, str]] = {}

    @rule(room=st.sampled_from(ROOM_NAMES), key=KEYS, username=st.sampled_from(["ann", "bob", "çé🙂", 'q"x']))
    def join(self, room: str, key: int, username: str) -> None:
        members = self.model.get(room, {})
        if key in members:
            with pytest.raises(ValueError):
                self.rooms.join(room, key, username, (key, room))
            return
        announce = self.rooms.join(room, key, username, (key, room))
        members = self.model.setdefault(room, {})
        members[key] = username
        assert announce.text == join_text(username, len(members))
        assert dict(announce.to) == {k: (k, room) for k in members}

    @rule(room=st.sampled_from(ROOM_NAMES), key=KEYS)
    def leave(self, room: str, key: int) -> None:
        announce = self.rooms.leave(room, key)
        members = self.model.get(room, {})
        if key not in members:
            assert announce is None
            return
        username = members.pop(key)
        if not members:
            del self.model[room]
        assert announce is not None
        assert announce.text == userleave_text(username, len(members))
        assert dict(announce.to) == {k: (k, room) for k in members}

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def leave_a_member(self, data: st.DataObject) -> None:
        # Plain `leave` mostly misses: make sure real leaves happen often.
        room = data.draw(st.sampled_from(sorted(self.model)))
        key = data.draw(st.sampled_from(sorted(self.model[room])))
        self.leave(room, key)

    @invariant()
    def matches_the_model(self) -> None:
        assert len(self.rooms) == len(self.model)
        assert set(self.rooms.rooms) == set(self.model)
        assert self.rooms.member_count == sum(len(m) for m in self.model.values())
        for room in ROOM_NAMES:
            assert self.rooms.members(room) == {k: (k, room) for k in self.model.get(room, {})}
        for name, room_obj in self.rooms.rooms.items():
            assert room_obj.name == name
            assert room_obj.usernames == self.model[name]


RoomsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_rooms_match_a_model = RoomsMachine.TestCase

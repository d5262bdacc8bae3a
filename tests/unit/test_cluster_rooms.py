"""garin.shard.cluster_rooms: one shard process's side of rooms shared through Redis."""

from __future__ import annotations

import json
import random

import pytest

from garin.protocol import join_text, message_text, userleave_text
from garin.shard.cluster_rooms import (
    ClusterRooms,
    Delivery,
    JoinCommand,
    LeaveCommand,
    MessageCommand,
    State,
    channel,
    room_of,
)


class FakeRedis:
    """What the Lua scripts and PUBLISH do, in Python: rosters counted and
    events appended to each room's channel in one step."""

    def __init__(self) -> None:
        self.rosters: dict[str, dict[str, str]] = {}
        self.channels: dict[str, list[bytes]] = {}

    def run(self, instance: str, commands: list[JoinCommand | MessageCommand | LeaveCommand]) -> None:
        for c in commands:
            log = self.channels.setdefault(c.room, [])
            roster = self.rosters.setdefault(c.room, {})
            member = f"{instance}:{c.key}"
            if isinstance(c, MessageCommand):
                log.append(c.payload)
            elif isinstance(c, JoinCommand):
                roster[member] = c.username
                log.append(b"j %s %d %d %s" % (instance.encode(), c.key, len(roster), c.username.encode()))
            elif roster.pop(member, None) is not None:
                log.append(b"l %s %d %d %s" % (instance.encode(), c.key, len(roster), c.username.encode()))


def echo(host: ClusterRooms[str], redis: FakeRedis, start: dict[str, int], seen: dict[str, list[bytes]]) -> None:
    """Deliver to `host` what its rooms' channels got since `start`, each
    event written at once (a Delivery's `to` is the live room) into `seen`."""
    for room, log in redis.channels.items():
        for event in log[start.get(room, 0):]:
            delivery = host.apply(room, event)
            if delivery is not None:
                for key, sock in delivery.to.items():
                    if key != delivery.exclude:
                        seen.setdefault(sock, []).append(delivery.text)
        start[room] = len(log)


def test_a_joiner_hears_the_room_from_its_own_join_on() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "sock-a", now=0.0)
    assert host.rooms == {}
    assert host.wanted_rooms() == {"lobby"}
    [command] = host.take(10)
    assert command == JoinCommand(1, "lobby", "alice", 0.0)
    assert host.members[1].state is State.SENT
    # Someone else's event before our join came back: alice does not hear it.
    assert host.apply("lobby", b"j h2 7 2 bob") is None
    delivery = host.apply("lobby", b"j h1 1 3 alice")
    assert delivery == Delivery(join_text("alice", 3), {1: "sock-a"})
    assert host.members[1].state is State.ACTIVE
    assert host.apply("lobby", b"l h2 7 2 bob") == Delivery(userleave_text("bob", 2), {1: "sock-a"})


def test_a_message_reaches_every_local_member_but_its_sender() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    for key, name in ((1, "alice"), (2, "bob")):
        host.join(key, "lobby", name, f"sock-{name}", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    host.apply("lobby", b"j h1 2 2 bob")
    assert host.publish(1, message_text("alice", "hi"), now=0.0)
    [command] = host.take(10)
    assert isinstance(command, MessageCommand) and command.room == "lobby"
    delivery = host.apply("lobby", command.payload)
    assert delivery == Delivery(message_text("alice", "hi"), {1: "sock-alice", 2: "sock-bob"}, exclude=1)
    # The same key on another host is someone else: excluded by nobody here.
    remote = host.apply("lobby", b"m h2 1 " + message_text("carol", "yo"))
    assert remote == Delivery(message_text("carol", "yo"), {1: "sock-alice", 2: "sock-bob"}, exclude=-1)


def test_a_leaver_hears_nothing_more_and_its_leave_is_queued() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.join(2, "lobby", "bob", "b", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    host.apply("lobby", b"j h1 2 2 bob")
    host.leave(2, now=1.0)
    assert host.rooms == {"lobby": {1: "a"}}
    assert host.take(10) == [LeaveCommand(2, "lobby", "bob", 1.0)]
    host.leave(1, now=2.0)
    assert host.rooms == {} and host.local == {}
    assert host.rooms_changed and host.wanted_rooms() == set()


def test_events_nobody_here_hears_and_garbage_are_ignored() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    for event in (b"m h2 1 " + message_text("x", "y"), b"j h2 1 1 bob", b"l h2 1 0 bob"):
        assert host.apply("empty", event) is None
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    for garbage in (b"", b"x", b"j h2 notanumber 1 bob", b"j h2 1", b"m h2", b"l h2 1 x bob", b"\xff\xfe"):
        assert host.apply("lobby", garbage) is None


def test_usernames_with_spaces_survive_the_event_format() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    delivery = host.apply("lobby", "j h2 4 2 Jo \u00eblle \"x\"".encode())
    assert delivery is not None and json.loads(delivery.text) == {
        "type": "join", "username": 'Jo \u00eblle "x"', "totalUsers": 2
    }


def test_a_broken_link_gives_up_joins_in_flight_and_keeps_the_rest() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")  # active
    host.join(2, "lobby", "bob", "b", now=0.0)
    host.take(10)  # bob's join is in flight
    host.join(3, "den", "carol", "c", now=0.0)  # queued
    assert host.link_lost() == ["b"]
    assert host.registered() == [(1, "lobby", "alice")]
    assert [c.key for c in host.queue] == [3]


def test_nothing_waits_past_the_hold() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    host.join(2, "lobby", "bob", "b", now=1.0)
    host.publish(1, message_text("alice", "1"), now=2.0)
    host.leave(2, now=3.0)
    host.publish(1, message_text("alice", "2"), now=8.0)
    assert host.held_too_long(now=5.0, hold_s=5.0) == []
    # At 7.5 alice's first message has waited 5.5 s (bob has left already).
    assert host.held_too_long(now=7.5, hold_s=5.0) == ["a"]
    # All her commands are dropped, and bob's late join (he is gone); leaves
    # stay (a leave only removes what Redis has).
    assert [(type(c).__name__, c.key) for c in host.queue] == [("LeaveCommand", 2)]


def test_a_join_sent_but_never_back_is_given_up_too() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.take(10)
    assert host.held_too_long(now=4.0, hold_s=5.0) == []
    assert host.held_too_long(now=6.0, hold_s=5.0) == ["a"]
    assert host.held_too_long(now=7.0, hold_s=5.0) == []


def test_a_full_queue_refuses_messages() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1", max_queue=3)
    host.join(1, "lobby", "alice", "a", now=0.0)
    assert host.publish(1, b"x", 0.0) and host.publish(1, b"y", 0.0)
    assert not host.publish(1, b"z", 0.0)


def test_the_queue_is_bounded_in_bytes_too() -> None:
    event = len(b"m h1 1 ") + 1000
    host: ClusterRooms[str] = ClusterRooms("h1", max_queue_bytes=3 * event)
    host.join(1, "lobby", "alice", "a", now=0.0)
    for _ in range(3):
        assert host.publish(1, b"x" * 1000, 0.0)
    assert not host.publish(1, b"x" * 1000, 0.0)
    assert host.queued_bytes == 3 * event
    host.take(2)  # the join and one message sent: room for one more
    assert host.publish(1, b"x" * 1000, 0.0) and not host.publish(1, b"x", 0.0)
    assert host.held_too_long(now=60.0, hold_s=5.0) == ["a"]
    assert host.queued_bytes == 0


def test_taken_for_dead_drops_everything() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    host.join(1, "lobby", "alice", "a", now=0.0)
    host.join(2, "den", "bob", "b", now=0.0)
    assert sorted(host.drop_all()) == ["a", "b"]
    assert not host.queue


def test_a_member_redis_removed_behind_our_back_is_evicted() -> None:
    host: ClusterRooms[str] = ClusterRooms("h1")
    for key, name in ((1, "alice"), (2, "bob")):
        host.join(key, "lobby", name, name, now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    host.apply("lobby", b"j h1 2 2 bob")
    # The others reaped this process (it was paused): bob's leave, still here.
    delivery = host.apply("lobby", b"l h1 2 1 bob")
    assert delivery == Delivery(userleave_text("bob", 1), {1: "alice"})
    assert host.evicted == ["bob"]
    assert host.rooms == {"lobby": {1: "alice"}}
    # Until its session ends, bob is neither heard (the others saw him
    # leave) nor registered again by a reconnected link (he would be
    # counted silently, then announced leaving a second time).
    assert host.publish(2, message_text("bob", "ghost"), now=1.0)
    assert not host.queue
    assert host.registered() == [(1, "lobby", "alice")]
    assert host.apply("lobby", b"j h1 2 2 bob") == Delivery(join_text("bob", 2), {1: "alice"})
    assert host.rooms == {"lobby": {1: "alice"}}


def test_members_closed_by_the_shell_are_out_of_the_room_at_once() -> None:
    """Whatever closes them (taken for dead, a join lost with the link, a
    wait past the hold), members being closed hear nothing more, are not
    registered again, and their leaves still go out."""
    host: ClusterRooms[str] = ClusterRooms("h1")
    for key, name in ((1, "alice"), (2, "bob"), (3, "carol")):
        host.join(key, "lobby", name, name, now=0.0)
    host.take(10)
    host.apply("lobby", b"j h1 1 1 alice")
    host.apply("lobby", b"j h1 2 2 bob")
    assert host.link_lost() == ["carol"]  # her join was in flight
    host.apply("lobby", b"j h1 3 3 carol")  # its echo, late: she is being closed
    assert host.rooms == {"lobby": {1: "alice", 2: "bob"}}
    host.publish(2, message_text("bob", "late"), now=0.0)
    assert host.held_too_long(now=60.0, hold_s=5.0) == ["bob"]
    assert host.rooms == {"lobby": {1: "alice"}}
    assert host.registered() == [(1, "lobby", "alice")]
    assert host.drop_all() == ["alice"]
    assert host.rooms == {} and host.registered() == []
    for key in (1, 2, 3):
        host.leave(key, now=61.0)
    assert [(type(c).__name__, c.key) for c in host.take(10)] == [("LeaveCommand", 1), ("LeaveCommand", 2), ("LeaveCommand", 3)]
    assert host.members == {} and host.local == {}


def test_channel_names() -> None:
    assert channel("lobby") == "garin:room:lobby"
    assert room_of(b"garin:room:a b") == "a b"
    assert room_of("other") is None


@pytest.mark.parametrize("seed", range(20))
def test_every_member_on_every_host_sees_one_order(seed: int) -> None:
    """Three hosts, random joins, messages and leaves in one room, each host
    sending in random-sized batches: a member still there at the end heard
    exactly the channel's events from its own join on (its own messages
    excepted), in the channel's one order; one that left heard a prefix of
    that; one that left before its join was sent heard nothing."""
    rng = random.Random(seed)
    redis = FakeRedis()
    hosts = [ClusterRooms[str](f"h{i}") for i in range(3)]
    read: list[dict[str, int]] = [{} for _ in hosts]
    seen: dict[str, list[bytes]] = {}
    next_key = 1
    members: list[tuple[int, int]] = []  # (host, key)
    sent: dict[str, int] = {}  # messages per sender, numbered
    for _ in range(300):
        h = rng.randrange(3)
        host = hosts[h]
        action = rng.random()
        if action < 0.25 or not members:
            key, next_key = next_key, next_key + 1
            host.join(key, "room", f"u{key}", f"u{key}", now=0.0)
            members.append((h, key))
        elif action < 0.35:
            h, key = members.pop(rng.randrange(len(members)))
            hosts[h].leave(key, now=0.0)
        elif action < 0.8:
            h, key = rng.choice(members)
            n = sent.get(f"u{key}", 0)
            sent[f"u{key}"] = n + 1
            hosts[h].publish(key, message_text(f"u{key}", str(n)), now=0.0)
        else:
            redis.run(host.instance, host.take(rng.randrange(1, 20)))
            for i, other in enumerate(hosts):
                echo(other, redis, read[i], seen)
    for i, host in enumerate(hosts):  # everything sent and heard
        redis.run(host.instance, host.take(10_000))
    for i, host in enumerate(hosts):
        echo(host, redis, read[i], seen)
    log = redis.channels.get("room", [])
    assert log
    present = {f"u{key}" for _, key in members}
    for key in range(1, next_key):
        name = f"u{key}"
        joined = [n for n, e in enumerate(log) if e.startswith(b"j ") and e.split(b" ")[2] == str(key).encode()]
        if not joined:
            assert name not in seen  # left before its join was sent
            continue
        expected = [as_text(e) for e in log[joined[0]:] if not (e.startswith(b"m ") and e.split(b" ")[2] == str(key).encode())]
        got = seen.get(name, [])
        if name in present:
            assert got == expected, name
        else:
            assert got == expected[:len(got)], name


def as_text(event: bytes) -> bytes:
    kind, _, _, rest = event.split(b" ", 3)
    if kind == b"m":
        return rest
    total, username = rest.split(b" ", 1)
    make = join_text if kind == b"j" else userleave_text
    return make(username.decode(), int(total))

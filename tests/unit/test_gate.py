"""shard.gate and its shell: a restarted shard waits for every router's replay, but not forever."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from garin import wire
from garin.config import load_config
from shard.gate import REPLAY_GRACE_S, ReplayGate
from garin.protocol import join_text as wire_join_text
from garin.protocol import userleave_text as wire_leave_text
from shard import server as shard_server
from shard.server import REVOKE_TIMEOUT_S, Shard


def test_opens_when_every_router_has_replayed() -> None:
    gate = ReplayGate(expected_routers=2, now=0.0)
    assert not gate.open
    assert gate.replayed("router-0") is False
    # The same router relinking again still counts once.
    assert gate.replayed("router-0") is False
    assert gate.timeout(REPLAY_GRACE_S - 0.01) is False
    assert gate.replayed("router-1") is True
    assert gate.open


def test_one_router_opens_it_at_once() -> None:
    gate = ReplayGate(expected_routers=1, now=0.0)
    assert gate.replayed("4242") is True


def test_the_grace_period_opens_it_without_the_missing_routers() -> None:
    gate = ReplayGate(expected_routers=3, now=100.0, grace_s=2.0)
    gate.replayed("router-0")
    assert gate.deadline == 102.0
    assert gate.timeout(101.99) is False
    assert gate.timeout(102.0) is True
    assert gate.open


def test_once_open_it_stays_open() -> None:
    gate = ReplayGate(expected_routers=2, now=0.0, grace_s=1.0)
    assert gate.timeout(5.0) is True
    assert gate.replayed("late") is True
    assert gate.timeout(0.0) is True


# -- the shard's shell around the gate -------------------------------------------------

class FakeRouter:
    """One router's end of a link to an in-process Shard."""

    def __init__(self, shard: Shard, nursery: trio.Nursery, router_id: str) -> None:
        # A real socket pair: the shard's links write with os.write on its fd.
        ours, mine = trio.socket.socketpair()
        self.stream, theirs = trio.SocketStream(ours), trio.SocketStream(mine)
        self.router_id = router_id
        self.decoder = wire.Decoder()
        self.pending: list[wire.WireMessage] = []
        nursery.start_soon(shard.handle_link, theirs)
        nursery.start_soon(self._close_when_cancelled)

    async def _close_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stream.socket.close()

    async def link(self, *replay: wire.WireMessage) -> None:
        hello = wire.Hello(wire.PROTOCOL_VERSION, self.router_id, 0, 1, "crc32")
        await self.stream.send_all(b"".join(wire.encode(m) for m in (hello, *replay)))
        assert await self.receive() == wire.Welcome(wire.PROTOCOL_VERSION, 0)

    async def receive(self) -> wire.WireMessage:
        while not self.pending:
            self.pending.extend(self.decoder.feed(await self.stream.receive_some()))
        return self.pending.pop(0)

    async def nothing_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self.receive()
            return False
        return True


def shard_for_routers(routers: int) -> Shard:
    config = load_config({}, {"GARIN_SHARDS": "1", "GARIN_ROUTERS": str(routers)}, required=())
    return Shard(config, 0)


def total_of(message: wire.WireMessage) -> int:
    assert isinstance(message, (wire.Joined, wire.Deliver))
    return int(json.loads(message.text)["totalUsers"])


async def test_a_new_shard_applies_a_join_only_after_every_router_replayed(autojump_clock: object) -> None:
    shard = shard_for_routers(2)
    async with trio.open_nursery() as nursery:
        a, b = FakeRouter(shard, nursery, "router-a"), FakeRouter(shard, nursery, "router-b")
        # Router a replays alice, then a join it held while the shard was down.
        await a.link(wire.Rejoin(1, "lobby", "alice"), wire.Replayed(), wire.Join(2, "lobby", "bobby"))
        # Replays are applied at once: so far the room is a's alone.
        assert await a.receive() == wire.Offer("lobby", 1)
        assert await a.nothing_within(1.0)
        assert shard.rooms.members() == 1
        await b.link(wire.Rejoin(1, "lobby", "carol"), wire.Replayed())
        joined = await a.receive()
        assert isinstance(joined, wire.Joined) and joined.member == 2
        assert total_of(joined) == 3  # carol, on the router that relinked last, counts
        assert total_of(await b.receive()) == 3
        nursery.cancel_scope.cancel()


async def test_a_missing_router_delays_a_new_shard_only_for_the_grace_period(autojump_clock: object) -> None:
    shard = shard_for_routers(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shard.open_gate_after_grace)
        a = FakeRouter(shard, nursery, "router-a")
        await a.link(wire.Rejoin(1, "lobby", "alice"), wire.Replayed(), wire.Join(2, "lobby", "bobby"))
        start = trio.current_time()
        assert await a.receive() == wire.Offer("lobby", 1)
        joined = await a.receive()
        assert trio.current_time() - start == pytest.approx(REPLAY_GRACE_S, abs=0.1)
        assert total_of(joined) == 2
        nursery.cancel_scope.cancel()


async def test_once_open_a_relinking_router_is_applied_in_order(autojump_clock: object) -> None:
    shard = shard_for_routers(1)
    async with trio.open_nursery() as nursery:
        a = FakeRouter(shard, nursery, "router-a")
        await a.link(wire.Replayed(), wire.Join(1, "lobby", "alice"))
        assert total_of(await a.receive()) == 1
        b = FakeRouter(shard, nursery, "router-b")
        await b.link(wire.Replayed(), wire.Join(1, "lobby", "bobby"))
        # lobby was a's alone: b's join waits until a gives it back.
        assert await a.receive() == wire.Revoke("lobby", 1)
        assert await b.nothing_within(1.0)
        await a.stream.send_all(wire.encode(wire.Released("lobby", 1)))
        assert total_of(await b.receive()) == 2
        assert total_of(await a.receive()) == 2
        nursery.cancel_scope.cancel()


async def test_a_router_that_does_not_release_a_room_is_unlinked(autojump_clock: object) -> None:
    shard = shard_for_routers(2)
    shard.ready.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shard.unlink_overdue)
        a = FakeRouter(shard, nursery, "router-a")
        await a.link(wire.Join(1, "lobby", "alice"))
        assert await a.receive() == wire.Joined("lobby", 1, wire_join_text("alice", 1), True)
        b = FakeRouter(shard, nursery, "router-b")
        await b.link(wire.Join(1, "lobby", "bobby"))
        assert await a.receive() == wire.Revoke("lobby", 1)
        start = trio.current_time()
        # a never answers: after REVOKE_TIMEOUT_S the shard drops its link,
        # alice with it, and bobby's join goes through alone (and solo).
        assert await b.receive() == wire.Joined("lobby", 1, wire_join_text("bobby", 1), True)
        assert REVOKE_TIMEOUT_S <= trio.current_time() - start <= REVOKE_TIMEOUT_S * 1.5
        assert await a.stream.receive_some() == b""
        assert shard.rooms.room_of(2, 1) == "lobby" and shard.rooms.members() == 1
        nursery.cancel_scope.cancel()


async def test_a_router_still_reading_a_backlog_is_not_unlinked(autojump_clock: object) -> None:
    shard = shard_for_routers(2)
    shard.ready.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shard.unlink_overdue)
        a = FakeRouter(shard, nursery, "router-a")
        b = FakeRouter(shard, nursery, "router-b")
        await a.link(wire.Join(1, "shared", "alice"))
        await b.link(wire.Join(1, "shared", "bob"))
        assert await a.receive() == wire.Joined("shared", 1, wire_join_text("alice", 1), True)
        assert await a.receive() == wire.Revoke("shared", 1)
        await a.stream.send_all(wire.encode(wire.Released("shared", 1)) + wire.encode(wire.Join(2, "mine", "al")))
        assert isinstance(await b.receive(), wire.Joined)
        assert isinstance(await a.receive(), wire.Deliver)
        assert await a.receive() == wire.Joined("mine", 2, wire_join_text("al", 1), True)
        # bob sends more than a's socket holds, then joins a's solo room:
        # the Revoke waits behind the backlog, which a does not read for a while.
        big = "x" * 2_000_000
        await b.stream.send_all(wire.encode(wire.Publish(1, big)) + wire.encode(wire.Join(2, "mine", "bo")))
        await trio.sleep(4 * REVOKE_TIMEOUT_S)
        assert [link.router_id for link in shard.links.values()] == ["router-a", "router-b"]
        # a reads it all (its socket is now empty) but never answers: stuck.
        delivered = await a.receive()
        assert isinstance(delivered, wire.Deliver) and len(delivered.text) > len(big)
        assert await a.receive() == wire.Revoke("mine", 2)
        assert isinstance(await b.receive(), wire.Deliver)  # bob's own message, to b's link
        start = trio.current_time()
        assert await b.receive() == wire.Deliver("shared", -1, wire_leave_text("alice", 1))
        assert await b.receive() == wire.Joined("mine", 2, wire_join_text("bo", 1), True)
        assert REVOKE_TIMEOUT_S <= trio.current_time() - start <= REVOKE_TIMEOUT_S * 1.5
        assert [link.router_id for link in shard.links.values()] == ["router-b"]
        nursery.cancel_scope.cancel()


async def test_a_router_that_stops_reading_is_dropped_and_the_log_says_why(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shard_server, "MAX_LINK_QUEUE_BYTES", 1 << 20)
    shard = shard_for_routers(1)
    shard.ready.set()
    async with trio.open_nursery() as nursery:
        a = FakeRouter(shard, nursery, "router-a")
        await a.link(wire.Join(1, "lobby", "alice"), wire.Join(2, "lobby", "bob"))
        # Its messages come back to it (for bob), and it never reads them.
        body = "x" * 100_000
        with trio.fail_after(30):
            while shard.links:
                await a.stream.send_all(wire.encode(wire.Publish(1, body)))
                await trio.sleep(0.01)
        assert shard.rooms.members() == 0
        nursery.cancel_scope.cancel()
    assert "link dropped: router router-a is not reading its link" in caplog.text

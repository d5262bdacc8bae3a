"""router.router: a member's messages in flight through a shard, across a lost link.

The Router here is the real one with real client sockets (socketpairs); its
shard link is never started, so the test plays the shard's side: it takes
what the outbox would write and hands the router the shard's answers.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from garin import wire
from garin.config import load_config
from router.router import Client, Router
from .client_sockets import open_client, read_available

ROOM = "lobby"


@dataclass
class Member:
    client: Client
    peer: socket.socket

    def messages(self) -> list[str]:
        """Bodies of the chat messages this member's socket has received."""
        data = b"".join(read_available(self.peer))
        bodies = []
        while data:  # small unmasked text frames: 0x81, length, payload
            assert data[0] == 0x81 and data[1] < 126
            text = json.loads(data[2:2 + data[1]])
            data = data[2 + data[1]:]
            if text.get("type") == "message":
                bodies.append(text["body"])
        return bodies


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Router, Member, Member]]:
    config = load_config(
        {}, {"ALLOWED_ORIGINS": "*", "JWT_DECODE_SECRET": "s" * 40, "GARIN_SHARDS": "1",
             "GARIN_SOCKET_DIR": str(tmp_path)},
    )
    router = Router(config, "r1")
    members = []
    async with trio.open_nursery() as nursery:
        for name in ("alice", "bobby"):
            ws, peer = await open_client(nursery)
            client = router.new_client(name)
            client.socket = ws
            router.join(client, ROOM, name)
            members.append(Member(client, peer))
        outbox = router.links[0].outbox
        outbox.link_up()
        shard_reads(router)
        for member in members:
            router._on_shard_message(wire.Joined(ROOM, member.client.member, b"{}", solo=False))
        await trio.sleep(0)
        alice, bobby = members
        assert alice.messages() == bobby.messages() == []  # read the join frames
        yield router, alice, bobby
        for member in members:
            assert member.client.socket is not None
            member.client.socket.hang_up()
            member.peer.close()


def shard_reads(router: Router) -> list[wire.WireMessage]:
    """The shard reads everything queued for it (the batch is in the socket)."""
    outbox = router.links[0].outbox
    batch = outbox.take()
    outbox.sent()
    return list(wire.Decoder().feed(bytes(batch))) if batch is not None else []


def publishes(messages: list[wire.WireMessage]) -> list[str]:
    return [m.body for m in messages if isinstance(m, wire.Publish)]


async def test_a_message_lost_with_the_link_does_not_pin_its_sender_to_the_shard(
    setup: tuple[Router, Member, Member],
) -> None:
    router, alice, bobby = setup
    outbox = router.links[0].outbox
    router.publish(alice.client, "lost")
    assert alice.client.in_flight == 1
    # The batch with it reached the dying shard's socket; the shard died
    # before answering (its Deliver, if any, went down with the link).
    assert publishes(shard_reads(router)) == ["lost"]
    router._link_down(0)
    outbox.link_down(0.0)
    # A message written while the link is down is held, and comes back.
    router.publish(alice.client, "held")
    assert alice.client.in_flight == 1
    outbox.link_up()
    assert publishes(shard_reads(router)) == ["held"]
    router._on_shard_message(wire.Deliver(ROOM, alice.client.member, b'{"type":"message","body":"held"}'))
    assert alice.client.in_flight == 0
    # The restarted shard offers the room back; from now on alice's messages
    # reach bobby without the round trip.
    router._on_shard_message(wire.SoloFrom(ROOM, 1))
    router.publish(alice.client, "direct")
    await trio.sleep(0)
    assert bobby.messages() == ["held", "direct"]
    assert publishes(shard_reads(router)) == []


async def test_a_batch_refused_whole_keeps_its_messages_counted(setup: tuple[Router, Member, Member]) -> None:
    router, alice, bobby = setup
    outbox = router.links[0].outbox
    router.publish(alice.client, "one")
    router.publish(alice.client, "two")
    assert outbox.take() is not None  # the socket refuses it: no sent()
    router._link_down(0)
    outbox.link_down(0.0)
    # Both go again after the relink, and both echo back.
    assert alice.client.in_flight == 2
    outbox.link_up()
    assert publishes(shard_reads(router)) == ["one", "two"]
    router._on_shard_message(wire.SoloFrom(ROOM, 1))
    router.publish(alice.client, "three")  # not yet: "one" and "two" are not back
    assert publishes(shard_reads(router)) == ["three"]
    for body in ("one", "two", "three"):
        router._on_shard_message(wire.Deliver(ROOM, alice.client.member, b'{"type":"message","body":"%s"}' % body.encode()))
    assert alice.client.in_flight == 0
    router.publish(alice.client, "four")
    await trio.sleep(0)
    assert bobby.messages() == ["one", "two", "three", "four"]

"""What a router keeps counting for connections it handed to a shard, when
that shard's link drops: a real ShardLink against a fake shard on a real Unix
socket, and the Router's accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from garin import wire
from garin.config import load_config
from garin.link import Link, receive_first
from garin.router import shard_link
from garin.router.router import Handed, Router
from garin.router.shard_link import ShardLink

ENV = {"JWT_DECODE_SECRET": "x" * 32, "ALLOWED_ORIGINS": "http://a.test", "GARIN_SHARDS": "2"}


def router_with(handed: dict[int, tuple[str, int]]) -> Router:
    router = Router(load_config({}, ENV), "0")
    for conn, (address, shard) in handed.items():
        assert router.limits.admit(address) is None
        router.handed[conn] = Handed(address, None, shard)
    return router


def test_a_relinked_shard_keeps_the_connections_it_lists_counted() -> None:
    router = router_with({1: ("10.0.0.1", 0), 2: ("10.0.0.1", 0), 3: ("10.0.0.2", 1)})
    router._shard_linked(0, frozenset({2}))
    assert sorted(router.handed) == [2, 3]  # 1 ended while unlinked; shard 1 untouched
    assert router.limits.held("10.0.0.1") == 1
    assert router.limits.held("10.0.0.2") == 1


def test_a_shard_gone_for_good_releases_all_its_connections() -> None:
    router = router_with({1: ("10.0.0.1", 0), 2: ("10.0.0.1", 0), 3: ("10.0.0.2", 1)})
    router._shard_gone(0)
    assert sorted(router.handed) == [3]
    assert router.limits.held("10.0.0.1") == 0


async def fake_shard(listener: trio.SocketListener, live: tuple[int, ...]) -> None:
    """Welcome one router, listing `live`, then drop the link."""
    stream = await listener.accept()
    link = Link(stream.socket)
    try:
        hello = await receive_first(link, 5)
        assert isinstance(hello, wire.Hello)
        await link.send(wire.Welcome(wire.PROTOCOL_VERSION, hello.shard_index, live))
        await trio.sleep(0.05)
    finally:
        link.close()


async def test_shard_link_reports_what_a_shard_lists_and_forgets_one_gone_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_link, "FORGET_AFTER_S", 0.5)
    path = tmp_path / "shard-0.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    events: list[tuple[str, object, float]] = []

    def linked(index: int, live: frozenset[int]) -> None:
        events.append(("linked", live, trio.current_time()))

    def gone(index: int) -> None:
        events.append(("gone", index, trio.current_time()))

    link = ShardLink(0, path, "0:123", 1, lambda m: None, lambda m, fd: None, linked, gone)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        # A shard that lives on across the drop lists what it still holds ...
        await fake_shard(listener, (4, 9))
        await fake_shard(listener, (9,))
        # ... and one that stays away is forgotten, once, after FORGET_AFTER_S.
        dropped = trio.current_time()
        await listener.aclose()
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert [(kind, what) for kind, what, _ in events] == [
        ("linked", frozenset({4, 9})), ("linked", frozenset({9})), ("gone", 0),
    ]
    assert events[-1][2] - dropped >= 0.5

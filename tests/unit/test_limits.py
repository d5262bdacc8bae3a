"""garin.limits: counting connections per router and per client address; the file limit."""

from __future__ import annotations

import logging
import resource

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import closes
from garin.limits import ConnectionLimits, client_key
from garin import fdlimit as server


def test_per_client_limit() -> None:
    limits = ConnectionLimits(max_total=0, max_per_client=2)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == closes.TOO_MANY_CONNECTIONS
    assert limits.admit("10.0.0.2") is None
    assert (limits.total, limits.held("10.0.0.1"), limits.held("10.0.0.2")) == (3, 2, 1)


def test_total_limit() -> None:
    limits = ConnectionLimits(max_total=3, max_per_client=0)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.2"):
        assert limits.admit(address) is None
    assert limits.admit("10.0.0.3") == closes.SERVER_FULL
    assert limits.admit("10.0.0.1") == closes.SERVER_FULL
    assert limits.total == 3


def test_per_client_is_checked_before_total() -> None:
    limits = ConnectionLimits(max_total=2, max_per_client=2)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is None
    # Both limits are reached: the one the client can fix is named.
    assert limits.admit("10.0.0.1") == closes.TOO_MANY_CONNECTIONS
    assert limits.admit("10.0.0.2") == closes.SERVER_FULL


def test_release_frees_both_slots_and_forgets_the_client() -> None:
    limits = ConnectionLimits(max_total=2, max_per_client=1)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.2") is None
    assert limits.admit("10.0.0.3") == closes.SERVER_FULL
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.3") is None
    assert limits.admit("10.0.0.1") == closes.SERVER_FULL
    limits.release("10.0.0.2")
    limits.release("10.0.0.3")
    assert (limits.total, limits.clients) == (0, 0)


def test_refusals_are_not_counted() -> None:
    limits = ConnectionLimits(max_total=1, max_per_client=1)
    assert limits.admit("10.0.0.1") is None
    for _ in range(100):
        assert limits.admit("10.0.0.1") == closes.TOO_MANY_CONNECTIONS
        assert limits.admit("10.0.0.2") == closes.SERVER_FULL
    assert (limits.total, limits.clients) == (1, 1)
    with pytest.raises(ValueError, match="10.0.0.2"):
        limits.release("10.0.0.2")


@pytest.mark.parametrize("address", ["10.0.0.1", "2001:db8::1", "?"])
def test_release_without_admit_is_a_bug(address: str) -> None:
    limits = ConnectionLimits(max_total=10, max_per_client=10)
    with pytest.raises(ValueError):
        limits.release(address)
    assert limits.admit(address) is None
    limits.release(address)
    with pytest.raises(ValueError):
        limits.release(address)


def test_zero_means_no_limit() -> None:
    limits = ConnectionLimits(max_total=0, max_per_client=0)
    for _ in range(10_000):
        assert limits.admit("10.0.0.1") is None
    assert limits.total == limits.held("10.0.0.1") == 10_000


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("?", "?"),
        ("", ""),
        ("not an address", "not an address"),
    ],
)
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


def test_one_ipv6_host_cannot_spread_over_its_64() -> None:
    limits = ConnectionLimits(max_total=0, max_per_client=2)
    assert limits.admit("2001:db8::1") is None
    assert limits.admit("2001:db8::2") is None
    assert limits.admit("2001:db8::ffff:3") == closes.TOO_MANY_CONNECTIONS
    assert limits.admit("2001:db8:0:1::1") is None  # another /64
    # An IPv4-mapped address and the IPv4 address are one client.
    assert limits.admit("192.0.2.7") is None
    assert limits.admit("::ffff:192.0.2.7") is None
    assert limits.admit("192.0.2.7") == closes.TOO_MANY_CONNECTIONS
    limits.release("::ffff:192.0.2.7")
    assert limits.held("192.0.2.7") == 1


ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.2", "2001:db8::1", "2001:db8::2", "?"])


@settings(max_examples=300, deadline=None)
@given(
    max_total=st.integers(0, 5),
    max_per_client=st.integers(0, 3),
    steps=st.lists(st.tuples(st.booleans(), ADDRESSES), max_size=60),
)
def test_limits_match_a_model(max_total: int, max_per_client: int, steps: list[tuple[bool, str]]) -> None:
    limits = ConnectionLimits(max_total, max_per_client)
    open_: list[str] = []  # addresses of admitted, still open connections
    for connect, address in steps:
        if connect:
            same_client = sum(client_key(a) == client_key(address) for a in open_)
            result = limits.admit(address)
            if max_per_client and same_client >= max_per_client:
                assert result == closes.TOO_MANY_CONNECTIONS
            elif max_total and len(open_) >= max_total:
                assert result == closes.SERVER_FULL
            else:
                assert result is None
                open_.append(address)
        elif address in open_:
            open_.remove(address)
            limits.release(address)
        assert limits.total == len(open_)
        assert not max_total or limits.total <= max_total
        for a in open_:
            assert limits.held(a) == sum(client_key(b) == client_key(a) for b in open_)
            assert not max_per_client or limits.held(a) <= max_per_client
    for address in open_:
        limits.release(address)
    assert (limits.total, limits.clients) == (0, 0)


class SharedTable:
    """Several routers' counts per client key, as garin/clientcounts.py keeps
    them (exactly here: the real table shares buckets)."""

    def __init__(self, routers: int) -> None:
        self.rows: list[dict[str, int]] = [{} for _ in range(routers)]

    def of(self, me: int) -> RouterRow:
        return RouterRow(self, me)


class RouterRow:
    def __init__(self, table: SharedTable, me: int) -> None:
        self.table, self.me = table, me

    def elsewhere(self, key: str) -> int:
        return sum(row.get(key, 0) for i, row in enumerate(self.table.rows) if i != self.me)

    def add(self, key: str, delta: int) -> None:
        row = self.table.rows[self.me]
        row[key] = row.get(key, 0) + delta
        assert row[key] >= 0
        if not row[key]:
            del row[key]


def test_the_per_client_limit_counts_the_other_routers() -> None:
    table = SharedTable(2)
    first = ConnectionLimits(0, 3, others=table.of(0))
    second = ConnectionLimits(0, 3, others=table.of(1))
    assert first.admit("10.0.0.1") is None
    assert second.admit("10.0.0.1") is None
    assert second.admit("::ffff:10.0.0.1") is None  # the same client
    assert first.admit("10.0.0.1") == closes.TOO_MANY_CONNECTIONS
    assert second.admit("10.0.0.1") == closes.TOO_MANY_CONNECTIONS
    assert first.admit("10.0.0.2") is None  # another client is not affected
    second.release("10.0.0.1")
    assert first.admit("10.0.0.1") is None
    assert table.rows == [{"10.0.0.1": 2, "10.0.0.2": 1}, {"10.0.0.1": 1}]


def test_a_proxied_connection_is_readdressed_against_every_router() -> None:
    table = SharedTable(2)
    first = ConnectionLimits(0, 1, others=table.of(0))
    second = ConnectionLimits(0, 1, others=table.of(1))
    assert second.admit("10.0.0.9", per_client=False) is None
    assert second.readdress("10.0.0.9", "203.0.113.5") is None
    assert first.admit("10.0.0.8", per_client=False) is None  # the same proxy, via the other router
    assert first.readdress("10.0.0.8", "203.0.113.5") == closes.TOO_MANY_CONNECTIONS
    # It stays the proxy's, not shared.
    assert table.rows == [{}, {"203.0.113.5": 1}]


def test_a_trusted_proxys_connections_are_not_shared() -> None:
    # They carry many clients: on the other routers they would count
    # against any client whose bucket they share.
    table = SharedTable(2)
    first = ConnectionLimits(0, 2, others=table.of(0))
    second = ConnectionLimits(0, 2, others=table.of(1))
    for _ in range(5):
        assert second.admit("10.0.0.5", per_client=False) is None
    assert table.rows == [{}, {}]
    assert first.admit("10.0.0.5") is None  # the proxy's address as a client: not affected
    assert second.readdress("10.0.0.5", "203.0.113.9") is None  # one names its client: shared
    assert table.rows == [{"10.0.0.5": 1}, {"203.0.113.9": 1}]
    for _ in range(4):
        second.release("10.0.0.5")
    second.release("203.0.113.9")
    first.release("10.0.0.5")
    assert table.rows == [{}, {}]
    assert (first.total, second.total, first.clients, second.clients) == (0, 0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(
    max_total=st.integers(0, 4),
    max_per_client=st.integers(0, 3),
    steps=st.lists(st.tuples(st.integers(0, 2), st.booleans(), ADDRESSES), max_size=60),
)
def test_three_routers_match_a_model(
    max_total: int, max_per_client: int, steps: list[tuple[int, bool, str]]
) -> None:
    table = SharedTable(3)
    routers = [ConnectionLimits(max_total, max_per_client, others=table.of(i)) for i in range(3)]
    open_: list[list[str]] = [[], [], []]  # per router, addresses of open connections
    for router, connect, address in steps:
        limits = routers[router]
        if connect:
            same_client = sum(client_key(a) == client_key(address) for held in open_ for a in held)
            result = limits.admit(address)
            if max_per_client and same_client >= max_per_client:
                assert result == closes.TOO_MANY_CONNECTIONS
            elif max_total and len(open_[router]) >= max_total:
                assert result == closes.SERVER_FULL
            else:
                assert result is None
                open_[router].append(address)
        elif address in open_[router]:
            open_[router].remove(address)
            limits.release(address)
        for i, held in enumerate(open_):
            assert routers[i].total == len(held)
            assert table.rows[i] == {client_key(a): sum(client_key(b) == client_key(a) for b in held) for a in held}
    for i, held in enumerate(open_):
        for address in held:
            routers[i].release(address)
    assert table.rows == [{}, {}, {}]


# --- the open-files limit the router asks for -----------------------------------------------


@pytest.mark.parametrize(
    ("max_connections", "soft", "hard", "set_to", "warns"),
    [
        (10_000, 1024, 1_048_576, 10_068, False),  # raised to what is needed
        (10_000, 1024, 4096, 4096, True),  # raised as far as allowed, and a warning
        (10_000, 1024, resource.RLIM_INFINITY, 10_068, False),
        (10_000, 20_000, 20_000, None, False),  # already enough
        (500, 1024, 1024, None, False),
        (0, 1024, 1024, None, False),  # no limit asked for: nothing to size
        (10_000, resource.RLIM_INFINITY, resource.RLIM_INFINITY, None, False),
    ],
)
def test_raise_file_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    max_connections: int, soft: int, hard: int, set_to: int | None, warns: bool,
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    with caplog.at_level(logging.WARNING, logger="garin"):
        result = server.raise_file_limit(max_connections, 4)
    assert calls == ([] if set_to is None else [(set_to, hard)])
    assert result == (soft if set_to is None else set_to)
    assert ("ulimit -n" in caplog.text) == warns


def test_raise_file_limit_survives_a_refusal(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING, logger="garin"):
        assert server.raise_file_limit(10_000, 4) == 1024
    assert "may open only 1024 files" in caplog.text


@pytest.mark.parametrize("max_connections,routers,hard,expected", [
    (10_000, 1, 1_048_576, 10_000),
    (10_000, 2, 1_048_576, 10_000),
    (10_000, 1, 4096, 4096 - 1 - 64),
    (10_000, 2, 4096, (4096 - 2 - 64) // 2),  # a shard may hold both routers' connections
    (100, 2, 4096, 100),
    (0, 1, 4096, 0),  # no limit asked for: none set
    (10_000, 1, resource.RLIM_INFINITY, 10_000),
    (10_000, 4, 60, 1),
])
def test_the_connection_limit_is_lowered_to_what_a_shard_can_open(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    max_connections: int, routers: int, hard: int, expected: int,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, hard))
    with caplog.at_level(logging.WARNING, logger="garin"):
        assert server.connections_that_fit(max_connections, routers) == expected
    assert ("GARIN_MAX_CONNECTIONS lowered" in caplog.text) == (expected != max_connections)

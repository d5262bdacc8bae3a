"""The ban list: strike counting, expiry, refresh from the store, the SQLite store."""

from __future__ import annotations

import pytest

from garin.bans import FOREVER, BanList, BanPolicy
from garin.banstore import BanStore


def test_strikes_within_the_window_ban_for_the_duration() -> None:
    bans = BanList(BanPolicy(strikes=3, window_s=10, ban_s=60))
    assert bans.strike("sub", 0) is None
    assert bans.strike("sub", 4) is None
    assert bans.strike("sub", 9) == 69
    assert bans.is_banned("sub", 68.9)
    assert not bans.is_banned("sub", 69)
    assert not bans.is_banned("other", 10)


def test_strikes_outside_the_window_do_not_add_up() -> None:
    bans = BanList(BanPolicy(strikes=2, window_s=10, ban_s=60))
    assert bans.strike("sub", 0) is None
    assert bans.strike("sub", 10.5) is None
    assert bans.strike("sub", 20) == 80


def test_a_ban_resets_the_count() -> None:
    bans = BanList(BanPolicy(strikes=2, window_s=100, ban_s=5))
    bans.strike("sub", 0)
    assert bans.strike("sub", 1) == 6
    assert bans.strike("sub", 7) is None


def test_zero_strikes_turns_automatic_bans_off() -> None:
    bans = BanList(BanPolicy(strikes=0))
    assert all(bans.strike("sub", t) is None for t in range(100))
    assert not bans.is_banned("sub", 100)


def test_refresh_keeps_unwritten_local_bans_and_drops_lifted_ones() -> None:
    bans = BanList(BanPolicy(strikes=1, window_s=10, ban_s=60))
    assert bans.strike("local", 0) == 60
    bans.replace({"manual": FOREVER, "old": 5}, now=10)
    assert bans.is_banned("local", 10) and bans.is_banned("manual", 10**9)
    assert not bans.is_banned("old", 10)
    bans.written("local")
    bans.replace({}, now=11)  # lifted with `garin ban remove`
    assert not bans.is_banned("local", 11)


@pytest.fixture
def store(tmp_path) -> BanStore:
    return BanStore(tmp_path / "bans.sqlite3")


def test_store_add_list_remove_and_expiry(store: BanStore) -> None:
    store.add("alice", None, "manual", now=0)
    store.add("bob", 100, "rate limit", now=1)
    assert store.active(50) == {"alice": FOREVER, "bob": 100}
    assert store.active(100) == {"alice": FOREVER}
    assert [row[0] for row in store.listing(50)] == ["alice", "bob"]
    assert store.remove("alice") and not store.remove("alice")
    assert store.active(0) == {"bob": 100}


def test_store_survives_reopening_and_updates_in_place(tmp_path) -> None:
    path = tmp_path / "bans.sqlite3"
    BanStore(path).add("carol", 10, "first", now=0)
    again = BanStore(path)
    again.add("carol", FOREVER, "second", now=1)
    assert again.active(1000) == {"carol": FOREVER}
    assert again.listing(0)[0][2] == "second"


def _open_store(path: str) -> None:
    BanStore(path).add("x", None, "race", now=0)


def test_two_processes_creating_the_store_at_once(tmp_path) -> None:
    import multiprocessing

    for trial in range(10):
        path = str(tmp_path / f"race-{trial}.sqlite3")
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=_open_store, args=(path,)) for _ in range(3)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=30)
        assert [proc.exitcode for proc in procs] == [0, 0, 0]

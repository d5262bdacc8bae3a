"""The ban list: the strike rules, the in-memory copy, the shared SQLite store,
and RouterBans counting strikes from several processes together."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from garin.bans import FOREVER, Ban, BanList, BanPolicy, Count, Ignore, later, subject_of
from garin.banstore import BanStore, open_at_start, where
from garin.config import Config, ConfigError, load_config
from garin.router import bans as router_bans
from garin.router.bans import RouterBans

# -- the rules -------------------------------------------------------------------


def test_the_last_strike_of_the_window_bans_for_the_duration() -> None:
    policy = BanPolicy(strikes=3, window_s=10, ban_s=60)
    assert policy.judge(None, 0, now=0) == Count()
    assert policy.judge(None, 1, now=4) == Count()
    assert policy.judge(None, 2, now=9) == Ban(69)
    assert policy.window_start(20) == 10


def test_a_banned_subject_gets_no_strikes() -> None:
    policy = BanPolicy(strikes=1, window_s=10, ban_s=60)
    assert policy.judge(FOREVER, 5, now=0) == Ignore()
    assert policy.judge(100, 5, now=99) == Ignore()
    assert policy.judge(100, 0, now=100) == Ban(160)  # that ban has ended


def test_zero_strikes_turns_automatic_bans_off() -> None:
    policy = BanPolicy(strikes=0)
    assert all(policy.judge(None, n, now=n) == Ignore() for n in range(100))


def test_later_keeps_the_longer_ban() -> None:
    assert later(None, 5) == 5 and later(5, None) == 5 and later(None, None) is None
    assert later(FOREVER, 3600) == FOREVER and later(10, 20) == 20


def test_ban_list_extend_never_shortens_and_refresh_takes_the_store() -> None:
    bans = BanList()
    bans.extend("manual", FOREVER)
    bans.extend("manual", 3600)
    assert bans.is_banned("manual", 10**9)
    bans.extend("auto", 60)
    assert bans.is_banned("auto", 59.9) and not bans.is_banned("auto", 60)
    bans.replace({"manual": FOREVER, "old": 5}, now=10)
    assert bans.is_banned("manual", 10) and not bans.is_banned("old", 10)
    bans.replace({}, now=11)  # lifted with `garin ban remove`
    assert not bans.is_banned("manual", 11)


# -- the store -------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> BanStore:
    return BanStore(tmp_path / "bans.sqlite3")


def strike_rows(store: BanStore) -> int:
    with sqlite3.connect(store.path) as db:
        return int(db.execute("SELECT count(*) FROM strikes").fetchone()[0])


def test_store_add_list_remove_and_expiry(store: BanStore) -> None:
    store.add("alice", None, "manual", now=0)
    store.add("bob", 100, "rate limit", now=1)
    assert store.active(50) == {"alice": FOREVER, "bob": 100}
    assert store.active(100) == {"alice": FOREVER}
    assert [row[0] for row in store.listing(50)] == ["alice", "bob"]
    assert store.remove("alice") and not store.remove("alice")
    assert store.active(0) == {"bob": 100}


def test_store_survives_reopening_and_manual_adds_update_in_place(tmp_path: Path) -> None:
    path = tmp_path / "bans.sqlite3"
    BanStore(path).add("carol", 10, "first", now=0)
    again = BanStore(path)
    again.add("carol", FOREVER, "second", now=1)
    assert again.active(1000) == {"carol": FOREVER}
    assert again.listing(0)[0][2] == "second"
    again.add("carol", 50, "the operator may shorten a ban", now=2)
    assert again.active(3) == {"carol": 50}


def test_store_extend_never_shortens_a_ban(store: BanStore) -> None:
    store.add("forever", None, "manual", now=0)
    assert store.extend("forever", 3600, "rate limit", now=1) == FOREVER
    store.add("week", 7 * 86400, "manual", now=0)
    assert store.extend("week", 3600, "rate limit", now=1) == 7 * 86400
    assert store.extend("week", 8 * 86400, "rate limit", now=1) == 8 * 86400
    store.add("expired", 5, "manual", now=0)
    assert store.extend("expired", 3600, "rate limit", now=10) == 3600
    assert store.active(10) == {"forever": FOREVER, "week": 8 * 86400, "expired": 3600}
    reasons = {subject: reason for subject, _, reason, _ in store.listing(10)}
    assert reasons == {"forever": "manual", "week": "rate limit", "expired": "rate limit"}


def test_store_strikes_ban_within_the_window(store: BanStore) -> None:
    policy = BanPolicy(strikes=3, window_s=10, ban_s=60)
    assert store.strike("sub", 0, policy) == Count()
    assert store.strike("sub", 4, policy) == Count()
    assert store.strike("other", 5, policy) == Count()
    assert store.strike("sub", 9, policy) == Ban(69)
    assert store.active(68) == {"sub": 69}
    assert store.strike("sub", 10, policy) == Ignore()  # banned: no strike
    assert store.active(69) == {}
    # The ban cleared its strikes: counting starts afresh once it has ended.
    assert store.strike("sub", 70, policy) == Count()


def test_store_strikes_outside_the_window_do_not_add_up(store: BanStore) -> None:
    policy = BanPolicy(strikes=2, window_s=10, ban_s=60)
    assert store.strike("sub", 0, policy) == Count()
    assert store.strike("sub", 10.5, policy) == Count()
    assert store.strike("sub", 20, policy) == Ban(80)


def test_strikes_never_shorten_a_manual_ban(store: BanStore) -> None:
    """The reported bug: a manual ban, then three rate-limit closes, left a 1-hour ban."""
    policy = BanPolicy(strikes=3, window_s=600, ban_s=3600)
    store.add("zed", None, "manual", now=0)
    assert [store.strike("zed", t, policy) for t in (1, 2, 3)] == [Ignore()] * 3
    assert store.active(10**9) == {"zed": FOREVER}
    assert store.listing(10)[0][2] == "manual"
    assert strike_rows(store) == 0


def test_old_strikes_are_pruned(store: BanStore) -> None:
    policy = BanPolicy(strikes=1000, window_s=10, ban_s=60)
    for t in range(100):
        store.strike(f"sub-{t}", float(t), policy)
    assert strike_rows(store) == 11  # those at 89..99
    store.strike("late", 1000.0, policy)
    assert strike_rows(store) == 1


def test_a_store_without_the_strikes_table_gets_one(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # a ban list from before strikes were stored
        db.execute("CREATE TABLE bans (subject TEXT PRIMARY KEY, until REAL, reason TEXT NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO bans VALUES ('kept', NULL, 'manual', 0)")
    store = BanStore(path)
    assert store.strike("new", 1, BanPolicy(strikes=2)) == Count()
    assert store.active(1) == {"kept": FOREVER}


def _open_store(path: str) -> None:
    BanStore(path).add("x", None, "race", now=0)


def test_two_processes_creating_the_store_at_once(tmp_path: Path) -> None:
    for trial in range(10):
        path = str(tmp_path / f"race-{trial}.sqlite3")
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=_open_store, args=(path,)) for _ in range(3)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=30)
        assert [proc.exitcode for proc in procs] == [0, 0, 0]


def _strike_many(path: str, count: int, start: float) -> None:
    store = BanStore(path)
    policy = BanPolicy(strikes=1000, window_s=3600, ban_s=60)
    for n in range(count):
        store.strike("sub", start + n / 1000, policy)


def test_strikes_from_several_processes_at_once_all_count(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    BanStore(path)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_strike_many, args=(path, 50, 1000.0 + p)) for p in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert strike_rows(BanStore(path)) == 200


# -- RouterBans: one per process, one store ------------------------------------------


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.fixture
def fast_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_bans, "REFRESH_S", 0.05)


@pytest.mark.usefixtures("fast_refresh")
async def test_strikes_through_two_routers_add_up(tmp_path: Path) -> None:
    """The reported bug: with 2 routers, 2 rate-limit closes on each did not ban at 3 strikes."""
    path = str(tmp_path / "bans.sqlite3")
    policy = BanPolicy(strikes=3, window_s=600, ban_s=3600)
    one, two = RouterBans(path, policy), RouterBans(path, policy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.run)
        nursery.start_soon(two.run)
        one.rate_limited("spammer")
        two.rate_limited("spammer")
        one.rate_limited("bystander")
        await trio.sleep(0.3)
        assert not one.is_banned("spammer") and not two.is_banned("spammer")
        two.rate_limited("spammer")  # the third strike, wherever it lands
        await wait_for(lambda: one.is_banned("spammer") and two.is_banned("spammer"))
        assert not one.is_banned("bystander") and not two.is_banned("bystander")
        nursery.cancel_scope.cancel()
    until = BanStore(path).active(0)["spammer"]
    assert until == pytest.approx(time.time() + 3600, abs=30)


@pytest.mark.usefixtures("fast_refresh")
async def test_rate_limit_closes_never_shorten_a_manual_ban(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    BanStore(path).add("zed", None, "manual", now=0)
    bans = RouterBans(path, BanPolicy(strikes=1, window_s=600, ban_s=60))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bans.run)
        await wait_for(lambda: bans.is_banned("zed"))
        bans.list.bans.clear()  # as if the ban were added a moment ago, not yet refreshed
        for _ in range(3):
            bans.rate_limited("zed")
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert BanStore(path).active(10**9) == {"zed": FOREVER}


async def test_strikes_wait_for_the_store_and_never_block(tmp_path: Path) -> None:
    bans = RouterBans(str(tmp_path / "bans.sqlite3"), BanPolicy(strikes=2, window_s=600, ban_s=60))
    for _ in range(router_bans.MAX_QUEUED_STRIKES + 10):  # before run(): queued, the rest dropped
        bans.rate_limited("early")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bans.run)
        await wait_for(lambda: bans.is_banned("early"))
        nursery.cancel_scope.cancel()


async def test_automatic_bans_off_records_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    bans = RouterBans(path, BanPolicy(strikes=0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bans.run)
        for _ in range(10):
            bans.rate_limited("free")
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert strike_rows(BanStore(path)) == 0 and BanStore(path).active(0) == {}


# --- whom a token's strikes count against ---------------------------------------------


def test_the_subject_is_the_sub_claim() -> None:
    assert subject_of({"sub": "alice", "name": "Alice", "exp": 1}) == "alice"


def test_without_sub_the_subject_is_a_documented_hash_of_the_identifying_claims() -> None:
    claims = {"username": "alice", "iss": "https://auth.example", "iat": 1, "exp": 2, "nbf": 0, "jti": "a1"}
    # What the README says, computed independently.
    expected = "nosub:" + hashlib.sha256(
        b'{"iss":"https://auth.example","username":"alice"}'
    ).hexdigest()[:32]
    assert subject_of(claims) == expected
    # A fresh token for the same user (other times, another id): the same subject.
    assert subject_of({**claims, "iat": 100, "exp": 200, "jti": "b2"}) == expected
    # Another user, or another issuer: another subject.
    assert subject_of({**claims, "username": "bob"}) != expected
    assert subject_of({**claims, "iss": "https://other.example"}) != expected


def test_a_sub_that_is_no_string_falls_back_too() -> None:
    assert subject_of({"sub": 42}).startswith("nosub:")
    assert subject_of({"sub": 42}) != subject_of({"sub": 43})


def test_a_token_with_only_per_token_claims_identifies_only_itself() -> None:
    """Nothing identifies a user: hashing {} would put every such user under
    one subject, and one spammer would get them all banned."""
    one, two = subject_of({"iat": 1, "exp": 2}), subject_of({"iat": 1, "exp": 3})
    assert one.startswith("nosub:") and two.startswith("nosub:") and one != two


def test_the_fallback_never_raises_on_odd_claims() -> None:
    odd = {"name": "é\u202e", "n": [1, {"b": None, "a": 1.5}], "big": 2**80}
    assert subject_of(odd) == subject_of(dict(reversed(list(odd.items()))))


# -- the server's check at start ---------------------------------------------------


def server_config(**environ: str) -> Config:
    return load_config({}, {"JWT_DECODE_SECRET": "s" * 32, "ALLOWED_ORIGINS": "*", **environ})


def test_an_unusable_ban_list_is_refused_at_start_naming_garin_ban_db(tmp_path: Path) -> None:
    """Else the server serves with no bans at all, logging an error every 10 s."""
    with pytest.raises(ConfigError) as info:
        open_at_start(server_config(GARIN_BAN_DB=str(tmp_path)))
    assert str(info.value) == f"GARIN_BAN_DB: {tmp_path} is a directory; name a file, e.g. {tmp_path / 'bans.sqlite3'}"
    with pytest.raises(ConfigError) as info:
        open_at_start(server_config(GARIN_BAN_DB="/proc/garin-nope/bans.sqlite3"))
    assert str(info.value) == (
        "GARIN_BAN_DB: cannot create /proc/garin-nope for /proc/garin-nope/bans.sqlite3: No such file or directory"
    )
    (tmp_path / "corrupt.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="^GARIN_BAN_DB: cannot use .*corrupt.sqlite3: file is not a database$"):
        open_at_start(server_config(GARIN_BAN_DB=str(tmp_path / "corrupt.sqlite3")))
    # A usable path is created, as the routers would; bans off: nothing to check.
    open_at_start(server_config(GARIN_BAN_DB=str(tmp_path / "new" / "bans.sqlite3")))
    assert (tmp_path / "new" / "bans.sqlite3").is_file()
    open_at_start(server_config(GARIN_BAN_DB=""))


def test_with_redis_the_ban_list_file_is_neither_checked_nor_named(tmp_path: Path) -> None:
    config = server_config(GARIN_BAN_DB=str(tmp_path), GARIN_REDIS_URL="redis://127.0.0.1:1/0")
    open_at_start(config)  # bans live in Redis: the file is never used
    assert where(config) == "ban list: Redis (GARIN_REDIS_URL; GARIN_BAN_DB is not used)"
    assert where(server_config(GARIN_BAN_DB="x.sqlite3")) == f"ban list: {Path('x.sqlite3').absolute()}"

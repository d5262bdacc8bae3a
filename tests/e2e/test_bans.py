"""The ban list end to end: strikes from the rate limiter, restarts, `garin ban`."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import subprocess
import sys
import time

import jwt
import pytest
from conftest import (
    USERLEAVE,
    auth_frame,
    expect_close,
    expect_join,
    join_frame,
    message_frame,
    new_room,
    paused,
    running_server,
)
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.e2e


def ban_cli(server, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garin", "ban", *args], env=env or server.env(), cwd=cwd or server.workdir,
        capture_output=True, text=True, timeout=30,
    )


def spam_until_closed(server, subject: str, room: str) -> None:
    with server.connect() as ws:
        ws.send(auth_frame(server.token(subject)))
        ws.send(join_frame(subject, room))
        expect_join(ws, subject, 1)
        ws.send(message_frame("one"))
        ws.send(message_frame("two"))
        expect_close(ws, 1008, "rate limit exceeded")


def hop_until_closed(server, subject: str, room: str) -> None:
    """Leave and rejoin until the join limit (1 here) closes the connection."""
    with server.connect() as ws:
        ws.send(auth_frame(server.token(subject)))
        ws.send(join_frame(subject, room))
        expect_join(ws, subject, 1)
        ws.send(USERLEAVE)
        ws.send(join_frame(subject, room))
        expect_close(ws, 1008, "join limit exceeded")


def refused_as_banned(server, subject: str) -> bool:
    with server.connect() as ws:
        try:
            ws.send(auth_frame(server.token(subject)))
            ws.send(join_frame(subject, new_room("ban")))
            ws.recv(timeout=5)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return (exc.rcvd.code, exc.rcvd.reason) == (4003, "banned")
        return False


def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.2)


def test_repeat_rate_limit_offenders_are_banned_across_restarts(tmp_path) -> None:
    env = {
        "GARIN_RATE_LIMIT_COUNT": "1",
        "GARIN_RATE_LIMIT_WINDOW": "10",
        "GARIN_JOIN_LIMIT_COUNT": "1",
        "GARIN_JOIN_LIMIT_WINDOW": "600",
        "GARIN_BAN_STRIKES": "2",
        "GARIN_BAN_WINDOW": "600",
        "GARIN_BAN_DURATION": "600",
        "GARIN_BAN_DB": str(tmp_path / "bans.sqlite3"),
    }
    with running_server(**env) as server:
        spam_until_closed(server, "spammer", new_room("spam"))
        assert not refused_as_banned(server, "spammer")  # one strike is not enough
        spam_until_closed(server, "spammer", new_room("spam"))
        # The strike is counted in the shared store by a worker thread: the
        # ban lands milliseconds after the close.
        eventually(lambda: refused_as_banned(server, "spammer"))
        assert not refused_as_banned(server, "bystander")
        # The join limit closes too, but is no strike: a person may hop rooms fast.
        hop_until_closed(server, "hopper", new_room("hop"))
        hop_until_closed(server, "hopper", new_room("hop"))
        assert not refused_as_banned(server, "hopper")
        eventually(lambda: "spammer" in ban_cli(server, "list").stdout)
    with running_server(**env) as server:  # a new server on the same ban list
        assert refused_as_banned(server, "spammer")
        result = ban_cli(server, "remove", "spammer")
        assert result.returncode == 0, result.stderr
        eventually(lambda: not refused_as_banned(server, "spammer"))


def test_garin_ban_add_reaches_a_running_router(tmp_path) -> None:
    with running_server(GARIN_BAN_DB=str(tmp_path / "bans.sqlite3")) as server:
        assert not refused_as_banned(server, "troll")
        result = ban_cli(server, "add", "troll", "--for", "1h", "--reason", "abuse")
        assert result.returncode == 0 and "banned troll" in result.stdout
        eventually(lambda: refused_as_banned(server, "troll"))
        listing = ban_cli(server, "list").stdout
        assert "troll" in listing and "abuse" in listing


@pytest.mark.usefixtures("hard_cap")
def test_garin_ban_from_another_directory_with_ban_db(tmp_path) -> None:
    """The server's GARIN_BAN_DB is relative to its working directory; `garin ban`
    run elsewhere reaches the same file with --ban-db and says which file it used."""
    with running_server(GARIN_BAN_DB="relative-bans.sqlite3") as server:
        path = server.workdir / "relative-bans.sqlite3"
        env = {k: v for k, v in server.env().items() if k != "GARIN_BAN_DB"}
        result = ban_cli(server, "add", "zed", "--ban-db", str(path), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"banned zed (ban list: {path})\n"
        eventually(lambda: refused_as_banned(server, "zed"))
        elsewhere = ban_cli(server, "list", cwd=tmp_path, env={**env, "XDG_STATE_HOME": str(tmp_path / "state")})
        default = tmp_path / "state" / "garin" / "bans.sqlite3"
        assert elsewhere.stdout == f"no active bans (ban list: {default}, no such file yet)\n"
        assert not (tmp_path / "state").exists()


@pytest.mark.usefixtures("hard_cap")
def test_garin_ban_anywhere_reaches_a_server_with_the_default_ban_list(tmp_path) -> None:
    """No GARIN_BAN_DB anywhere: the server (working in its own directory) and
    `garin ban` run from another directory use the same file,
    $XDG_STATE_HOME/garin/bans.sqlite3, and the server logs which at start."""
    state = tmp_path / "state"
    default = state / "garin" / "bans.sqlite3"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_server(XDG_STATE_HOME=str(state)) as server:
        assert "GARIN_BAN_DB" not in server.env()
        assert elsewhere != server.workdir
        result = ban_cli(server, "add", "zed", cwd=elsewhere)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"banned zed (ban list: {default})\n"
        eventually(lambda: refused_as_banned(server, "zed"))
        assert not refused_as_banned(server, "bystander")
        assert list(elsewhere.iterdir()) == [] and list(server.workdir.glob("*.sqlite3")) == []
        assert state.stat().st_mode & 0o777 == default.parent.stat().st_mode & 0o777 == 0o700
    assert server.final_log.count(f"ban list: {default}") == 1, server.final_log


@pytest.mark.usefixtures("hard_cap")
def test_tokens_without_sub_collect_strikes_under_their_fallback_subject(tmp_path) -> None:
    """A GarinChat-style token with no `sub` used to collect no strikes at all
    (nothing to ban). Now its strikes count against `nosub:` + a hash of its
    other claims, the same for every token minted for that user, as the README
    says: fresh tokens do not escape the ban, and other users are not caught."""
    secret = "s" * 48
    env = {
        "JWT_DECODE_SECRET": secret,
        "GARIN_RATE_LIMIT_COUNT": "1",
        "GARIN_RATE_LIMIT_WINDOW": "10",
        "GARIN_BAN_STRIKES": "2",
        "GARIN_BAN_DB": str(tmp_path / "bans.sqlite3"),
    }
    issued = iter(range(1000))

    def subless(username: str, ttl_s: float | None = 3600) -> str:
        # A fresh token every time: another iat, exp and jti.
        iat = int(time.time()) - next(issued)
        claims = {"username": username, "iat": iat, "exp": iat + 3600, "jti": f"{username}-{iat}"}
        return jwt.encode(claims, secret.encode(), algorithm="HS256")

    with running_server(minter=subless, **env) as server:
        spam_until_closed(server, "spammer", new_room("spam"))
        assert not refused_as_banned(server, "spammer")
        spam_until_closed(server, "spammer", new_room("spam"))
        eventually(lambda: refused_as_banned(server, "spammer"))
        assert not refused_as_banned(server, "bystander")
        expected = "nosub:" + hashlib.sha256(b'{"username":"spammer"}').hexdigest()[:32]
        eventually(lambda: f"{expected}\tuntil " in ban_cli(server, "list").stdout)
        result = ban_cli(server, "remove", expected)
        assert result.returncode == 0, result.stderr
        eventually(lambda: not refused_as_banned(server, "spammer"))


def test_username_claim_overrides_the_join(tmp_path) -> None:
    with running_server(GARIN_USERNAME_CLAIM="sub") as server:
        room = new_room("claim")
        with server.connect() as ws:
            ws.send(auth_frame(server.token("realname")))
            ws.send(join_frame("someone-else", room))
            expect_join(ws, "realname", 1)
        with server.connect() as ws:
            ws.send(auth_frame(server.token("ab")))  # too short for a username
            expect_close(ws, 1008, "token has no usable username claim")


def spam(server, ws, subject: str) -> None:
    """An authed, joined `ws` trips the rate limit (1 message per window here)."""
    ws.send(message_frame("one"))
    ws.send(message_frame("two"))
    expect_close(ws, 1008, "rate limit exceeded")


@pytest.mark.usefixtures("hard_cap")
def test_rate_limit_closes_never_shorten_a_manual_ban(tmp_path) -> None:
    """`garin ban add` (until removed) while the subject is connected, then 3
    rate-limit closes: the ban stays until removed (it became 1 hour)."""
    env = {
        "GARIN_RATE_LIMIT_COUNT": "1",
        "GARIN_RATE_LIMIT_WINDOW": "10",
        "GARIN_BAN_STRIKES": "3",
        "GARIN_BAN_DB": str(tmp_path / "bans.sqlite3"),
    }
    with running_server(**env) as server, contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(3):
            ws = stack.enter_context(server.connect())
            ws.send(auth_frame(server.token("zed")))
            ws.send(join_frame("zed", new_room("zed")))
            expect_join(ws, "zed", 1)
            sockets.append(ws)
        result = ban_cli(server, "add", "zed")
        assert result.returncode == 0, result.stderr
        for ws in sockets:
            spam(server, ws, "zed")
        time.sleep(1)  # let the strikes reach the store
        eventually(lambda: refused_as_banned(server, "zed"))
        listing = ban_cli(server, "list").stdout
        assert "zed\tuntil removed\tmanual" in listing, listing


@pytest.mark.usefixtures("hard_cap")
def test_strikes_through_two_routers_add_up(tmp_path) -> None:
    """With 2 routers, 2 rate-limit closes on one and 1 on the other ban at 3
    strikes (each router used to count only its own)."""
    from test_faults import roles

    env = {
        "GARIN_ROUTERS": "2",
        "GARIN_RATE_LIMIT_COUNT": "1",
        "GARIN_RATE_LIMIT_WINDOW": "10",
        "GARIN_BAN_STRIKES": "3",
        "GARIN_BAN_DB": str(tmp_path / "bans.sqlite3"),
    }
    with running_server(**env) as server:
        assert server.process is not None
        pids = roles(server.process.pid)
        routers = [pids["router 0"], pids["router 1"]]
        strikes = 0
        for router, times in ((routers[0], 2), (routers[1], 1)):
            for _ in range(times):
                with only_router(router, routers), server.connect() as ws:
                    ws.send(auth_frame(server.token("spammer")))
                    ws.send(join_frame("spammer", new_room("spam")))
                    expect_join(ws, "spammer", 1)
                    spam(server, ws, "spammer")
                strikes += 1
                # Before the next SIGSTOP: a stopped router's strike would wait with it.
                eventually(lambda: stored(tmp_path / "bans.sqlite3", strikes))
        for router in routers:
            with only_router(router, routers):
                eventually(lambda: refused_as_banned(server, "spammer"))


@contextlib.contextmanager
def only_router(chosen: int, routers: list[int]):
    """New connections reach only `chosen`: the other routers are stopped
    (SIGSTOP) meanwhile, since a shared listening socket gives each
    connection to whichever router accepts first."""
    with paused(*[pid for pid in routers if pid != chosen]):
        yield


def stored(path, strikes: int) -> bool:
    """`strikes` strikes of "spammer" are in the store (the third one bans, clearing them)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        if strikes == 3:
            return db.execute("SELECT count(*) FROM bans WHERE subject = 'spammer'").fetchone()[0] == 1
        return db.execute("SELECT count(*) FROM strikes WHERE subject = 'spammer'").fetchone()[0] == strikes

"""The ban list end to end: strikes from the rate limiter, restarts, `garin ban`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import (
    USERLEAVE,
    auth_frame,
    expect_close,
    expect_join,
    join_frame,
    message_frame,
    new_room,
    running_server,
)
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.e2e


def ban_cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garin", "ban", *args], env=server.env(), cwd=server.workdir,
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
        assert refused_as_banned(server, "spammer")
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

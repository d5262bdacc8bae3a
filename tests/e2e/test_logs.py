"""What operators read: log lines, in both formats, never carrying secrets."""

from __future__ import annotations

import json

import pytest
from conftest import GarinServer, auth_frame, expect_close, expect_join, join_frame, message_frame, new_room, running_server

pytestmark = pytest.mark.e2e

SECRET_BODY = "the-body-must-not-be-logged-7f3a"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_have_conn_ids_and_no_tokens_or_bodies(fmt: str) -> None:
    with running_server(GARIN_LOG_FORMAT=fmt, GARIN_RATE_LIMIT_COUNT="0") as server:
        token = server.token("logged")
        room = new_room("logs")
        with server.connect() as a, server.connect() as b:
            a.send(auth_frame(token))
            a.send(join_frame("logged", room))
            expect_join(a, "logged", 1)
            b.send(auth_frame(server.token("other")))
            b.send(join_frame("other", room))
            expect_join(b, "other", 2)
            a.send(message_frame(SECRET_BODY))
            b.recv(timeout=5)
            b.send("not json")
            expect_close(b, 1008, "invalid json")
        server.stop()
        text = server.final_log
    assert token not in text and SECRET_BODY not in text
    lines = [line for line in text.splitlines() if line.strip()]
    if fmt == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "role", "pid", "message"} <= entry.keys() for entry in entries)
        assert {entry["role"] for entry in entries} >= {"garin", "router.0", "shard.0"}
        closing = [e for e in entries if "closing 1008 invalid json" in e["message"]]
    else:
        closing = [line for line in lines if "closing 1008 invalid json" in line]
    assert len(closing) == 1 and "conn " in str(closing[0])


def test_a_weak_secret_is_warned_about_once_in_the_log_format() -> None:
    """`garin run` says it once, as a log line: not once per child process."""
    server = GarinServer(env_overrides={"GARIN_ALLOW_WEAK_SECRET": "1", "GARIN_LOG_FORMAT": "json"}, secret="short-dev")
    server.start()
    try:
        server.stop()
    finally:
        server.process = None
    text = server.final_log
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    warnings = [e for e in entries if "JWT_DECODE_SECRET is short" in e["message"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning" and warnings[0]["role"] == "garin", warnings


def test_an_old_ban_list_in_the_working_directory_is_warned_about_once() -> None:
    """An upgraded install whose bans were in ./garin-bans.sqlite3 (older
    garin versions) must hear that the file is not read: its bans would be
    lifted without a word."""
    server = GarinServer(env_overrides={"GARIN_LOG_FORMAT": "json"})
    server.env_overrides["XDG_STATE_HOME"] = str(server.workdir / "state")
    old = server.workdir / "garin-bans.sqlite3"
    old.write_bytes(b"")
    server.start()
    try:
        server.stop()
    finally:
        server.process = None
    entries = [json.loads(line) for line in server.final_log.splitlines() if line.strip()]
    warnings = [e for e in entries if "garin-bans.sqlite3" in e["message"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning" and warnings[0]["role"] == "garin", warnings
    assert f"GARIN_BAN_DB={old}" in warnings[0]["message"]
    assert str(server.workdir / "state" / "garin" / "bans.sqlite3") in warnings[0]["message"]

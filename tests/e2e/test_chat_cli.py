"""`garin chat`, the terminal client, against a real server."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time

import pytest
from conftest import GarinServer, expect_join, expect_message, free_port, message_frame, new_room, recv_json
from websockets.sync.client import ClientConnection

from garin.auth import make_token

pytestmark = pytest.mark.e2e


class Chat:
    """A `garin chat` process whose output lines are collected by a thread."""

    def __init__(
        self, server: GarinServer, room: str, user: str, *extra: str, url: str | None = "", **env_overrides: str
    ) -> None:
        """`url`: "" for the server's, None for none (garin chat's default)."""
        env = {**server.env(), "PYTHONUNBUFFERED": "1", **env_overrides}
        where = [] if url is None else [url or server.url]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "garin", "chat", *where, "--room", room, "--user", user, *extra],
            env=env, cwd=server.workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, needle: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(f"{needle!r} not seen; output so far: {self.seen}") from None
            self.seen.append(line)
            if needle in line:
                return

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)  # EOF once the process is gone
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


def talk_and_quit(chat: Chat, other: ClientConnection) -> None:
    """`chat` (termuser) has joined `other`'s (webuser's) room: they talk both
    ways, then /quit leaves with 1000 bye and exit code 0."""
    chat.expect("* termuser joined (2 here)")
    expect_join(other, "termuser", 2)
    chat.type("hello from the terminal ✓")
    expect_message(other, "termuser", "hello from the terminal ✓")
    other.send(message_frame("hello back"))
    chat.expect("<webuser> hello back")
    chat.type("/quit")
    chat.expect("# closed by server: 1000 bye")
    assert chat.proc.wait(timeout=10) == 0
    assert recv_json(other) == {"type": "userleave", "username": "termuser", "totalUsers": 1}


def test_chat_client_talks_to_a_browser_style_client(garin: GarinServer, clients) -> None:
    room = new_room("chat")
    other = clients.join("webuser", room)
    chat = Chat(garin, room, "termuser")
    try:
        talk_and_quit(chat, other)
    finally:
        chat.finish()


def test_chat_client_shows_why_it_was_refused(garin: GarinServer) -> None:
    bad = make_token("not-the-server-secret-0123456789abcdef", "mallory", time.time(), 60)
    chat = Chat(garin, new_room("chat"), "mallory", "--token", bad)
    try:
        chat.expect("# closed by server: 1008 invalid token")
        assert chat.proc.wait(timeout=10) == 1
    finally:
        chat.finish()


def test_chat_client_reports_a_refused_origin(garin: GarinServer) -> None:
    chat = Chat(garin, new_room("chat"), "visitor", "--origin", "http://elsewhere.test")
    try:
        chat.expect("# server refused the handshake: HTTP 403 origin not allowed (Origin sent: http://elsewhere.test;")
        assert chat.proc.wait(timeout=10) == 1
        assert not any("b'" in line or "Traceback" in line for line in chat.seen), chat.seen
    finally:
        chat.finish()


@pytest.mark.usefixtures("hard_cap")
def test_chat_client_defaults_to_the_configured_port(garin: GarinServer, clients) -> None:
    """No URL: ws://127.0.0.1:<GARIN_PORT>/ (it was always port 8080); GARIN_PORT beats PORT."""
    room = new_room("chat")
    other = clients.join("webuser", room)
    chat = Chat(garin, room, "termuser", url=None, PORT="1")
    try:
        chat.expect(f"# connected to ws://127.0.0.1:{garin.port}/ as termuser in {room}")
        chat.expect("* termuser joined (2 here)")
        expect_join(other, "termuser", 2)
    finally:
        chat.finish()


@pytest.mark.usefixtures("hard_cap")
def test_join_moves_to_another_room(garin: GarinServer, clients) -> None:
    """/join in a room leaves it first (it closed 1008 already joined)."""
    first, second = new_room("chat"), new_room("chat")
    here = clients.join("firstroom", first)
    there = clients.join("secondroom", second)
    chat = Chat(garin, first, "termuser")
    try:
        chat.expect("* termuser joined (2 here)")
        expect_join(here, "termuser", 2)
        chat.type(f"/join {second}")
        chat.expect("* termuser joined (2 here)")
        assert recv_json(here) == {"type": "userleave", "username": "termuser", "totalUsers": 1}
        expect_join(there, "termuser", 2)
        chat.type("moved")
        expect_message(there, "termuser", "moved")
        chat.type("/leave")
        chat.expect("# left the room")
        assert recv_json(there) == {"type": "userleave", "username": "termuser", "totalUsers": 1}
        chat.type("anyone?")
        chat.expect("# not sent: not in a room")
        chat.type("/quit")
        chat.expect("# bye")
        assert chat.proc.wait(timeout=10) == 0
    finally:
        chat.finish()


@pytest.mark.usefixtures("hard_cap")
def test_chat_client_reports_a_server_that_is_not_there(garin: GarinServer) -> None:
    port = free_port()
    chat = Chat(garin, new_room("chat"), "visitor", url=None, GARIN_PORT=str(port))
    try:
        chat.expect(f"# could not connect to ws://127.0.0.1:{port}/: Connection refused")
        assert chat.proc.wait(timeout=10) == 1
    finally:
        chat.finish()


@pytest.mark.usefixtures("hard_cap")
def test_chat_client_refuses_an_http_url(garin: GarinServer) -> None:
    chat = Chat(garin, new_room("chat"), "visitor", url=f"http://127.0.0.1:{garin.port}/")
    try:
        chat.expect("garin: error: ")
        assert chat.proc.wait(timeout=10) == 2
        assert "use ws:// or wss://" in chat.seen[-1] and len(chat.seen) == 1, chat.seen
    finally:
        chat.finish()


@pytest.mark.usefixtures("hard_cap")
def test_chat_client_shows_what_others_send_escaped(garin: GarinServer, clients) -> None:
    room = new_room("chat")
    chat = Chat(garin, room, "termuser")
    try:
        chat.expect("* termuser joined (1 here)")
        other = clients.join("alice> hi", room)
        chat.expect('* "alice> hi" joined (2 here)')
        other.send(message_frame("ok\n* mallory left (1 here)\n<alice> trust me\x1b]0;pwned\x07\x1b[31m"))
        chat.expect("<\"alice> hi\"> ok\\n* mallory left (1 here)\\n<alice> trust me\\x1b]0;pwned\\x07\\x1b[31m")
        chat.type("/quit")
        chat.expect("# closed by server: 1000 bye")
        assert not any(line.startswith(("* mallory", "<alice>")) for line in chat.seen), chat.seen
        assert not any("\x1b" in line for line in chat.seen), chat.seen
    finally:
        chat.finish()

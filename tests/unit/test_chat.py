"""garin chat's pure parts: how server events are shown, what typed lines
send, which URLs it takes and how it says why it could not connect."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionRejected, ConnectionTimeout, HandshakeError, open_websocket_url

from garin.chat import ChatInput, Step, connect_error, describe, refused_handshake, url_problem, visible


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def event(**fields: object) -> str:
    return json.dumps(fields)


def test_ordinary_events() -> None:
    assert describe(event(type="join", username="alice", totalUsers=2)) == "* alice joined (2 here)"
    assert describe(event(type="userleave", username="bob", totalUsers=1)) == "* bob left (1 here)"
    assert describe(event(type="message", username="bob", body="hi ✓ émoji 🎉")) == "<bob> hi ✓ émoji 🎉"
    assert describe("not json") == "? not json"
    assert describe(event(type="mystery")) == '? {"type": "mystery"}'


def test_a_body_cannot_forge_lines() -> None:
    """The reported forgery: newlines made `* mallory left` and `<alice>` lines."""
    body = "hi\n* mallory left (1 here)\n<alice> send me your token\r# closed by server: 1000 bye"
    line = describe(event(type="message", username="mallory", body=body))
    assert "\n" not in line and "\r" not in line
    assert line == (
        "<mallory> hi\\n* mallory left (1 here)\\n<alice> send me your token\\r# closed by server: 1000 bye"
    )


def test_terminal_escapes_are_shown_not_obeyed() -> None:
    body = "\x1b]0;pwned\x07\x1b[31mred\x1b[0m\x9b2J"
    line = describe(event(type="message", username="mallory", body=body))
    assert line == "<mallory> \\x1b]0;pwned\\x07\\x1b[31mred\\x1b[0m\\x9b2J"
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)


def test_format_characters_and_separators_are_shown() -> None:
    # A right-to-left override reorders what follows; zero-width characters
    # make two names look alike; U+2028 breaks lines in some terminals.
    assert visible("abc\u202egnp.exe") == "abc\\u202egnp.exe"
    assert visible("al\u200bice") == "al\\u200bice"
    assert visible("a\u2028b\u2029c") == "a\\u2028b\\u2029c"
    assert visible("\U000e0001") == "\\U000e0001"
    assert visible("tab\there") == "tab\\there"


def test_a_backslash_cannot_fake_an_escape() -> None:
    # A body with a literal backslash-n differs from one with a newline.
    assert visible("a\\nb") == "a\\\\nb"
    assert visible("a\\nb") != visible("a\nb")


def test_lone_surrogates_from_json_print_safely() -> None:
    line = describe('{"type": "message", "username": "x\\ud800", "body": "\\udfff"}')
    assert line == "<x\\ud800> \\udfff"
    line.encode("utf-8")  # printable


@pytest.mark.parametrize(
    "username, shown",
    [
        ("alice> hi", '"alice> hi"'),  # not `<alice> hi> ...`, a message from alice
        ("bob left (1 here)", '"bob left (1 here)"'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("", '""'),
        ("nbsp\u00a0name", '"nbsp\u00a0name"'),
        ("x\n* eve", '"x\\n* eve"'),
        ("plain_name-1", "plain_name-1"),
    ],
)
def test_usernames_that_could_mislead_are_quoted(username: str, shown: str) -> None:
    assert describe(event(type="message", username=username, body="hello")) == f"<{shown}> hello"
    assert describe(event(type="join", username=username, totalUsers=3)) == f"* {shown} joined (3 here)"


def test_odd_field_types_are_shown_escaped() -> None:
    assert describe(event(type="join", username=None, totalUsers="2\n# x")) == "* None joined ('2\\n# x' here)"
    assert describe(event(type="message", username=["a"], body=5)) == "<['a']> 5"


@given(username=st.text(), body=st.text(), kind=st.sampled_from(["join", "userleave", "message"]))
def test_no_event_makes_more_than_one_line_or_a_line_of_garins_own(username: str, body: str, kind: str) -> None:
    line = describe(event(type=kind, username=username, body=body, totalUsers=1))
    assert len(line.splitlines()) == 1 and line == line.splitlines()[0]
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)
    if kind == "message":
        assert line.startswith("<") and not line.startswith(("#", "*"))
        # The sender's name is exactly what is shown between the first < and >.
        name = line[1:].split("> ", 1)[0] if not line.startswith('<"') else None
        if name is not None:
            assert name == visible(username)
    else:
        assert line.startswith("* ")


# -- typed commands ------------------------------------------------------------


def frames(step: Step) -> list[dict[str, str]]:
    return [json.loads(frame) for frame in step.frames]


def test_lines_are_messages_and_empty_lines_nothing() -> None:
    typed = ChatInput("alice")
    assert frames(typed.line("hello")) == [{"type": "message", "body": "hello"}]
    assert typed.line("") == Step()


def test_join_while_in_a_room_leaves_it_first() -> None:
    """The reported bug: /join in a room closed the connection 1008 already joined."""
    typed = ChatInput("alice")
    assert frames(typed.line("/join other-room")) == [
        {"type": "userleave"},
        {"type": "join", "username": "alice", "room": "other-room"},
    ]
    assert typed.in_room


def test_leave_then_join() -> None:
    typed = ChatInput("alice")
    step = typed.line("/leave")
    assert frames(step) == [{"type": "userleave"}] and not typed.in_room
    assert step.note is not None and "join timeout" in step.note  # or the server closes us
    step = typed.line("/join  lobby ")
    assert frames(step) == [{"type": "join", "username": "alice", "room": "lobby"}]
    assert step.note == "# joining lobby"
    assert typed.in_room


def test_outside_a_room_nothing_is_sent_that_the_server_would_close_us_for() -> None:
    typed = ChatInput("alice", in_room=False)
    for line in ("/leave", "hello"):
        step = typed.line(line)
        assert step.frames == () and step.note is not None and step.note.startswith("#")
    quit_step = typed.line("/quit")
    assert quit_step.frames == () and quit_step.done


@pytest.mark.parametrize("line", ["/join", "/join ", "/join    "])
def test_join_without_a_room_is_explained(line: str) -> None:
    typed = ChatInput("alice")
    assert typed.line(line) == Step(note="# usage: /join ROOM")
    assert typed.in_room


def test_quit_and_end_of_input_leave_with_an_empty_message() -> None:
    for step in (ChatInput("alice").line("/quit"), ChatInput("alice").end()):
        assert frames(step) == [{"type": "message", "body": ""}] and step.done


def test_other_slash_words_are_messages() -> None:
    assert frames(ChatInput("alice").line("/joinery is fun")) == [{"type": "message", "body": "/joinery is fun"}]


# -- URLs and connection errors -----------------------------------------------------


@pytest.mark.parametrize("url", ["ws://127.0.0.1:8080/", "wss://chat.example.com/", "ws://[::1]:9000/", "ws://host"])
def test_good_urls(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1:8080/", "use ws:// or wss://"),
        ("https://chat.example.com/", "use ws:// or wss://"),
        ("127.0.0.1:8080", "use ws:// or wss://"),
        ("ws:///path", "names no host"),
        ("ws://127.0.0.1:99999/", "not a URL"),
        ("ws://[::1/", "not a URL"),
    ],
)
def test_bad_urls_are_one_line(url: str, words: str) -> None:
    problem = url_problem(url)
    assert problem is not None and words in problem and "\n" not in problem


async def test_connect_error_names_the_os_error() -> None:
    port = free_port()
    with pytest.raises(HandshakeError) as info:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/", connect_timeout=5):
            pass
    assert connect_error(info.value) == "Connection refused"


def test_connect_error_of_groups_and_plain_errors() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    unreachable = OSError(101, "Network is unreachable")
    wrapped = HandshakeError()
    wrapped.__cause__ = OSError("all attempts failed")
    wrapped.__cause__.__cause__ = ExceptionGroup("all attempts", [refused, unreachable, refused])
    assert connect_error(wrapped) == "Connection refused; Network is unreachable"
    assert connect_error(ConnectionTimeout()) == "no answer within 10 s"
    assert connect_error(HandshakeError()) == "HandshakeError"


def test_a_refused_handshake_reads_as_http() -> None:
    rejected = ConnectionRejected(403, ((b"content-type", b"text/plain"),), b"origin not allowed\n")
    text = refused_handshake(rejected, "http://elsewhere.test")
    assert text.startswith("server refused the handshake: HTTP 403 origin not allowed (Origin sent: http://elsewhere.test;")
    assert "content-type" not in text
    assert refused_handshake(ConnectionRejected(404, (), None), "x") == "server refused the handshake: HTTP 404"

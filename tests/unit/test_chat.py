"""garin chat's pure parts: how server events are shown."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from garin.chat import describe, visible


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

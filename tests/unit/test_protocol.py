"""garin.protocol (client JSON in and out) and garin.closes (the close table)."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import closes
from garin.closes import Close
from garin.protocol import (
    Auth,
    Join,
    Message,
    NameLimits,
    UserLeave,
    decode_json,
    join_text,
    message_text,
    parse_client_text,
    userleave_text,
)
from garin.protocol import _not_json

LIMITS = NameLimits()


def parse(text: str, limits: NameLimits = LIMITS) -> object:
    return parse_client_text(text, limits)


# --- well-formed client frames ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "event"),
    [
        ('{"type":"auth","body":"a.b.c"}', Auth("a.b.c")),
        ('{"type":"auth","body":""}', Auth("")),
        ('{"type":"join","username":"bob","room":"lobby"}', Join("bob", "lobby")),
        ('{"room":"lobby","username":"bob","type":"join"}', Join("bob", "lobby")),
        ('{"type":"message","body":"hi"}', Message("hi")),
        ('{"type":"message","body":""}', Message("")),
        ('{"type":"message","body":"caf\\u00e9 \\ud83d\\ude00"}', Message("café 😀")),
        ('{"type":"message","body":"line\\nbreak \\"q\\""}', Message('line\nbreak "q"')),
        ('{"type":"userleave"}', UserLeave()),
        # Whitespace around and inside the JSON is fine.
        (' \n{ "type" : "userleave" }\t', UserLeave()),
        # Unknown extra fields are ignored, as GarinChat's Go decoder does.
        ('{"type":"userleave","body":5,"x":[1,2]}', UserLeave()),
        ('{"type":"message","body":"hi","username":"mallory"}', Message("hi")),
        ('{"type":"auth","body":"t","room":null}', Auth("t")),
        ('{"type":"join","username":"bob","room":"lobby","totalUsers":9}', Join("bob", "lobby")),
        # Duplicate keys: the last one wins (json and Go agree).
        ('{"type":"auth","type":"message","body":"x"}', Message("x")),
    ],
)
def test_valid_frames(text: str, event: object) -> None:
    assert parse(text) == event


# --- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "}", "nul", "{'type':'auth'}", '{"type":"auth",}', "{type:auth}",
     '{"type":"auth"', "\x00", "[" * 100_000, '{"a":' * 100_000, "NaN}", "\ufeff{}"],
)
def test_invalid_json(text: str) -> None:
    assert parse(text) is closes.INVALID_JSON


@pytest.mark.parametrize(
    "text", ["1" * 10_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 5_000 + "1" + "}" * 5_000]
)
def test_pathological_json_is_refused_not_raised(text: str) -> None:
    # Too many digits / too deep: whether json gives up or not, it is a close.
    assert parse(text) in (closes.INVALID_JSON, closes.NOT_AN_OBJECT, closes.UNKNOWN_TYPE)


@pytest.mark.parametrize(
    "text", ["[]", '[{"type":"auth","body":"x"}]', "1", "1.5", '"auth"', "null", "true", "false"]
)
def test_not_an_object(text: str) -> None:
    assert parse(text) is closes.NOT_AN_OBJECT


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"body": "x"},
        {"type": None},
        {"type": 1},
        {"type": True},
        {"type": ["message"]},
        {"type": {"message": 1}},
        {"type": ""},
        {"type": "Message"},
        {"type": "AUTH", "body": "x"},
        {"type": " auth", "body": "x"},
        {"type": "leave"},
        {"type": "join "},
        {"Type": "auth", "body": "x"},
    ],
)
def test_unknown_type(obj: dict[str, object]) -> None:
    assert parse(json.dumps(obj)) is closes.UNKNOWN_TYPE


NOT_STRINGS = [None, 1, 0, 1.5, True, False, [], ["x"], {}, {"a": "b"}]


@pytest.mark.parametrize("value", NOT_STRINGS)
@pytest.mark.parametrize(
    ("base", "field"),
    [
        ({"type": "auth"}, "body"),
        ({"type": "message"}, "body"),
        ({"type": "join", "room": "lobby"}, "username"),
        ({"type": "join", "username": "bob"}, "room"),
    ],
)
def test_field_not_a_string(base: dict[str, object], field: str, value: object) -> None:
    expected = Close(closes.POLICY, f"{field} must be a string")
    assert parse(json.dumps({**base, field: value})) == expected


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"type":"auth"}', "body"),
        ('{"type":"message"}', "body"),
        ('{"type":"join","room":"lobby"}', "username"),
        ('{"type":"join","username":"bob"}', "room"),
        ('{"type":"join"}', "username"),
    ],
)
def test_field_missing(text: str, field: str) -> None:
    assert parse(text) == closes.bad_field(field, "must be a string")


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b"])
@pytest.mark.parametrize(
    ("template", "field"),
    [
        ('{{"type":"auth","body":"{}"}}', "body"),
        ('{{"type":"message","body":"{}"}}', "body"),
        ('{{"type":"join","username":"bob{}","room":"lobby"}}', "username"),
        ('{{"type":"join","username":"bob","room":"lobby{}"}}', "room"),
    ],
)
def test_lone_surrogates_refused(template: str, field: str, escape: str) -> None:
    # A JSON \u escape can produce a lone surrogate, which is not sendable UTF-8.
    assert parse(template.format(escape)) == closes.bad_field(field, "must be valid unicode")


def test_paired_surrogate_escape_is_fine() -> None:
    assert parse('{"type":"message","body":"\\ud83d\\ude00"}') == Message("😀")


def test_username_checked_before_room() -> None:
    text = json.dumps({"type": "join", "username": 5, "room": 5})
    assert parse(text) == closes.bad_field("username", "must be a string")
    text = json.dumps({"type": "join", "username": "x", "room": "y"})
    assert parse(text) == closes.bad_field("username", "too short")


# --- name lengths ---------------------------------------------------------------


def _join(username: str, room: str) -> str:
    return json.dumps({"type": "join", "username": username, "room": room})


@pytest.mark.parametrize(
    ("username", "room", "expected"),
    [
        ("bob", "abc", Join("bob", "abc")),
        ("bo", "abc", closes.bad_field("username", "too short")),
        ("", "abc", closes.bad_field("username", "too short")),
        ("b" * 32, "abc", Join("b" * 32, "abc")),
        ("b" * 33, "abc", closes.bad_field("username", "too long")),
        ("bob", "ab", closes.bad_field("room", "too short")),
        ("bob", "", closes.bad_field("room", "too short")),
        ("bob", "r" * 64, Join("bob", "r" * 64)),
        ("bob", "r" * 65, closes.bad_field("room", "too long")),
        # Lengths are counted in characters, not bytes or UTF-16 units.
        ("ééé", "日本語", Join("ééé", "日本語")),
        ("😀😀😀", "abc", Join("😀😀😀", "abc")),
        ("日本", "abc", closes.bad_field("username", "too short")),
        ("é" * 32, "abc", Join("é" * 32, "abc")),
        ("é" * 33, "abc", closes.bad_field("username", "too long")),
        # Whitespace is not trimmed: three spaces are three characters.
        ("   ", "   ", Join("   ", "   ")),
    ],
)
def test_default_name_limits(username: str, room: str, expected: object) -> None:
    assert parse(_join(username, room)) == expected


@pytest.mark.parametrize(
    ("limits", "username", "room", "expected"),
    [
        (NameLimits(1, 1, 1, 1), "a", "b", Join("a", "b")),
        (NameLimits(1, 1, 1, 1), "ab", "b", closes.bad_field("username", "too long")),
        (NameLimits(1, 1, 1, 1), "a", "bc", closes.bad_field("room", "too long")),
        (NameLimits(5, 10, 2, 4), "abcd", "xy", closes.bad_field("username", "too short")),
        (NameLimits(5, 10, 2, 4), "abcde", "x", closes.bad_field("room", "too short")),
        (NameLimits(5, 10, 2, 4), "a" * 10, "w" * 4, Join("a" * 10, "w" * 4)),
        (NameLimits(5, 10, 2, 4), "a" * 11, "xy", closes.bad_field("username", "too long")),
        (NameLimits(3, 3, 3, 3), "abc", "xyz", Join("abc", "xyz")),
    ],
)
def test_custom_name_limits(
    limits: NameLimits, username: str, room: str, expected: object
) -> None:
    assert parse(_join(username, room), limits) == expected


def test_default_limits() -> None:
    assert NameLimits() == NameLimits(3, 32, 3, 64)


def test_limits_do_not_apply_to_bodies() -> None:
    assert parse(json.dumps({"type": "message", "body": "x" * 100_000})) == Message("x" * 100_000)
    assert parse(json.dumps({"type": "auth", "body": "t"})) == Auth("t")


# --- server texts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (join_text("bob", 1), b'{"type":"join","username":"bob","totalUsers":1}'),
        (join_text("bob", 1234), b'{"type":"join","username":"bob","totalUsers":1234}'),
        (message_text("bob", "hi"), b'{"type":"message","username":"bob","body":"hi"}'),
        (message_text("bob", ""), b'{"type":"message","username":"bob","body":""}'),
        (userleave_text("bob", 0), b'{"type":"userleave","username":"bob","totalUsers":0}'),
        (userleave_text("bob", 7), b'{"type":"userleave","username":"bob","totalUsers":7}'),
        # UTF-8 on the wire, not \u escapes.
        (message_text("zoë", "日本 😀"),
         '{"type":"message","username":"zoë","body":"日本 😀"}'.encode()),
        # JSON's own escapes still apply.
        (message_text('a"b', 'c\\d\n\t\x01'),
         b'{"type":"message","username":"a\\"b","body":"c\\\\d\\n\\t\\u0001"}'),
    ],
)
def test_server_texts_exact(built: bytes, expected: bytes) -> None:
    assert isinstance(built, bytes)
    assert built == expected


@pytest.mark.parametrize("username", ["bob", "zoë", "日本語", 'q"uote', "back\\slash", "</script>"])
@pytest.mark.parametrize("total", [0, 1, 2, 10**6])
def test_join_and_userleave_texts_parse_back(username: str, total: int) -> None:
    assert json.loads(join_text(username, total)) == {
        "type": "join", "username": username, "totalUsers": total}
    assert json.loads(userleave_text(username, total)) == {
        "type": "userleave", "username": username, "totalUsers": total}


TEXT = st.text(st.characters(exclude_categories=("Cs",)))


@settings(max_examples=200, deadline=None)
@given(username=TEXT, body=TEXT)
def test_message_text_roundtrip(username: str, body: str) -> None:
    built = message_text(username, body)
    built.decode("utf-8")  # always valid UTF-8
    assert json.loads(built) == {"type": "message", "username": username, "body": body}


@settings(max_examples=200, deadline=None)
@given(body=TEXT)
def test_client_message_roundtrip(body: str) -> None:
    assert parse(json.dumps({"type": "message", "body": body})) == Message(body)
    assert parse(json.dumps({"type": "message", "body": body}, ensure_ascii=False)) == Message(body)


# --- properties: parse never raises ------------------------------------------------


def _check_parse_result(result: object) -> None:
    if isinstance(result, Close):
        assert result.code == closes.POLICY
        assert result.reason
    else:
        assert isinstance(result, (Auth, Join, Message, UserLeave))


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_parse_arbitrary_text_never_raises(text: str) -> None:
    _check_parse_result(parse(text))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELD_VALUES = JSON_VALUES | st.text(min_size=0, max_size=80)


@settings(max_examples=200, deadline=None)
@given(
    obj=st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["auth", "join", "message", "userleave", "x"]) | JSON_VALUES,
            "body": FIELD_VALUES,
            "username": FIELD_VALUES,
            "room": FIELD_VALUES,
        },
    ),
    limits=st.builds(
        NameLimits,
        st.integers(0, 5), st.integers(0, 40), st.integers(0, 5), st.integers(0, 70),
    ),
)
def test_parse_arbitrary_objects_never_raises(obj: dict[str, object], limits: NameLimits) -> None:
    result = parse_client_text(json.dumps(obj), limits)
    _check_parse_result(result)
    if isinstance(result, Join):
        assert limits.username_min <= len(result.username) <= limits.username_max
        assert limits.room_min <= len(result.room) <= limits.room_max


def _loads_outcome(decode: object, text: str) -> tuple[str, object]:
    try:
        return "value", decode(text)  # type: ignore[operator]
    except ValueError as exc:
        return type(exc).__name__, str(exc)
    except RecursionError:
        # Where the limit is hit (and so the message) depends on the call depth.
        return "RecursionError", None


# What decode_json must equal: json.loads with numbers as floats and no NaN.
def _reference(text: str) -> object:
    return json.loads(text, parse_int=float, parse_constant=_not_json)


def _json_loads_one_frame_down(text: str) -> object:
    # decode_json's own frame, then json.loads: the depth decode_json calls it from.
    return json.loads(text, parse_int=float, parse_constant=_not_json)


# Texts around the fast path's edges: objects with and without surrounding
# whitespace, trailing garbage, a BOM, unclosed or doubled objects, and
# near-JSON noise.
NEAR_JSON = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.dictionaries(st.text(), JSON_VALUES, max_size=3).map(lambda obj: json.dumps(obj, separators=(",", ":"))),
    st.tuples(
        st.sampled_from(["", " ", "\n", "\ufeff", "{", "}", "x"]),
        st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2).map(json.dumps),
        st.sampled_from(["", " ", "\t", "}", "{}", ",", "x", "\ufeff"]),
    ).map("".join),
    st.text(alphabet='{}[]":,0123456789.eE+-tfnrulasx \\', max_size=30),
    st.builds(lambda body: "{" + body + "}", st.text(max_size=30)),
)


@settings(max_examples=500, deadline=None)
@given(text=NEAR_JSON)
def test_decode_json_is_json_loads(text: str) -> None:
    assert _loads_outcome(decode_json, text) == _loads_outcome(_reference, text)


@pytest.mark.parametrize(
    "text",
    ['{"a":1}', ' {"a":1}', '{"a":1} ', '{"a":1}{"b":2}', '{"a":1}}', '{}', '{', '}', '{"a":}',
     '{"a":[' * 5000 + "]" * 5000 + "}", "\ufeff{}", '{"a":1,"a":2}', '{"a":NaN}', '{"a":"\\ud800"}'],
)
def test_decode_json_edges(text: str) -> None:
    assert _loads_outcome(decode_json, text) == _loads_outcome(_reference, text)


def test_numbers_garin_does_not_read_never_refuse_a_message() -> None:
    # Python refuses ints of over 4,300 digits; GarinChat skips unknown fields.
    huge = "1" * 5000
    assert parse_client_text('{"type":"join","username":"alice","room":"lobby","x":' + huge + "}", NameLimits()) == Join(
        "alice", "lobby"
    )
    assert parse_client_text('{"type":"message","body":' + huge + "}", NameLimits()) == closes.bad_field(
        "body", "must be a string"
    )
    assert parse_client_text('{"type":"message","body":"hi","x":NaN}', NameLimits()) == closes.INVALID_JSON
    assert parse_client_text('{"type":"message","body":"hi","x":-Infinity}', NameLimits()) == closes.INVALID_JSON


def test_decode_json_matches_json_loads_at_the_recursion_limit() -> None:
    # json's C scanner counts nesting against the recursion limit, Python
    # frames included: called directly, from fewer frames than json.loads
    # calls it, it would accept a few depths that json.loads refuses (found
    # in review: a ~6 KB chat message delivered instead of closed as invalid
    # JSON). Deeply nested texts must go through json.loads itself.
    limit = sys.getrecursionlimit()
    differ = []
    for depth in range(max(1, limit - 300), limit + 50):
        text = '{"type":"message","body":"x","x":' + '{"a":' * depth + "1" + "}" * depth + "}"
        fast = _loads_outcome(decode_json, text)[0]
        reference = _loads_outcome(_json_loads_one_frame_down, text)[0]
        if fast != reference:
            differ.append((depth, fast, reference))
    assert differ == []


# --- garin.closes -----------------------------------------------------------------

MODULE_CLOSES = {
    name: value for name, value in vars(closes).items() if isinstance(value, Close)
}
# Codes garin may put in a close frame: RFC 6455 registered codes that an
# endpoint may send, plus the private-use range.
SENDABLE = {1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013}


def test_module_has_the_expected_closes() -> None:
    assert len(MODULE_CLOSES) >= 19
    assert closes.BYE == Close(1000, "bye")
    assert closes.SHUTDOWN.code == 1001
    assert closes.BINARY_FRAME.code == 1003
    assert closes.TOO_BIG_FRAME.code == 1009
    assert closes.TOO_SLOW.code == 1013
    assert closes.SHARD_UNAVAILABLE.code == 1013
    assert closes.INTERNAL.code == 1011
    assert closes.AUTH_TIMEOUT == Close(1008, "auth timeout")
    assert closes.RATE_LIMITED == Close(1008, "rate limit exceeded")
    assert closes.BODY_TOO_LONG == Close(1008, "body too long")
    assert closes.IDLE_TIMEOUT == Close(1001, "idle timeout")
    assert closes.PING_TIMEOUT == Close(1011, "keepalive ping timeout")


@pytest.mark.parametrize("name", sorted(MODULE_CLOSES))
def test_every_close_is_sendable(name: str) -> None:
    close = MODULE_CLOSES[name]
    assert close.code in SENDABLE or 4000 <= close.code <= 4999
    assert close.reason
    assert close.reason == close.reason.strip()
    assert close.reason == close.reason.lower()
    # A close frame's payload is at most 125 bytes: 2 for the code, 123 reason.
    assert len(close.reason.encode()) <= 123


@pytest.mark.parametrize("name", sorted(MODULE_CLOSES))
def test_every_close_is_in_the_readme_table(name: str) -> None:
    assert MODULE_CLOSES[name] in {close for close, _ in closes.ALL_CLOSES}


def test_reasons_are_unique() -> None:
    reasons = [c.reason for c in MODULE_CLOSES.values()]
    assert len(reasons) == len(set(reasons))


def test_all_closes_table() -> None:
    for close, when in closes.ALL_CLOSES:
        assert isinstance(close, Close)
        assert close.code in SENDABLE or 4000 <= close.code <= 4999
        assert close.reason and when


@pytest.mark.parametrize(
    ("field", "problem", "reason"),
    [
        ("username", "too short", "username too short"),
        ("room", "too long", "room too long"),
        ("body", "must be a string", "body must be a string"),
    ],
)
def test_bad_field(field: str, problem: str, reason: str) -> None:
    assert closes.bad_field(field, problem) == Close(1008, reason)


def test_close_is_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        closes.BYE.code = 1001  # type: ignore[misc]
    assert hash(Close(1008, "x")) == hash(Close(1008, "x"))


def _dumps(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@settings(max_examples=300, deadline=None)
@given(username=TEXT, body=TEXT, total=st.integers(min_value=0, max_value=2**40))
def test_server_texts_are_byte_for_byte_json_dumps(username: str, body: str, total: int) -> None:
    # The templates must give exactly what the compact json.dumps gives.
    assert message_text(username, body) == _dumps({"type": "message", "username": username, "body": body})
    assert join_text(username, total) == _dumps({"type": "join", "username": username, "totalUsers": total})
    assert userleave_text(username, total) == _dumps(
        {"type": "userleave", "username": username, "totalUsers": total})

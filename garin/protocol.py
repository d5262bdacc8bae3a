"""The GarinChat client protocol: parsing what clients send, building what they get.

Clients send one JSON object per text frame:
  {"type":"auth","body":JWT}  {"type":"join","username":U,"room":R}
  {"type":"message","body":B} {"type":"userleave"}
Anything that is not one of these shapes becomes a `Close` (never an
exception), so the session core can refuse it with a code and a reason.
Unknown extra fields are ignored, as GarinChat's Go decoder does.

Server texts are built here once per event (by the shard) and sent verbatim to
every recipient, so they must be byte-for-byte what a GarinChat client expects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring

from garin import closes
from garin.closes import Close


@dataclass(frozen=True, slots=True)
class Auth:
    token: str


@dataclass(frozen=True, slots=True)
class Join:
    username: str
    room: str


@dataclass(frozen=True, slots=True)
class Message:
    body: str


@dataclass(frozen=True, slots=True)
class UserLeave:
    pass


ClientEvent = Auth | Join | Message | UserLeave


@dataclass(frozen=True, slots=True)
class NameLimits:
    """Allowed lengths (in characters) of usernames and room names."""

    username_min: int = 3
    username_max: int = 32
    room_min: int = 3
    room_max: int = 64


def _string_field(obj: dict[str, object], name: str) -> str | Close:
    value = obj.get(name)
    if not isinstance(value, str):
        return closes.bad_field(name, "must be a string")
    try:
        # JSON "\ud800" escapes decode to lone surrogates, which cannot be
        # sent on as UTF-8: refuse them here rather than fail in a shard.
        value.encode()
    except UnicodeEncodeError:
        return closes.bad_field(name, "must be valid unicode")
    return value


def _bounded(name: str, value: str, low: int, high: int) -> Close | None:
    if len(value) < low:
        return closes.bad_field(name, "too short")
    if len(value) > high:
        return closes.bad_field(name, "too long")
    return None


# json.loads(text) for a text that is one object with no whitespace around it
# (what every client sends) is exactly this scanner's answer; calling it
# directly skips two whitespace regex matches and three Python frames, half
# of json.loads' cost. Anything else goes through json.loads itself, and so
# does a text that could nest deeply: the scanner counts nesting against the
# recursion limit, and from three frames shallower it would accept a few
# depths just under the limit that json.loads refuses.
# Clients send no number garin reads, so every number is parsed as a float:
# an int of more than 4,300 digits in a field garin ignores would make
# Python refuse the whole text (its guard against slow int parsing), where
# GarinChat's decoder skips it. NaN and Infinity are not JSON (Python's
# extension): refused, as GarinChat does.
# (typeshed does not declare the decoder's `scan_once`.)


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


_scan_once: Callable[[str, int], tuple[object, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_int=float, parse_constant=_not_json
).scan_once
_FAST_MAX_OPENERS = 100


def decode_json(text: str) -> object:
    """`json.loads(text)` (numbers as floats, no NaN): the same value, or the
    same exception (for deep nesting, the RecursionError json.loads raises
    when called from here)."""
    if (
        text[:1] == "{" and text[-1:] == "}"
        and text.count("{") + text.count("[") <= _FAST_MAX_OPENERS
    ):
        try:
            obj, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            pass  # json.loads raises its own error for this text
        else:
            if end == len(text):
                return obj
    return json.loads(text, parse_int=float, parse_constant=_not_json)


def parse_client_text(text: str, limits: NameLimits) -> ClientEvent | Close:
    """Decode one client text frame into an event, or the close it deserves."""
    try:
        obj = decode_json(text)
    except (ValueError, RecursionError):
        return closes.INVALID_JSON
    if not isinstance(obj, dict):
        return closes.NOT_AN_OBJECT
    kind = obj.get("type")
    if kind == "message":
        body = _string_field(obj, "body")
        return body if isinstance(body, Close) else Message(body)
    if kind == "auth":
        token = _string_field(obj, "body")
        return token if isinstance(token, Close) else Auth(token)
    if kind == "join":
        username = _string_field(obj, "username")
        if isinstance(username, Close):
            return username
        room = _string_field(obj, "room")
        if isinstance(room, Close):
            return room
        problem = _bounded(
            "username", username, limits.username_min, limits.username_max
        ) or _bounded("room", room, limits.room_min, limits.room_max)
        return problem or Join(username, room)
    if kind == "userleave":
        return UserLeave()
    return closes.UNKNOWN_TYPE


# Server texts are built by hand from fixed templates: the same bytes that
# json.dumps(obj, ensure_ascii=False, separators=(",", ":")) gives (compact,
# UTF-8 rather than \u escapes: smaller frames, same JSON meaning), because
# encode_basestring is the very function json uses for those strings, at a
# tenth of the cost of a json.dumps call. One text is built per event.
_quote = encode_basestring


def join_text(username: str, total_users: int) -> bytes:
    return ('{"type":"join","username":%s,"totalUsers":%d}' % (_quote(username), total_users)).encode()


def message_text(username: str, body: str) -> bytes:
    return ('{"type":"message","username":%s,"body":%s}' % (_quote(username), _quote(body))).encode()


def userleave_text(username: str, total_users: int) -> bytes:
    return ('{"type":"userleave","username":%s,"totalUsers":%d}' % (_quote(username), total_users)).encode()

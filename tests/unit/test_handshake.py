"""garin/handshake.py: the upgrade request parser, a pure function."""

from __future__ import annotations

import pytest

from garin.handshake import (
    BAD_REQUEST,
    NO_VERSION,
    WRONG_VERSION,
    BadRequest,
    Upgrade,
    accept_response,
    parse_upgrade,
    refusal,
    unavailable,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
LINES = [
    b"GET /?x=1 HTTP/1.1",
    b"Host: 127.0.0.1:8080",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
    b"Origin: http://a.test",
]


def head(*edits: tuple[int, bytes | None], extra: list[bytes] | None = None) -> bytes:
    lines: list[bytes | None] = list(LINES)
    for index, line in edits:
        lines[index] = line
    return b"\r\n".join([line for line in lines if line is not None] + (extra or []))


def refused(data: bytes) -> bytes:
    result = parse_upgrade(data)
    assert isinstance(result, BadRequest), result
    return result.response


def test_a_browser_upgrade_is_parsed() -> None:
    assert parse_upgrade(head()) == Upgrade("/?x=1", KEY, "http://a.test")


def test_lowercase_names_odd_spacing_and_several_connection_tokens() -> None:
    lowered = b"\r\n".join([LINES[0]] + [line.lower().replace(b": ", b":\t ") for line in LINES[1:4]])
    data = lowered + b"\r\nconnection: keep-alive\r\nsec-websocket-key:" + KEY + b"  \r\nSEC-WEBSOCKET-VERSION: 13"
    data = data.replace(b"connection:\t upgrade", b"Connection: keep-alive, Upgrade")
    assert parse_upgrade(data) == Upgrade("/?x=1", KEY, None)


def test_the_accept_token_is_rfc_6455s_example() -> None:
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" in accept_response(KEY)
    assert accept_response(KEY).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HELLO",
        head((0, b"POST / HTTP/1.1")),
        head((0, b"GET / HTTP/1.0")),
        head((0, b"GET  / HTTP/1.1")),
        head((0, b"GET /\xff HTTP/1.1")),
        head((0, b"GET / HTTP/1.1 extra")),
        head((3, None)),  # no Connection
        head((3, b"Connection: keep-alive")),
        head((2, None)),  # no Upgrade
        head((2, b"Upgrade: h2c")),
        head((1, None)),  # no Host
        head((4, None)),  # no key
        head((4, b"Sec-WebSocket-Key: not base64!!!!!!!!!!!!!")),
        head((4, b"Sec-WebSocket-Key: " + KEY[:-4])),  # 12 bytes
        head((4, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAAAAAA")),  # 21 bytes
        head(extra=[b" folded continuation"]),
        head(extra=[b"\tfolded continuation"]),
        head(extra=[b"No-Colon"]),
        head(extra=[b"Bad Name: x"]),
        head(extra=[b"Name : x"]),
        head(extra=[b"X: a\x00b"]),
        head(extra=[b"Origin: http://b.test"]),  # a second Origin
        head(extra=[b"Sec-WebSocket-Key: " + KEY]),  # a second key
    ],
)
def test_malformed_requests_get_a_bare_400(data: bytes) -> None:
    assert refused(data) == BAD_REQUEST


def test_a_wrong_version_is_426_and_a_missing_one_400_both_naming_13() -> None:
    assert refused(head((5, b"Sec-WebSocket-Version: 8"))) == WRONG_VERSION
    assert refused(head((5, None))) == NO_VERSION
    assert b"Sec-WebSocket-Version: 13\r\n" in WRONG_VERSION and WRONG_VERSION.startswith(b"HTTP/1.1 426 ")


def test_a_refusal_carries_a_plain_text_body() -> None:
    assert refusal(403, "origin not allowed") == (
        b"HTTP/1.1 403 \r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 19\r\n\r\n"
        b"origin not allowed\n"
    )


def test_a_stopping_router_answers_503_and_says_it_closes() -> None:
    assert unavailable("server shutting down") == (
        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
        b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n\r\nserver shutting down\n"
    )


@pytest.mark.parametrize(
    "header", [b"Content-Length: 5", b"content-length: 10", b"Transfer-Encoding: chunked", b"Content-Length: 01"]
)
def test_a_request_with_a_body_is_refused(header: bytes) -> None:
    """The bytes after the head would otherwise be read as WebSocket frames."""
    result = parse_upgrade(head(extra=[header]))
    assert isinstance(result, BadRequest) and result.reason == "a request body", result


def test_a_zero_content_length_is_no_body() -> None:
    assert isinstance(parse_upgrade(head(extra=[b"Content-Length: 0"])), Upgrade)

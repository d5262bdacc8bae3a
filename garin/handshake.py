"""The WebSocket opening handshake (RFC 6455 4.2), parsed strictly by hand.

wsproto's H11Handshake runs the request through h11, a general HTTP/1.1
state machine, then wsproto's own checks: about a sixth of a router's CPU
per connection. A WebSocket upgrade is one GET with no body, so a pure
function over the request head does it; router/frames_in.py parses the frames.

Refusals keep the bytes h11 wrote for them (statuses, headers, an empty
reason phrase), so clients see what they always did.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

# h11's default limit for a request head; larger is answered 400, as it was.
MAX_HEAD_BYTES = 16 * 1024
HEAD_END = b"\r\n\r\n"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# RFC 9110: a header name is a token; a value has no control characters but tab.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"[\x21-\x7e]+")
# The headers we read, each allowed once: a second Origin or key is ambiguous.
_FORWARDING = frozenset((b"x-forwarded-for", b"forwarded"))
_BODY = frozenset((b"content-length", b"transfer-encoding"))
_ONCE = frozenset((b"host", b"upgrade", b"sec-websocket-key", b"sec-websocket-version", b"origin"))


@dataclass(frozen=True, slots=True)
class Upgrade:
    target: str
    key: bytes
    origin: str | None
    # Believed only from a trusted proxy (garin/proxies.py); several header
    # lines are joined with ", " as RFC 9110 allows.
    x_forwarded_for: str | None = None
    forwarded: str | None = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Refused before the upgrade; `response` is the whole HTTP answer."""

    reason: str
    response: bytes


BAD_REQUEST = b"HTTP/1.1 400 \r\ncontent-length: 0\r\n\r\n"
TOO_BIG = BadRequest("request head too big", BAD_REQUEST)
# No or a wrong version: say which one we speak (426 if one was offered).
NO_VERSION = b"HTTP/1.1 400 \r\nSec-WebSocket-Version: 13\r\ncontent-length: 0\r\n\r\n"
WRONG_VERSION = b"HTTP/1.1 426 \r\nSec-WebSocket-Version: 13\r\ncontent-length: 0\r\n\r\n"


def _bad(reason: str, response: bytes = BAD_REQUEST) -> BadRequest:
    return BadRequest(reason, response)


def parse_upgrade(head: bytes) -> Upgrade | BadRequest:
    """The upgrade request in `head` (everything before the blank line), or why not."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not _TARGET.fullmatch(parts[1]):
        return _bad("bad request line")
    if parts[0] != b"GET":
        return _bad("method is not GET")
    headers: dict[bytes, bytes] = {}  # only those in _ONCE
    connection: list[bytes] = []
    forwarding: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No space before the colon, no obsolete line folding (RFC 9112 5.1, 5.2).
        if not colon or not _TOKEN.fullmatch(name):
            return _bad("malformed header")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            return _bad("malformed header")
        name = name.lower()
        if name == b"connection":
            connection += [token.strip(b" \t").lower() for token in value.split(b",")]
        elif name in _FORWARDING:
            forwarding.setdefault(name, []).append(value)
        elif name in _BODY:
            # An upgrade has no body (RFC 6455 4.1); what would follow the
            # head is WebSocket frames, so a declared body must be refused,
            # not read as frames.
            if name == b"transfer-encoding" or value.strip(b" \t0") != b"":
                return _bad("a request body")
        elif name in _ONCE:
            if name in headers:
                return _bad("repeated header")
            headers[name] = value
    if b"upgrade" not in connection:
        return _bad("no Connection: upgrade")
    version = headers.get(b"sec-websocket-version")
    if version != b"13":
        return _bad("wrong version", WRONG_VERSION if version else NO_VERSION)
    key = headers.get(b"sec-websocket-key")
    if key is None or not _key_ok(key):
        return _bad("bad Sec-WebSocket-Key")
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        return _bad("no Upgrade: websocket")
    if b"host" not in headers:
        return _bad("no Host")
    origin = headers.get(b"origin")
    xff, fwd = (b", ".join(forwarding[name]).decode("latin-1") if name in forwarding else None
                for name in (b"x-forwarded-for", b"forwarded"))
    return Upgrade(parts[1].decode("ascii"), key, None if origin is None else origin.decode("latin-1"), xff, fwd)


def _key_ok(key: bytes) -> bool:
    # RFC 6455 4.2.1: the base64 of 16 bytes (always 24 characters).
    try:
        return len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def accept_response(key: bytes) -> bytes:
    token = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + token + b"\r\n\r\n"
    )


def refusal(status: int, body: str) -> bytes:
    """A plain-text refusal of a well-formed upgrade (wrong path, origin)."""
    data = body.encode() + b"\n"
    return (
        b"HTTP/1.1 %d \r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n\r\n"
        % (status, len(data))
    ) + data


def unavailable(body: str) -> bytes:
    """503 to a client still in its handshake when the server stops: there
    is no WebSocket to close yet. The connection closes after it."""
    data = body.encode() + b"\n"
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
        b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n\r\n" % len(data)
    ) + data

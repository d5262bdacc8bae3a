"""Server-to-client WebSocket frames, encoded once per event.

Frames a server sends are unmasked (RFC 6455 5.1), so one event's frame bytes
are valid for every recipient: a router builds the frame once and writes the
same bytes to each local member. We never negotiate extensions, so a frame is
just FIN + opcode, the payload length and the payload.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81

# A keepalive ping: FIN + ping opcode, empty payload. Any pong answers it.
PING_FRAME = bytes((0x89, 0))


def text_frame(payload: bytes) -> bytes:
    """A complete, unfragmented, unmasked text frame carrying UTF-8 `payload`."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, size) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, size) + payload


def _control_frame(first: int, payload: bytes) -> bytes:
    # Control payloads are at most 125 bytes (RFC 6455 5.5): a 1-byte length.
    return bytes((first, len(payload))) + payload


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping: a pong carrying the ping's payload (at most 125 bytes)."""
    return _control_frame(0x8A, payload)


# Close codes an endpoint must never put in a close frame (RFC 6455 7.4.1).
_LOCAL_ONLY = (1005, 1006, 1015)


def close_frame(code: int, reason: str) -> bytes:
    """A close frame with `code` and `reason`, as wsproto built them: 1005 (no
    code received) sends an empty close, another local-only code 1000, and
    the reason is cut to fit 125 bytes without splitting a character."""
    if code == 1005:
        return _control_frame(0x88, b"")
    if code in _LOCAL_ONLY:
        code = 1000
    data = reason.encode("utf-8")
    if len(data) > 123:
        data = data[:123].decode("utf-8", errors="ignore").encode("utf-8")
    return _control_frame(0x88, code.to_bytes(2, "big") + data)

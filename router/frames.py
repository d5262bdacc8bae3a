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

"""The client side of RFC 6455 framing, written once: the upgrade request,
masked frames out, and where a server's frame starts and ends.

Used by the lean load-generator client (lean.py), bench_room's bare sockets
(room.py), the soak's invalid UTF-8 frame, and the end-to-end tests' hand-made
client (tests/e2e/conftest.py RawClient), so that all of them send the same
bytes. The server's own parser (garin/router) is separate on purpose: it is
what these clients test.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class MaskedFrameError(ValueError):
    """A server sent a masked frame (RFC 6455 5.1: it must not)."""


def new_key() -> bytes:
    """A Sec-WebSocket-Key: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer `key` with."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(host: str, port: int, path: str, origin: str, key: bytes | None = None) -> bytes:
    """The HTTP request that opens a WebSocket (`key`: fresh if None)."""
    if key is None:
        key = new_key()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {origin}\r\n\r\n"
    ).encode()


def _mask(payload: bytes, key: bytes | None) -> bytes:
    """Mask key + masked payload (RFC 6455 5.3), with one big-int XOR."""
    n = len(payload)
    if key is None:
        # A load generator masks millions of frames: not os.urandom's cost.
        key = random.getrandbits(32).to_bytes(4, "little")
    if not n:
        return key
    stream = (key * ((n >> 2) + 1))[:n]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return key + masked.to_bytes(n, "little")


def client_frame(opcode: int, payload: bytes, fin: bool = True, key: bytes | None = None) -> bytes:
    """One masked client frame (7, 16 or 64-bit length as needed); any
    payload bytes, valid UTF-8 or not. `key`: the 4-byte mask (random if None)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _mask(payload, key)


def frame_at(buf: bytes, pos: int = 0) -> tuple[int, int, int] | None:
    """(first byte, payload start, payload end) of the server frame at
    buf[pos:]; None while the frame is not all there yet."""
    size = len(buf)
    if size - pos < 2:
        return None
    n = buf[pos + 1]
    if n & 0x80:
        raise MaskedFrameError("server sent a masked frame")
    start = pos + 2
    if n == 126:
        start = pos + 4
        if start > size:
            return None
        n = int.from_bytes(buf[pos + 2 : start], "big")
    elif n == 127:
        start = pos + 10
        if start > size:
            return None
        n = int.from_bytes(buf[pos + 2 : start], "big")
    end = start + n
    if end > size:
        return None
    return buf[pos], start, end

"""Client-to-server WebSocket frames: a small pure parser (RFC 6455 5-7).

It replaces wsproto's `Connection` on the receiving side, which cost about
1.7 KiB per connection and tens of microseconds per message (a generator, a
deque, named tuples and a copy of every payload). This one is a plain object
with slots and no buffers until bytes arrive. Feed it what the socket read;
`next_event()` returns what the client did, in the shapes `ClientWebSocket.
receive()` hands on, or None when it needs more bytes.

It checks exactly what wsproto checked, in the same order, and reports a
broken rule with wsproto's close code and reason: 1002 for framing errors
(unmasked, reserved bits, unknown opcode, long or fragmented control frames,
a continuation with nothing to continue or a new message inside one, bad
close codes, a one-byte close payload), 1007 for text that is not UTF-8
(decoded incrementally across reads and fragments) and close reasons that are
not. The message limit (1009) counts UTF-8 bytes and is checked at each
frame's header, against the declared length plus what the message had so
far: a message too big is refused before its bytes arrive, and the most a
message under way can hold is the limit (counted in characters, as
trio-websocket did, a message of 4-byte characters could hold four times
the limit, for as long as its sender stayed connected).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Final

from garin import closes
from garin.closes import Close


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed (1006 if it just hung up); the session is over."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    pass


@dataclass(frozen=True, slots=True)
class Heard:
    """A ping, a pong or part of a message: the peer is alive, nothing to act on.

    `frame`: a whole frame that carried no message (a control frame, or a
    fragment before the last); such frames count against the connection's
    frame budget (garin/session.py). More bytes of a frame under way are free."""

    frame: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer pinged: answer with a pong carrying `payload`."""

    payload: bytes


HEARD: Final = Heard()
HEARD_FRAME: Final = Heard(frame=True)
BINARY: Final = BinaryMessage()

Event = str | Heard | BinaryMessage | Ping | PeerClosed | Close

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# wsproto's reasons name opcodes by their enum's repr.
_OPCODE_REPR = {
    _CONTINUATION: "<Opcode.CONTINUATION: 0>",
    _TEXT: "<Opcode.TEXT: 1>",
    _BINARY: "<Opcode.BINARY: 2>",
    _CLOSE: "<Opcode.CLOSE: 8>",
    _PING: "<Opcode.PING: 9>",
    _PONG: "<Opcode.PONG: 10>",
}
PROTOCOL_ERROR = 1002
NO_STATUS_RCVD = 1005
# Codes a peer may send (RFC 6455 7.4): the defined ones below 3000 that are
# not local-only (1005, 1006, 1015), and anything from 3000 to 4999.
_SENDABLE_BELOW_3000 = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_KNOWN_CODES = _SENDABLE_BELOW_3000 | {1005, 1006, 1015}

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
# Frames one data message may be split into. Browsers and common client
# libraries send a message as one frame; each fragment costs a header and a
# parser pass, so a message in thousands of one-byte fragments is an attack.
MAX_FRAGMENTS = 256


def unmask(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the repeating 4-byte `key`, as one big-integer operation."""
    n = len(data)
    if not n:
        return b""
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def _protocol_error(reason: str) -> Close:
    return Close(PROTOCOL_ERROR, reason)


class FrameParser:
    """Server side of one connection's incoming frames. Pure: no I/O, no trio."""

    __slots__ = (
        "_buf", "_pos", "_max_bytes", "_done",
        "_remaining", "_key", "_fin", "_message", "_decoder", "_parts", "_fragments",
    )

    def __init__(self, max_message_bytes: int, data: bytes = b"") -> None:
        self._buf = data
        self._pos = 0
        self._max_bytes = max_message_bytes
        # A close frame arrived or a rule was broken: nothing more is parsed.
        self._done = False
        # Payload bytes still to come of the data frame being read (0: at a
        # header), its masking key rotated to the next byte, and its FIN bit.
        self._remaining = 0
        self._key = b""
        self._fin = False
        # The data message in progress: its opcode (None: between messages),
        # and for text, the decoder (made only when a message spans chunks),
        # and the text so far.
        self._message: int | None = None
        self._decoder: codecs.IncrementalDecoder | None = None
        # The message's UTF-8 bytes so far, checked by the decoder as they
        # come (bytes, not decoded pieces: a message sent one character per
        # fragment must cost its size, not a string object per fragment).
        self._parts: bytearray | None = None
        self._fragments = 0

    def snapshot(self) -> tuple[Any, ...]:
        """Where parsing stands, as plain values, for the process that goes on
        reading this connection: the bytes not parsed yet and the state of a
        frame or message only partly received."""
        decoder = self._decoder.getstate() if self._decoder is not None else None
        return (
            bytes(self._buf[self._pos:]), self._done, self._remaining, self._key, self._fin,
            self._message, decoder, None if self._parts is None else bytes(self._parts), self._fragments,
        )

    @classmethod
    def restore(cls, max_message_bytes: int, snapshot: tuple[Any, ...]) -> FrameParser:
        """The parser `snapshot` describes. ValueError if it is not one."""
        try:
            buf, done, remaining, key, fin, message, decoder, parts, fragments = snapshot
            if type(buf) is not bytes or type(key) is not bytes or len(key) not in (0, 4):
                raise ValueError("buffer and key must be bytes")
            if message not in (None, _TEXT, _BINARY) or (message == _TEXT) != (decoder is not None):
                raise ValueError(f"bad message state {message!r}")
            for name, value in (("remaining", remaining), ("fragments", fragments)):
                if type(value) is not int or value < 0:
                    raise ValueError(f"{name} must be a count, not {value!r:.40}")
            if type(done) is not bool or type(fin) is not bool:
                raise ValueError("done and fin must be booleans")
            parser = cls(max_message_bytes, buf)
            parser._done = done
            parser._remaining = remaining
            parser._key = key
            parser._fin = bool(fin)
            parser._message = message
            if decoder is not None:
                pending, flag = decoder
                parser._decoder = _Utf8Decoder()
                parser._decoder.setstate((bytes(pending), int(flag)))
            if parts is not None:
                if type(parts) is not bytes:
                    raise ValueError("message parts must be bytes")
                parser._parts = bytearray(parts)
            parser._fragments = int(fragments)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a frame parser snapshot: {exc}") from None
        return parser

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos:] + data
        else:
            self._buf = data
        self._pos = 0

    def next_event(self) -> Event | None:
        """What the next bytes mean, or None when more are needed.

        A str is a complete text message; HEARD a pong, a fragment or part of
        a frame; BINARY any frame of a binary message; Ping a ping to answer;
        PeerClosed the peer's close frame; Close a broken rule (the caller
        closes with it). After a PeerClosed or Close, always None.
        """
        if self._done:
            return None
        if self._remaining:
            return self._payload()
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        b0 = buf[pos]
        b1 = buf[pos + 1]
        opcode = b0 & 0x0F
        if opcode not in _OPCODE_REPR:
            return self._fail(_protocol_error(f"Invalid opcode {opcode:#x}"))
        fin = b0 & 0x80
        control = opcode & 0x08
        if control and not fin:
            return self._fail(_protocol_error("Invalid attempt to fragment control frame"))
        length = b1 & 0x7F
        head = 2
        if control and length > 125:
            return self._fail(_protocol_error("Control frame with payload len > 125"))
        if length == 126:
            if available < 4:
                return None
            length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            if length <= 125:
                return self._fail(_protocol_error("Payload length used 2 bytes when 1 would have sufficed"))
            head = 4
        elif length == 127:
            if available < 10:
                return None
            length = int.from_bytes(buf[pos + 2:pos + 10], "big")
            if length <= 0xFFFF:
                return self._fail(_protocol_error("Payload length used 8 bytes when 2 would have sufficed"))
            if length >> 63:
                return self._fail(_protocol_error("8-byte payload length with non-zero MSB"))
            head = 10
        if b0 & 0x70:
            return self._fail(_protocol_error("Reserved bit set unexpectedly"))
        if not b1 & 0x80:
            return self._fail(_protocol_error("server received unexpected unmasked frame"))
        if available < head + 4:
            return None
        key = buf[pos + head:pos + head + 4]
        start = pos + head + 4
        if control:
            end = start + length
            if end > len(buf):
                return None  # control payloads are at most 125 bytes: wait for all of it
            self._consumed(end)
            payload = unmask(buf[start:end], key)
            if opcode == _PING:
                return Ping(payload)
            if opcode == _PONG:
                return HEARD_FRAME
            return self._close(payload)
        # A data frame: wsproto checks its place in the message once it has
        # some payload (or an empty one), so do the same.
        if length and start == len(buf):
            return None
        message = self._message
        if message is None:
            if opcode == _CONTINUATION:
                return self._fail(_protocol_error("unexpected CONTINUATION"))
            self._message = message = opcode
        elif opcode != _CONTINUATION:
            return self._fail(_protocol_error(f"expected CONTINUATION, got {_OPCODE_REPR[opcode]}"))
        self._fin = bool(fin)
        self._key = key
        self._pos = start
        if message == _BINARY:
            # The session closes on any binary frame: report it now and skip
            # its payload rather than keep it.
            self._remaining = length
            self._skip()
            if fin and not self._remaining:
                self._message = None
            return BINARY
        parts = self._parts
        if length + (len(parts) if parts is not None else 0) > self._max_bytes:
            return self._fail(closes.TOO_BIG_FRAME)
        end = start + length
        if fin and parts is None and end <= len(buf):
            # The common case: a whole message in one frame, all of it here.
            self._consumed(end)
            self._message = None
            try:
                text = unmask(buf[start:end], key).decode("utf-8")
            except UnicodeDecodeError as exc:
                return self._fail(Close(closes.INVALID_DATA, str(exc)))
            return text
        if opcode == _TEXT:
            self._decoder = _Utf8Decoder()
            if self._parts is None:
                self._parts = bytearray()
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS:
            return self._fail(closes.TOO_FRAGMENTED)
        self._remaining = length
        event = self._payload()
        return HEARD_FRAME if event is HEARD else event

    # -- helpers --------------------------------------------------------------

    def _consumed(self, end: int) -> None:
        if end >= len(self._buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end

    def _fail(self, close: Close) -> Close:
        self._stop()
        return close

    def _stop(self) -> None:
        self._done = True
        self._message = None
        self._buf = b""
        self._pos = 0
        self._parts = None
        self._decoder = None

    def _take(self) -> bytes:
        """Up to the rest of the current data frame's payload, unmasked."""
        buf = self._buf
        pos = self._pos
        take = min(len(buf) - pos, self._remaining)
        chunk = buf[pos:pos + take]
        self._consumed(pos + take)
        self._remaining -= take
        key = self._key
        data = unmask(chunk, key)
        turn = take & 3
        if turn:
            self._key = key[turn:] + key[:turn]
        return data

    def _skip(self) -> None:
        take = min(len(self._buf) - self._pos, self._remaining)
        self._consumed(self._pos + take)
        self._remaining -= take

    def _payload(self) -> Event | None:
        """Part (or the rest) of a data frame's payload, which has begun."""
        if self._pos == len(self._buf) and self._remaining:
            return None
        if self._message == _BINARY:
            self._skip()
            if not self._remaining and self._fin:
                self._message = None
            return HEARD
        data = self._take()
        finished = self._fin and not self._remaining
        decoder = self._decoder
        assert decoder is not None and self._parts is not None
        try:
            decoder.decode(data, finished)  # checks the UTF-8 as it comes
        except UnicodeDecodeError as exc:
            return self._fail(Close(closes.INVALID_DATA, str(exc)))
        self._parts += data
        if not finished:
            return HEARD
        text = self._parts.decode("utf-8")  # checked piece by piece already
        self._message = None
        self._decoder = None
        self._parts = None
        self._fragments = 0
        return text

    def _close(self, payload: bytes) -> PeerClosed | Close:
        if not payload:
            self._stop()
            return PeerClosed(NO_STATUS_RCVD, "")
        if len(payload) == 1:
            return self._fail(_protocol_error("CLOSE with 1 byte payload"))
        code = int.from_bytes(payload[:2], "big")
        if code < 1000 or code > 4999:
            return self._fail(_protocol_error("CLOSE with invalid code"))
        if code in (1005, 1006, 1015):
            return self._fail(_protocol_error("remote CLOSE with local-only reason"))
        if code < 3000 and code not in _KNOWN_CODES:
            return self._fail(_protocol_error("CLOSE with unknown reserved code"))
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._fail(Close(closes.INVALID_DATA, "Error decoding CLOSE reason: " + str(exc)))
        self._stop()
        return PeerClosed(code, reason)

"""The tools' one client-side framing (scripts/garin_bench/wsframe.py),
checked against garin's own server side: what the clients send, garin's
parser reads back exactly; what garin sends, frame_at cuts out exactly."""

from __future__ import annotations

import pytest

from garin.frames import close_frame, pong_frame, text_frame
from garin.frames_in import FrameParser, Heard
from garin.handshake import Upgrade, accept_response, parse_upgrade
from garin_bench.wsframe import (
    OP_CONTINUATION,
    OP_TEXT,
    MaskedFrameError,
    accept_for,
    client_frame,
    frame_at,
    new_key,
    upgrade_request,
)

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def parsed(data: bytes) -> list[object]:
    parser = FrameParser(1 << 20)
    parser.feed(data)
    out: list[object] = []
    while (event := parser.next_event()) is not None:
        if not isinstance(event, Heard):
            out.append(event)
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("key", [None, b"\x37\xfa\x21\x3d"])
def test_garin_reads_back_every_client_frame_length(size: int, key: bytes | None) -> None:
    text = ("é✓" * size)[:size]
    assert parsed(client_frame(OP_TEXT, text.encode(), key=key)) == [text]


def test_fragments_make_one_message() -> None:
    data = (client_frame(OP_TEXT, b"one ", fin=False) + client_frame(OP_CONTINUATION, b"two ", fin=False)
            + client_frame(OP_CONTINUATION, b"three"))
    assert parsed(data) == ["one two three"]


@pytest.mark.parametrize("frame", [text_frame(b"x" * n) for n in SIZES] + [close_frame(1008, "rate limit exceeded"),
                                                                           pong_frame(b"hi")])
def test_frame_at_cuts_out_each_server_frame_and_waits_for_the_rest(frame: bytes) -> None:
    data = frame + text_frame(b"next")
    first, start, end = frame_at(data) or (0, 0, 0)
    assert first == frame[0] and end == len(frame) and data[start:end] == frame[start:]
    assert frame_at(data, end) == (0x81, end + 2, end + 6)
    for cut in sorted({0, 1, 2, 3, start - 1, start, len(frame) - 1}):
        if 0 <= cut < len(frame):
            assert frame_at(frame[:cut]) is None, cut


def test_a_masked_server_frame_is_refused() -> None:
    with pytest.raises(MaskedFrameError):
        frame_at(client_frame(OP_TEXT, b"masked"))


def test_garin_accepts_the_upgrade_request_and_its_answer_matches() -> None:
    key = new_key()
    request = upgrade_request("127.0.0.1", 8080, "/?x=1", "http://a.test", key)
    assert request.endswith(b"\r\n\r\n")
    assert parse_upgrade(request[:-4]) == Upgrade("/?x=1", key, "http://a.test")
    assert b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n" in accept_response(key)

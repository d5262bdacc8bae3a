"""router.status: every request to the operator's port gets an answer or a close,
never an exception out of the handler (one of them used to stop the router)."""

from __future__ import annotations

import json

import h11
import pytest
import trio
import trio.testing

from garin.router.status import REQUEST_TIMEOUT_S, Reply, handle_status_request, reply_events

HEALTHY = {"0": True, "1": True}


def healthy() -> dict[str, dict[str, bool]]:
    return {"shards": dict(HEALTHY)}


async def exchange(request: bytes, health=healthy, half_close: bool = True) -> bytes:
    """Send `request` to a handler over an in-memory stream; everything it answers."""
    client, server = trio.testing.memory_stream_pair()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_request, server, health, "test")
        await client.send_all(request)
        if half_close:
            await client.send_eof()
        while chunk := await client.receive_some(65536):
            received += chunk
    return received


def parse(raw: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
    """The response in `raw`, read as a client that sent `method` would."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    return response, body


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def test_get_health() -> None:
    response, body = parse(await exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert response.status_code == 200
    assert json.loads(body) == {"status": "ok", "shards": HEALTHY}


async def test_degraded_health_is_503() -> None:
    raw = await exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", health=lambda: {"shards": {"0": False}})
    assert parse(raw)[0].status_code == 503


async def test_health_is_degraded_while_a_shard_has_no_redis() -> None:
    parts = {"shards": {"0": True}, "redis": {"0": False}}
    response, body = parse(await exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", health=lambda: parts))
    assert response.status_code == 503
    assert json.loads(body) == {"status": "degraded", **parts}


@pytest.mark.parametrize("target", [b"/health", b"/metrics", b"/nope", b"/health?x=1"])
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_head_gets_the_get_headers_and_no_body(target: bytes, version: bytes) -> None:
    host = b"Host: x\r\n" if version == b"HTTP/1.1" else b""
    get = await exchange(b"GET " + target + b" " + version + b"\r\n" + host + b"\r\n")
    head = await exchange(b"HEAD " + target + b" " + version + b"\r\n" + host + b"\r\n")
    get_response, get_body = parse(get)
    head_response, head_body = parse(head, b"HEAD")
    assert head_body == b"" and head.endswith(b"\r\n\r\n")
    assert head_response.status_code == get_response.status_code
    assert header(head_response, b"content-type") == header(get_response, b"content-type")
    if target != b"/metrics":  # the metrics text changes between two scrapes
        assert header(head_response, b"content-length") == str(len(get_body)).encode()


async def test_other_methods_get_405_with_allow() -> None:
    response, _ = parse(await exchange(b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert response.status_code == 405
    assert header(response, b"allow") == b"GET, HEAD"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"\x00\xff garbage \r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_get_an_error_status(request_bytes: bytes, status: int) -> None:
    assert parse(await exchange(request_bytes))[0].status_code == status


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",
        b"GET /hea",  # cut short
        b"\r\n\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    ],
)
async def test_garbage_is_closed_quietly(request_bytes: bytes) -> None:
    raw = await exchange(request_bytes)
    assert raw == b"" or raw.startswith(b"HTTP/1.1 4") or raw.startswith(b"HTTP/1.1 5")


@pytest.mark.parametrize("version", [b"9.9", b"1.2", b"2.0", b"0.9"])
async def test_other_http_versions_get_505(version: bytes) -> None:
    """h11 reads any HTTP/d.d request line; only 1.0 and 1.1 are spoken here."""
    raw = await exchange(b"GET /health HTTP/" + version + b"\r\nHost: x\r\n\r\n")
    assert parse(raw)[0].status_code == 505


async def test_pipelined_requests_get_one_answer_then_close() -> None:
    raw = await exchange(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    )
    response, body = parse(raw)
    assert response.status_code == 200 and json.loads(body)["status"] == "ok"
    assert header(response, b"connection") == b"close"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort",
        b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_requests_with_a_body_are_answered(request_bytes: bytes) -> None:
    assert parse(await exchange(request_bytes))[0].status_code in (200, 405)


async def test_a_failing_health_callable_closes_the_connection_only() -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    assert await exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", health=broken) == b""


async def test_a_peer_that_sends_nothing_is_dropped_after_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    assert await exchange(b"GET /health HTTP/1.1\r\n", half_close=False) == b""
    assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT_S)


async def test_a_peer_that_hangs_up_first_is_no_error() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.aclose()
    await handle_status_request(server, healthy, "test")  # does not raise


def test_head_reply_has_no_data_event() -> None:
    events = reply_events(b"HEAD", Reply(200, b"body"))
    assert [type(e) for e in events] == [h11.Response, h11.EndOfMessage]
    assert (b"content-length", b"4") in events[0].headers

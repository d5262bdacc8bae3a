"""shard/redis_link.py (a shard process's own Redis connection: a trio
stream with coredis's packer and parser) against a real redis-server, with
no garin host around it: replies matched to their commands, events and
replies on one connection, a burst, unsubscribe, the handshake (password,
database), TLS and Unix sockets, and Redis closing the connection.

Each test starts its own redis-server (`redis` from test_redis.py);
skipped with a reason when Debian's redis-server is not installed."""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import coredis
import pytest
import trio
from coredis.exceptions import AuthenticationFailureError, AuthenticationRequiredError, ResponseError
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import UnknownCommandError
from test_redis import REDIS_SERVER, RedisServer, redis  # noqa: F401 (`redis` is a fixture)

from garin.shard.redis_link import DRAIN, READ_SIZE, RedisLink, open_link

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("hard_cap"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

WAIT_S = 10.0
Events = list[tuple[bytes, bytes]]


def pool(url: str) -> Any:
    return coredis.Redis.from_url(url, decode_responses=False).connection_pool


@asynccontextmanager
async def running(
    url: str, on_event: Callable[[bytes, bytes], None] | None = None
) -> AsyncIterator[tuple[RedisLink, Events]]:
    """A link to `url` with its reader and writer running (as the shard runs
    them), and the list of the events it got, in order (or `on_event`)."""
    events: Events = []
    with trio.fail_after(WAIT_S):
        link = await open_link(pool(url))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.read, on_event or (lambda channel, data: events.append((channel, data))))
            nursery.start_soon(link.write)
            yield link, events
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(link.stream)


async def command(redis: RedisServer, *args: str) -> bytes:
    """One command from another, plain client (RedisServer.command, off the loop)."""
    return await trio.to_thread.run_sync(redis.command, *args)


def publish_pipeline(redis: RedisServer, channel: str, payloads: list[bytes]) -> None:
    """PUBLISH each payload from another connection in one pipeline, as fast
    as Redis takes them; returns once Redis has handled them all."""
    name = channel.encode()
    commands = b"".join(
        b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(data), data) for data in payloads
    )
    with socket.create_connection(("127.0.0.1", redis.port), timeout=WAIT_S) as sock:
        sock.sendall(commands + b"*1\r\n$4\r\nPING\r\n")
        replies = b""
        while not replies.endswith(b"+PONG\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, "Redis closed the publisher's connection"
            replies += chunk


# -- replies ------------------------------------------------------------------------


async def test_replies_come_in_order_each_with_its_own_value_or_error(redis: RedisServer) -> None:
    async with running(redis.url) as (link, _):
        replies = link.send([
            (b"SET", "word", "not a number"), (b"PUBLISH", "nobody", "x"), (b"INCR", "word"),
            (b"GET", "word"), (b"NO-SUCH-COMMAND",), (b"ECHO", "last"),
        ])
        with trio.fail_after(WAIT_S):
            assert await replies[-1].wait() == b"last"
        assert all(reply.done for reply in replies)  # Redis answers in order
        assert [reply.value for reply in replies] == [b"OK", 0, None, b"not a number", None, b"last"]
        assert replies[0].error is None and replies[3].error is None
        assert isinstance(replies[2].error, ResponseError) and "not an integer" in str(replies[2].error)
        assert isinstance(replies[4].error, UnknownCommandError)
        with pytest.raises(ResponseError, match="not an integer"):
            await replies[2].wait()
        with trio.fail_after(WAIT_S):  # the link goes on after errors
            assert await link.request(b"INCRBY", "count", 5) == 5


async def subscribe_with_a_reply_waiting(redis: RedisServer, link: RedisLink, channels: list[str]) -> None:
    """Subscribe with an ECHO sent right behind the SUBSCRIBE (Redis stopped
    meanwhile: both are read before any answer): SUBSCRIBE's acknowledgements
    come while the ECHO's reply waits, and must not complete it."""
    process = redis.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.subscribe, channels)
            await trio.sleep(0.05)  # the SUBSCRIBE queued and written
            echo = link.send([(b"ECHO", "behind")])[0]
            process.send_signal(signal.SIGCONT)
            assert await echo.wait() == b"behind"
    finally:
        process.send_signal(signal.SIGCONT)


async def test_events_and_replies_interleave_on_one_connection(redis: RedisServer) -> None:
    async with running(redis.url) as (link, events):
        with trio.fail_after(WAIT_S):
            await subscribe_with_a_reply_waiting(redis, link, ["room:a", "room:b"])
            # Alternately from the link and from another client: one order.
            counts = []
            for n in range(6):
                if n % 2:
                    counts.append(await command(redis, "PUBLISH", "room:a", f"plain {n}"))
                else:
                    counts.append(await link.request(b"PUBLISH", "room:a", f"link {n}"))
            # Pushes between the replies of one batch.
            batch = link.send([
                (b"PUBLISH", "room:b", "one"), (b"ECHO", "between"), (b"PUBLISH", "nobody", "lost"),
                (b"PUBLISH", "room:a", "two"),
            ])
            assert await batch[-1].wait() == 1
        assert counts == [1, b":1\r\n", 1, b":1\r\n", 1, b":1\r\n"]
        assert [reply.value for reply in batch] == [1, b"between", 0, 1]
        assert events == [
            (b"room:a", b"link 0"), (b"room:a", b"plain 1"), (b"room:a", b"link 2"), (b"room:a", b"plain 3"),
            (b"room:a", b"link 4"), (b"room:a", b"plain 5"), (b"room:b", b"one"), (b"room:a", b"two"),
        ]


# -- events -----------------------------------------------------------------------------


async def test_a_burst_arrives_whole_once_and_in_order(redis: RedisServer) -> None:
    """5,000 events (many reads, many DRAINs) and one larger than a read."""
    payloads = [b"event %d" % n for n in range(5000)]
    payloads.insert(2500, b"y" * (3 * READ_SIZE))
    async with running(redis.url) as (link, events):
        with trio.fail_after(WAIT_S):
            await link.subscribe(["burst"])
            await trio.to_thread.run_sync(publish_pipeline, redis, "burst", payloads)
            # Sent after Redis handled the burst: its reply comes after every event.
            assert await link.request(b"PING") == b"PONG"
        assert events == [(b"burst", data) for data in payloads]


async def test_a_burst_lets_other_tasks_run_every_drain_events(redis: RedisServer) -> None:
    """The reader checkpoints every DRAIN events, not only between reads: a
    task counting its own turns runs many more times than there are reads."""
    count = 150 * DRAIN
    turns = 0
    seen: list[int] = []  # `turns` as each event came

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.sleep(0)

    async with running(redis.url, lambda channel, data: seen.append(turns)) as (link, _):
        with trio.fail_after(WAIT_S):
            await link.subscribe(["burst"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            # Published with the loop blocked: the burst waits in the socket
            # and in Redis, and each read brings as much as it can take.
            publish_pipeline(redis, "burst", [b"%d" % n for n in range(count)])
            with trio.fail_after(WAIT_S):
                while len(seen) < count:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    # About count / DRAIN turns (110 seen); a reader that yields only
    # between reads gives one a read (4-6 seen).
    assert len(set(seen)) > count // DRAIN // 4, len(set(seen))


async def test_after_unsubscribe_and_a_round_trip_the_channel_is_silent(redis: RedisServer) -> None:
    async with running(redis.url) as (link, events):
        with trio.fail_after(WAIT_S):
            await link.subscribe(["gone", "kept"])
            link.unsubscribe(["gone"])
            assert await link.request(b"PING") == b"PONG"
            assert await command(redis, "PUBLISH", "gone", "after") == b":0\r\n"
            assert await command(redis, "PUBLISH", "kept", "after") == b":1\r\n"
            assert await link.request(b"PING") == b"PONG"  # comes after what was published before it
        assert events == [(b"kept", b"after")]


# -- connecting ---------------------------------------------------------------------


async def test_the_handshake_authenticates_with_the_url_s_password(redis: RedisServer) -> None:
    password = "s3cret-link"
    assert await command(redis, "CONFIG", "SET", "requirepass", password) == b"+OK\r\n"
    base = f"127.0.0.1:{redis.port}/0"
    for right in (f"redis://:{password}@{base}", f"redis://default:{password}@{base}"):
        async with running(right) as (link, _):
            with trio.fail_after(WAIT_S):
                assert await link.request(b"PING") == b"PONG"
    with trio.fail_after(WAIT_S):
        with pytest.raises(AuthenticationFailureError):
            await open_link(pool(f"redis://:wrong@{base}"))
        with pytest.raises(AuthenticationRequiredError):
            await open_link(pool(f"redis://{base}"))


async def test_the_url_s_database_is_selected(redis: RedisServer) -> None:
    async with running(f"redis://127.0.0.1:{redis.port}/3") as (link, _):
        with trio.fail_after(WAIT_S):
            assert await link.request(b"SET", "where", "db 3") == b"OK"
    for db, want in ((3, b"db 3"), (0, None)):
        async with coredis.Redis.from_url(f"redis://127.0.0.1:{redis.port}/{db}", decode_responses=False) as client:
            with trio.fail_after(WAIT_S):
                assert await client.get("where") == want


@contextmanager
def started(kind: str) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server of that kind (tcp, tls with a password, unix) and the
    URL a shard would be given for it."""
    server = RedisServer(tls=kind == "tls", unix=kind == "unix").start()
    try:
        yield server, server.url.replace("rediss://", f"rediss://:{server.password}@")
    finally:
        server.cleanup()


@pytest.mark.parametrize("kind", ["tls", "unix"])
async def test_a_round_trip_over_tls_and_a_unix_socket(kind: str) -> None:
    large = b"z" * (3 * READ_SIZE)  # many TLS records, several reads
    with started(kind) as (_, url):
        async with running(url) as (link, events):
            with trio.fail_after(WAIT_S):
                await link.subscribe(["secure"])
                replies = link.send([(b"PUBLISH", "secure", "hello"), (b"PUBLISH", "secure", large), (b"ECHO", "end")])
                assert await replies[-1].wait() == b"end"
            assert [reply.value for reply in replies] == [1, 1, b"end"]
            assert events == [(b"secure", b"hello"), (b"secure", large)]


# -- Redis closing the connection -----------------------------------------------------

@pytest.mark.parametrize("kind, how", [
    ("tcp", "client kill"), ("tcp", "redis stopped"), ("unix", "client kill"), ("unix", "redis stopped"),
    ("tls", "client kill"), ("tls", "redis stopped"),
])
async def test_redis_closing_the_connection_makes_read_raise(kind: str, how: str) -> None:
    raised: list[BaseException] = []
    with started(kind) as (server, url):
        with trio.fail_after(WAIT_S):
            link = await open_link(pool(url))
        try:
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    try:
                        await link.read(lambda channel, data: None)
                    except Exception as exc:
                        raised.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                nursery.start_soon(link.write)
                with trio.fail_after(WAIT_S):
                    await link.subscribe(["doomed"])
                    if how == "client kill":  # what Redis does to a subscriber too far behind
                        async with running(url) as (other, _):
                            assert await other.request(b"CLIENT", b"KILL", b"TYPE", b"pubsub") == 1
                    else:
                        await trio.to_thread.run_sync(server.stop)
                    await trio.sleep_forever()  # until read() returns
        finally:
            await trio.aclose_forcefully(link.stream)
    assert len(raised) == 1 and isinstance(raised[0], RedisConnectionError), raised

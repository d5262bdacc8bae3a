"""Several garin hosts sharing rooms through a real Redis (GARIN_REDIS_URL).

Each "host" is its own `garin run` (own port, socket directory, metrics);
they share one `redis-server` started here on a free loopback port. Skipped
with a reason when Debian's redis-server is not installed (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from conftest import (
    SHARDS,
    SHARED_ENV,
    Clients,
    GarinServer,
    expect_close,
    expect_join,
    expect_message,
    expect_quiet,
    expect_userleave,
    free_port,
    join_frame,
    message_frame,
    new_room,
    new_user,
    paused,
    recv_json,
    room_on,
)
from test_metrics import get, sample

from garin.shard.cluster import HEARTBEAT_S, REPLY_TIMEOUT_S
from garin.shard.cluster_rooms import channel

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("hard_cap"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

DEAD_AFTER_S = 2.0


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence.
    `tls`: TLS only, with a self-signed certificate, and a password.
    `unix`: on a Unix socket in its directory only. `persist`: keys kept
    across a restart (an append-only file, synced at every write).
    `cluster`: a Redis Cluster node (with no slots)."""

    def __init__(self, tls: bool = False, unix: bool = False, persist: bool = False, cluster: bool = False) -> None:
        self.port = free_port()
        # A Cluster node also listens on its port + 10000 (its cluster bus).
        while cluster and not (self.port <= 55535 and _port_free(self.port + 10000)):
            self.port = free_port()
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.unix = self.dir / "redis.sock" if unix else None
        self.persist = persist
        self.password = secrets.token_hex(16)
        if tls:
            self.cert = self.dir / "cert.pem"
            self.key = self.dir / "key.pem"
            _self_signed(self.cert, self.key)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        if self.unix:
            return f"unix://{self.unix}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--daemonize", "no", "--dir", str(self.dir)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf")]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(self.key), "--tls-auth-clients", "no", "--requirepass", self.password]
        elif self.unix:
            args += ["--port", "0", "--unixsocket", str(self.unix), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port)]
        with open(self.dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.ping():
            assert self.process.poll() is None, (self.dir / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        import ssl

        try:
            if self.unix:
                with socket.socket(socket.AF_UNIX) as raw:
                    raw.settimeout(1)
                    raw.connect(str(self.unix))
                    raw.sendall(b"PING\r\n")
                    return raw.recv(64).startswith(b"+PONG")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.cert))
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                        sock.sendall(f"AUTH {self.password}\r\n".encode())
                        return sock.recv(64).startswith(b"+OK")
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw reply (enough for the checks here)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(eq=False)
class _ProxyLink:
    client: socket.socket
    upstream: socket.socket
    subscriber: bool = False  # the client sent a SUBSCRIBE on it
    silent: bool = False  # nothing forwarded any more, either way
    closed: bool = False


class SilencingProxy:
    """A TCP proxy on loopback in front of a redis-server, one thread per
    direction of each connection. `silence_subscribers()` makes the
    connections that sent a SUBSCRIBE go silent: kept open, nothing
    forwarded either way (what a peer gone without a word, or a NAT that
    forgot the connection, does): no error and no close reach garin.
    Connections made after it are forwarded as before. At most MAX_LINKS
    connections; `stop()` closes everything and joins the threads."""

    MAX_LINKS = 32
    POLL_S = 0.1  # how often a thread waiting on a socket looks at `stop()`

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(self.POLL_S)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.links: list[_ProxyLink] = []
        self.threads = [threading.Thread(target=self._accept, name="proxy-accept")]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def subscribers(self) -> list[_ProxyLink]:
        with self.lock:
            return [link for link in self.links if link.subscriber]

    def silence_subscribers(self) -> int:
        """Silence the open connections that sent a SUBSCRIBE; how many."""
        with self.lock:
            chosen = [link for link in self.links if link.subscriber and not link.closed]
            for link in chosen:
                link.silent = True
            return len(chosen)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(self.POLL_S)
            upstream.settimeout(self.POLL_S)
            link = _ProxyLink(client, upstream)
            with self.lock:
                if len(self.links) >= self.MAX_LINKS:
                    client.close()
                    upstream.close()
                    continue
                self.links.append(link)
                pumps = [
                    threading.Thread(target=self._pump, args=(link, client, upstream, True), name="proxy-up"),
                    threading.Thread(target=self._pump, args=(link, upstream, client, False), name="proxy-down"),
                ]
                self.threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, link: _ProxyLink, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""  # a command's name may be split across two reads
        try:
            while not self.stopping.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if from_client and not link.subscriber:
                    link.subscriber = b"SUBSCRIBE" in tail + data
                    tail = data[-8:]
                if not link.silent:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            # One side closed or failed: close the other, as a proxy does.
            link.closed = True
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for thread in list(self.threads):
            thread.join(timeout=5)
        with self.lock:
            for link in self.links:
                link.client.close()
                link.upstream.close()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _self_signed(cert_path: Path, key_path: Path) -> None:
    """A certificate for 127.0.0.1 (cryptography comes with PyJWT[crypto])."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


class Hosts:
    """garin hosts on one Redis, sharing a token secret; stopped afterwards."""

    def __init__(self, redis: RedisServer, stack: contextlib.ExitStack) -> None:
        self.redis = redis
        self.secret = secrets.token_urlsafe(48)
        self.stack = stack
        self.all: list[GarinServer] = []

    def start(self, shards: int = SHARDS, **env: str) -> GarinServer:
        server = GarinServer(
            env_overrides={
                **SHARED_ENV,
                "GARIN_REDIS_URL": self.redis.url,
                "GARIN_REDIS_DEAD_AFTER": str(DEAD_AFTER_S),
                "GARIN_SHARD_HOLD_TIMEOUT": "5",
                **env,
            },
            secret=self.secret,
            shards=shards,
        )
        server.start()
        self.all.append(server)
        self.stack.callback(self._stop, server)
        return server

    def _stop(self, server: GarinServer) -> None:
        if server.process is not None and server.process.poll() is None:
            server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def hosts(redis: RedisServer) -> Iterator[Hosts]:
    with contextlib.ExitStack() as stack:
        yield Hosts(redis, stack)


@pytest.fixture
def people(hosts: Hosts) -> Iterator[Clients]:
    with contextlib.ExitStack() as stack:
        yield Clients(stack, None)  # type: ignore[arg-type]  # every call names its server


def join_all(people: Clients, room: str, placed: list[tuple[str, GarinServer]]) -> list[ClientConnection]:
    """Each (name, host) joins `room` in turn; everyone sees each join with the right count."""
    joined: list[ClientConnection] = []
    for n, (name, host) in enumerate(placed, 1):
        ws = people.join(name, room, total=n, server=host)
        for earlier in joined:
            expect_join(earlier, name, n)
        joined.append(ws)
    return joined


# -- chat across hosts ---------------------------------------------------------------


def test_members_on_two_hosts_chat_in_rooms_of_every_shard(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(), hosts.start()
    for shard in range(SHARDS):
        room = room_on(shard, "x")
        alice, bob = new_user("alice"), new_user("bob")
        wa, wb = join_all(people, room, [(alice, a), (bob, b)])
        wa.send(message_frame("hi bob"))
        expect_message(wb, alice, "hi bob")
        wb.send(message_frame("hello alice"))
        expect_message(wa, bob, "hello alice")
        expect_quiet([wa, wb], settle=0.1)
        wb.send(json.dumps({"type": "userleave"}))
        expect_userleave(wa, bob, 1)


def test_total_users_counts_both_hosts_through_joins_and_leaves(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    room = new_room("count")
    names = [new_user(f"p{i}") for i in range(6)]
    placed = [(name, a if i % 2 == 0 else b) for i, name in enumerate(names)]
    sockets = join_all(people, room, placed)
    # Leaves from both hosts, in turn: the others see counts 5, 4, 3.
    present = list(range(6))
    for gone, expected in ((1, 5), (2, 4), (5, 3)):
        sockets[gone].send(message_frame(""))  # an empty body leaves and closes
        expect_close(sockets[gone], 1000, "bye")
        present.remove(gone)
        for i in present:
            expect_userleave(sockets[i], names[gone], expected)
    late = new_user("late")
    ws = people.join(late, room, total=4, server=b)
    for i in (0, 3, 4):
        expect_join(sockets[i], late, 4)
    expect_quiet([ws, sockets[0], sockets[3], sockets[4]], settle=0.1)


@pytest.mark.cap(90)
def test_25_senders_over_three_hosts_every_message_once_in_order(hosts: Hosts, people: Clients) -> None:
    three = [hosts.start(shards=2), hosts.start(shards=2), hosts.start(shards=2)]
    room = new_room("busy")
    names = [new_user(f"s{i:02d}") for i in range(25)]
    sockets = join_all(people, room, [(name, three[i % 3]) for i, name in enumerate(names)])
    per_sender = 20
    errors: list[BaseException] = []

    def send(ws: ClientConnection, name: str) -> None:
        try:
            for n in range(per_sender):
                ws.send(message_frame(f"{name} {n}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(ws, name)) for ws, name in zip(sockets, names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    expected = per_sender * (len(names) - 1)
    for ws, me in zip(sockets, names):
        seen: dict[str, int] = {}
        for _ in range(expected):
            got = recv_json(ws, timeout=15)
            assert got["type"] == "message" and got["username"] != me, got
            sender, n = got["body"].split()
            assert got["username"] == sender
            assert int(n) == seen.get(sender, -1) + 1, f"{sender}'s message {n} after {seen.get(sender)}"
            seen[sender] = int(n)
        assert all(v == per_sender - 1 for v in seen.values()) and len(seen) == len(names) - 1
    expect_quiet(sockets, settle=0.2)


@pytest.mark.parametrize("same_room", [False, True])
def test_a_member_moving_rooms_is_announced_leaving_then_joining_on_every_host(
    hosts: Hosts, people: Clients, same_room: bool
) -> None:
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    first = room_on(0, "from", shards=2)
    second = first if same_room else room_on(1, "to", shards=2)
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    wa, wb = join_all(people, first, [(alice, a), (bob, b)])
    wc = wb if same_room else people.join(carol, second, total=1, server=b)
    # Alice leaves, then joins the second room (of the other shard of her host).
    wa.send(json.dumps({"type": "userleave"}))
    expect_userleave(wb, alice, 1)
    wa.send(json.dumps({"type": "join", "username": alice, "room": second}))
    expect_join(wa, alice, 2)
    expect_join(wc, alice, 2)
    wc.send(message_frame("welcome"))
    expect_message(wa, bob if same_room else carol, "welcome")
    wa.send(message_frame("thanks"))
    expect_message(wc, alice, "thanks")
    expect_quiet([wa, wb, wc], settle=0.1)


def subscribers(redis: RedisServer, room: str) -> int:
    """How many connections Redis has subscribed to `room`'s channel."""
    reply = redis.command("PUBSUB", "NUMSUB", "garin:room:" + room)
    return int(reply.rsplit(b":", 1)[1].split(b"\r\n")[0])


def test_a_shard_process_is_subscribed_only_while_it_has_members_there(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    a, b = hosts.start(shards=1), hosts.start(shards=1)
    room = new_room("sub")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    wa, wb, wc = join_all(people, room, [(alice, a), (bob, a), (carol, b)])
    assert subscribers(redis, room) == 2  # one shard process per host
    wb.send(json.dumps({"type": "userleave"}))
    expect_userleave(wa, bob, 2)
    expect_userleave(wc, bob, 2)
    assert subscribers(redis, room) == 2  # alice is still there
    wa.send(json.dumps({"type": "userleave"}))
    expect_userleave(wc, alice, 1)
    wait_for(lambda: subscribers(redis, room) == 1, "host a to unsubscribe from the room it left", timeout=5)
    # Back in the room: subscribed again, and the room's events reach it.
    dave = new_user("dave")
    wd = people.join(dave, room, total=2, server=a)
    expect_join(wc, dave, 2)
    wc.send(message_frame("hi dave"))
    expect_message(wd, carol, "hi dave")
    assert subscribers(redis, room) == 2


@pytest.mark.cap(60)
def test_redis_dropping_a_subscriber_connection_is_a_link_down_and_back(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    a, b = hosts.start(shards=1), hosts.start(shards=1)
    room = new_room("drop")
    alice, bob = new_user("alice"), new_user("bob")
    wa, wb = join_all(people, room, [(alice, a), (bob, b)])
    # What Redis does to a subscriber past client-output-buffer-limit pubsub.
    assert redis.command("CLIENT", "KILL", "TYPE", "pubsub").startswith(b":2")
    for host in (a, b):
        wait_for(lambda: host.log_path.read_text().count("Redis link up") >= 2, "the link made again")
    chat_resumes(wa, alice, wb)
    for host in (a, b):
        log = host.log_path.read_text()
        assert "Redis link down (ConnectionError: " in log, log
        assert "Traceback" not in log and "Redis link failed" not in log, log


@pytest.mark.cap(60)
def test_a_subscription_gone_silent_is_found_by_the_keepalive_ping(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """Only the subscription's connection goes silent (open, nothing comes
    back): no error, no close, and the heartbeats on the other connection go
    on. Only the PING the shard sends on it now and then (`_keep_alive`)
    finds it; then the shard connects again (through the proxy) and chat
    through Redis works again."""
    proxy = SilencingProxy(redis.port)
    hosts.stack.callback(proxy.stop)  # after the hosts stop (they say farewell through it)
    a = hosts.start(shards=1, GARIN_REDIS_URL=proxy.url)
    b = hosts.start(shards=1)
    room = new_room("silent")
    alice, bob = new_user("alice"), new_user("bob")
    wa, wb = join_all(people, room, [(alice, a), (bob, b)])
    assert "Redis link down" not in a.log_path.read_text()
    assert proxy.silence_subscribers() == 1  # one shard process, one subscription
    silenced_at = time.monotonic()
    # Nothing sent meanwhile: a PUBLISH left unanswered would find it too.
    # The next PING within HEARTBEAT_S * 2, its answer overdue after
    # REPLY_TIMEOUT_S (and 5 s of slack for a loaded CI machine: without
    # the PING the link is never found).
    bound = HEARTBEAT_S * 2 + REPLY_TIMEOUT_S + 5
    wait_for(lambda: "Redis link down" in a.log_path.read_text(), "the silent link found", timeout=bound)
    assert time.monotonic() - silenced_at > REPLY_TIMEOUT_S  # found by an overdue answer, not an error
    wait_for(lambda: a.log_path.read_text().count("Redis link up") >= 2, "the link made again")
    # Made again through the proxy: a new subscription, forwarded.
    subscribers = proxy.subscribers()
    assert len(subscribers) == 2 and not subscribers[-1].silent and not subscribers[-1].closed
    chat_resumes(wb, bob, wa)
    wa.send(message_frame("back"))
    expect_message(wb, alice, "back")
    log = a.log_path.read_text()
    assert "Redis link down (TooSlowError); reconnecting" in log, log
    assert "Traceback" not in log and "took instance" not in log, log
    expect_quiet([wa, wb], settle=0.1)  # nobody closed or announced gone meanwhile


def chat_resumes(sender: ClientConnection, name: str, receiver: ClientConnection) -> None:
    """`sender`'s messages reach `receiver` again (soon: the link is being made again)."""

    def chat_works() -> bool:
        sender.send(message_frame("anyone?"))
        try:
            got = recv_json(receiver, timeout=1)
        except TimeoutError:
            return False
        assert got == {"type": "message", "username": name, "body": "anyone?"}
        return True

    wait_for(chat_works, "chat across the hosts again")


def publish_burst(redis: RedisServer, room: str, events: int, size: int = 1) -> None:
    """`events` events on `room`'s channel that no shard applies (`size`
    times "x"), each still one step of its fan-out loop, as fast as Redis
    takes them."""
    name = ("garin:room:" + room).encode()
    command = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, size, b"x" * size)
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as sock:
        sock.sendall(command * events + b"*1\r\n$4\r\nPING\r\n")
        replies = b""
        while not replies.endswith(b"+PONG\r\n"):
            replies += sock.recv(1 << 20)


@pytest.mark.cap(60)
def test_a_join_to_a_new_room_waits_for_its_subscription_behind_a_backlog(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """Redis answers a SUBSCRIBE after the events already on their way to
    the shard process: behind a backlog (here 48,000 events, under the
    bound) the answer is late, and that must not count as the link lost."""
    a = hosts.start(shards=1, GARIN_REDIS_DEAD_AFTER="30")  # not reaped while frozen
    room = new_room("busy")
    wa = people.join(new_user("alice"), room, total=1, server=a)
    frozen = shard_pid(a)
    with paused(frozen):
        publish_burst(redis, room, 48_000)
        # Handed to the frozen shard: it subscribes to the new room when it
        # wakes, its SUBSCRIBE answered after the 48,000 events.
        bob = new_user("bob")
        wb = people.authed(bob, server=a)
        wb.send(json.dumps({"type": "join", "username": bob, "room": new_room("quiet")}))
        time.sleep(0.5)
    expect_join(wb, bob, 1)
    expect_quiet([wa], settle=0.1)
    assert "Redis link down" not in a.log_path.read_text()


def test_a_burst_of_joins_to_new_rooms_each_hear_their_own_join(hosts: Hosts, people: Clients) -> None:
    """Joins to rooms new to the shard process, arriving while it is
    subscribing to others: each room is subscribed before its join goes out
    (else the join's echo never comes back and its member is closed 1013)."""
    a = hosts.start(shards=1)
    names = [new_user("burst") for _ in range(80)]
    sockets = [people.authed(name, server=a) for name in names]
    for name, ws in zip(names, sockets):
        ws.send(json.dumps({"type": "join", "username": name, "room": new_room("burst")}))
    for name, ws in zip(names, sockets):
        expect_join(ws, name, 1)


def shard_pid(server: GarinServer, index: int = 0) -> int:
    assert server.process is not None
    [pid] = [
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and _ppid(p) == server.process.pid
        and f"shard\0--index\0{index}\0".encode() in (p / "cmdline").read_bytes()
    ]
    return pid


@pytest.mark.cap(60)
def test_a_shard_far_behind_its_subscription_is_dropped_by_redis_and_links_again(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    """A shard process reads its subscription only as fast as it fans out,
    so what it has not read waits in Redis, whose own guard
    (client-output-buffer-limit pubsub) drops a subscriber too far behind:
    the shard (here frozen while a burst waits) makes its link again and the
    chat goes on. (Host b, reading as fast as it can, may be dropped too
    under a limit this small.)"""
    redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 4mb 2mb 1")
    a = hosts.start(shards=1, GARIN_REDIS_DEAD_AFTER="30")  # not reaped while frozen
    b = hosts.start(shards=1)
    room = new_room("burst")
    alice, bob = new_user("alice"), new_user("bob")
    wa, wb = join_all(people, room, [(alice, a), (bob, b)])
    frozen = shard_pid(a)
    with paused(frozen):
        # 30 MB: past what the sockets' kernel buffers hold, then past the limit.
        publish_burst(redis, room, 30_000, size=1000)
        time.sleep(1.5)  # the soft limit's second
    wait_for(lambda: "Redis link down" in a.log_path.read_text(), "the link dropped")
    wait_for(lambda: a.log_path.read_text().count("Redis link up") >= 2, "the link made again")
    chat_resumes(wb, bob, wa)


def _maps_coredis(server: GarinServer) -> dict[str, bool]:
    """For each of the host's processes (by its command line): whether it
    has loaded coredis (its compiled modules show in /proc/PID/maps)."""
    assert server.process is not None
    pids = [server.process.pid] + [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == server.process.pid
    ]
    return {
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(): "/coredis/" in Path(
            f"/proc/{pid}/maps"
        ).read_text()
        for pid in pids
    }


def test_one_host_without_redis_never_loads_the_redis_client(hosts: Hosts, people: Clients) -> None:
    single = GarinServer(env_overrides=SHARED_ENV, shards=2)
    hosts.stack.callback(hosts._stop, single)
    single.start()
    alice, bob = new_user("alice"), new_user("bob")
    wa, wb = join_all(people, new_room("one"), [(alice, single), (bob, single)])
    wa.send(message_frame("one host"))
    expect_message(wb, alice, "one host")
    loaded = _maps_coredis(single)
    assert len(loaded) == 4 and not any(loaded.values()), loaded  # supervisor, router, 2 shards
    # The check can fail: a host with GARIN_REDIS_URL has it in its shards.
    shards = {cmd: used for cmd, used in _maps_coredis(hosts.start(shards=2)).items() if " shard " in cmd}
    assert len(shards) == 2 and all(shards.values()), shards


# -- hosts and Redis failing ------------------------------------------------------------


def kill_host(server: GarinServer) -> None:
    """kill -9 a whole host: its supervisor and every child at once (no
    process gets to say goodbye)."""
    assert server.process is not None
    pid = server.process.pid
    children = [
        int(entry.name) for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _ppid(entry) == pid
    ]
    assert children, "the host has no children to kill"
    for victim in (pid, *children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    server.process.wait(timeout=10)
    server.process = None
    server.exit_code = -signal.SIGKILL


def _ppid(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.cap(60)
def test_a_killed_host_s_members_leave_within_the_bound(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    room = new_room("kill")
    names = [new_user(f"k{i}") for i in range(4)]
    # b holds members 1 and 3.
    sockets = join_all(people, room, [(n, a if i % 2 == 0 else b) for i, n in enumerate(names)])
    kill_host(b)
    killed = time.monotonic()
    # Each survivor hears both leaves (in one order for both), counts 3 then 2.
    orders = []
    for ws in (sockets[0], sockets[2]):
        first = recv_json(ws, timeout=DEAD_AFTER_S + 5)
        second = recv_json(ws, timeout=2)
        assert {first["type"], second["type"]} == {"userleave"}
        assert (first["totalUsers"], second["totalUsers"]) == (3, 2)
        assert {first["username"], second["username"]} == {names[1], names[3]}
        orders.append((first["username"], second["username"]))
    took = time.monotonic() - killed
    assert took < DEAD_AFTER_S + 3, f"ghosts lasted {took:.1f} s"
    assert orders[0] == orders[1]
    late = new_user("late")
    ws = people.join(late, room, total=3, server=a)
    expect_join(sockets[0], late, 3)
    expect_join(sockets[2], late, 3)
    sockets[0].send(message_frame("still here"))
    expect_message(ws, names[0], "still here")
    expect_message(sockets[2], names[0], "still here")


@pytest.mark.cap(60)
def test_sigterm_of_one_host_closes_its_clients_and_the_others_chat_on(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(shards=2), hosts.start(shards=2)
    room = new_room("term")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    wa, wb, wc = join_all(people, room, [(alice, a), (bob, b), (carol, a)])
    b.stop()  # SIGTERM: exit 0, socket directory removed (checked by stop)
    expect_close(wb, 1001, "server shutting down")
    expect_userleave(wa, bob, 2)
    expect_userleave(wc, bob, 2)
    wa.send(message_frame("bob has gone"))
    expect_message(wc, alice, "bob has gone")
    expect_quiet([wa, wc], settle=0.1)


@pytest.mark.cap(60)
def test_sigterm_with_redis_unreachable_still_exits_0_within_the_shutdown_timeout(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    a = hosts.start(shards=2, GARIN_SHUTDOWN_TIMEOUT="2")
    ws = people.join(new_user("alice"), new_room("frozen"), total=1, server=a)
    assert redis.process is not None
    with paused(redis.process.pid):  # connected, never answering: the worst case
        started = time.monotonic()
        a.stop()  # exit 0, socket directory removed
        took = time.monotonic() - started
    expect_close(ws, 1001, "server shutting down")
    assert took < 2 + 1.5, f"stopping took {took:.1f} s"


@pytest.mark.cap(90)
def test_after_redis_was_away_past_the_bound_the_hosts_do_not_reap_each_other(people: Clients) -> None:
    """Redis away from every host past GARIN_REDIS_DEAD_AFTER (restarted
    with its keys, a failover, a network cut) has every heartbeat expired
    when it is back: the first host back must not take the others, still
    coming back (backoff), for dead, which closes all their members."""
    redis = RedisServer(persist=True).start()
    stack = contextlib.ExitStack()
    stack.callback(redis.cleanup)
    with stack:
        hosts = Hosts(redis, stack)
        a, b = hosts.start(shards=1), hosts.start(shards=1)
        room = new_room("away")
        alice, bob = new_user("alice"), new_user("bob")
        wa, wb = join_all(people, room, [(alice, a), (bob, b)])
        redis.stop()
        time.sleep(DEAD_AFTER_S + 2)
        redis.start()
        for host in (a, b):
            wait_for(lambda: host.log_path.read_text().count("Redis link up") >= 2, "the link made again")
        time.sleep(DEAD_AFTER_S + 2)  # past any reaping
        expect_quiet([wa, wb], settle=0.1)  # nobody closed, nobody announced gone
        chat_resumes(wa, alice, wb)
        carol = new_user("carol")
        people.join(carol, room, total=3, server=a)
        expect_join(wa, carol, 3)
        expect_join(wb, carol, 3)
        assert "took instance" not in a.log_path.read_text() + b.log_path.read_text()


def wait_for(check, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.cap(90)
def test_redis_restarted_mid_traffic_service_resumes_without_duplicates(
    redis: RedisServer, hosts: Hosts, people: Clients
) -> None:
    metrics_port, metrics_port_b = free_port(), free_port()
    # Alice's messages wait for Redis while it is away, then for the link's
    # backoff (up to 5 s): held past GARIN_SHARD_HOLD_TIMEOUT she would be
    # closed 1013 (another test), so the hold is long here.
    a = hosts.start(shards=2, GARIN_METRICS_PORT=str(metrics_port), GARIN_SHARD_HOLD_TIMEOUT="20")
    b = hosts.start(shards=2, GARIN_METRICS_PORT=str(metrics_port_b))
    room = new_room("restart")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    wa, wb, wc = join_all(people, room, [(alice, a), (bob, b), (carol, b)])
    health = f"http://127.0.0.1:{metrics_port}/health"
    health_b = f"http://127.0.0.1:{metrics_port_b}/health"
    # Ok once every shard's pong has said its Redis link is up (a second at most).
    wait_for(lambda: get(health)[0] == 200, "/health ok")

    stop = threading.Event()
    sent = [0]

    def chatter() -> None:
        while not stop.is_set():
            wa.send(message_frame(str(sent[0])))
            sent[0] += 1
            time.sleep(0.02)

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        time.sleep(0.5)
        redis.stop()

        def degraded() -> bool:
            status, body = get(health)
            return status == 503 and json.loads(body)["redis"] == {"0": False, "1": False}

        wait_for(degraded, "/health to say both shards lost Redis")

        def waiting() -> float:
            text = get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
            return sum(sample(text, "garin_redis_queue", shard=str(i)) for i in range(2))

        wait_for(waiting, "alice's messages counted as waiting for Redis", timeout=3)
        time.sleep(0.5)
        redis.start()
        # Both hosts: the backoff has jitter, so b may subscribe again seconds
        # after a sends what waited, and what a publishes before that is lost
        # to b (README: What is lost). The last messages must be sent after.
        wait_for(lambda: get(health)[0] == 200, "/health ok again")
        wait_for(lambda: get(health_b)[0] == 200, "host b's /health ok again")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=5)
    last = sent[0] - 1
    # Each receiver: numbers strictly increasing (nothing twice, nothing
    # reordered), up to the last one sent (what was in flight when Redis died
    # may be missing: README).
    for ws in (wb, wc):
        previous = -1
        while previous < last:
            got = recv_json(ws, timeout=10)
            assert got["type"] == "message" and got["username"] == alice, got
            n = int(got["body"])
            assert n > previous, f"{n} after {previous}"
            previous = n
    expect_quiet([wa, wb, wc], settle=0.2)
    # Redis came back empty: the hosts registered their members again, so a
    # new member counts everyone, and leaves count down from there.
    dave = new_user("dave")
    wd = people.join(dave, room, total=4, server=a)
    for ws in (wa, wb, wc):
        expect_join(ws, dave, 4)
    wb.send(message_frame(""))
    expect_close(wb, 1000, "bye")
    for ws in (wa, wc, wd):
        expect_userleave(ws, bob, 3)


@pytest.mark.cap(60)
def test_without_redis_a_join_waits_the_hold_then_closes_1013(redis: RedisServer, hosts: Hosts, people: Clients) -> None:
    a = hosts.start(shards=2, GARIN_SHARD_HOLD_TIMEOUT="1")
    redis.stop()
    time.sleep(0.5)
    ws = people.authed(new_user("late"), server=a)
    ws.send(json.dumps({"type": "join", "username": new_user("late"), "room": new_room("held")}))
    took = expect_close(ws, 1013, "room unavailable", timeout=10)
    assert 0.5 < took < 4, took
    redis.start()
    # The link comes back after the backoff (up to 5 s, with jitter): the
    # next join waits only the 1 s hold, so wait for the link first.
    wait_for(lambda: a.log_path.read_text().count("Redis link up") >= 4, "both shards' links made again")
    name = new_user("back")
    people.join(name, new_room("back"), total=1, server=a)


# -- bans shared through Redis --------------------------------------------------------


@pytest.mark.cap(60)
def test_strikes_on_two_hosts_ban_on_both_and_garin_ban_reaches_them(hosts: Hosts) -> None:
    from test_bans import ban_cli, eventually, refused_as_banned, spam_until_closed

    limits = {
        "GARIN_RATE_LIMIT_COUNT": "1", "GARIN_RATE_LIMIT_WINDOW": "10",
        "GARIN_BAN_STRIKES": "2", "GARIN_BAN_WINDOW": "600", "GARIN_BAN_DURATION": "600",
    }
    a, b = hosts.start(shards=1, **limits), hosts.start(shards=1, **limits)
    spam_until_closed(a, "spammer", new_room("spam"))
    assert not refused_as_banned(b, "spammer")  # one strike is not enough
    spam_until_closed(b, "spammer", new_room("spam"))  # the second, on the other host
    eventually(lambda: refused_as_banned(a, "spammer") and refused_as_banned(b, "spammer"))
    assert not refused_as_banned(a, "bystander")
    listing = ban_cli(a, "list")
    assert listing.returncode == 0 and "spammer" in listing.stdout and "(ban list: Redis)" in listing.stdout
    result = ban_cli(b, "add", "troll", "--for", "1h", "--reason", "abuse")
    assert result.returncode == 0, result.stderr
    eventually(lambda: refused_as_banned(a, "troll"))
    assert ban_cli(a, "remove", "spammer").returncode == 0
    eventually(lambda: not refused_as_banned(b, "spammer"))


@pytest.mark.parametrize("strikes", [0, 1, 3])
def test_the_strike_script_judges_as_ban_policy(redis: RedisServer, strikes: int) -> None:
    """garin/redisbans.py's Lua gives BanPolicy.judge's verdict for every stored
    ban (none, ended, running, until removed) and count of earlier strikes."""
    import trio

    from garin.bans import FOREVER, Ban, BanPolicy
    from garin.redisbans import RedisBanStore

    policy = BanPolicy(strikes=strikes, window_s=600, ban_s=3600)
    now = 1_800_000_000.0

    async def check() -> None:
        async with RedisBanStore.open(redis.url) as store:
            for n, banned_until in enumerate((None, now - 1, now + 100, FOREVER)):
                for earlier in range(4):
                    subject = f"s{strikes}-{n}-{earlier}"
                    if banned_until is not None:
                        await store.add(subject, None if banned_until == FOREVER else banned_until, "t", now - 5)
                    for k in range(earlier):  # inside the window; one outside it, never counted
                        await store._client.zadd(f"garin:strikes:{subject}", {f"old{k}": now - 10 - k})
                    await store._client.zadd(f"garin:strikes:{subject}", {"ancient": now - 700})
                    got = await store.strike(subject, now, policy)
                    want = policy.judge(banned_until, earlier, now)
                    if isinstance(want, Ban):
                        assert isinstance(got, Ban) and abs(got.until - want.until) < 0.01, (subject, got, want)
                        assert subject in await store.active(now)
                    else:
                        assert got == want, (subject, got, want)

    trio.run(check)


def test_the_membership_scripts_never_let_a_reaped_instance_back_silently(redis: RedisServer) -> None:
    """garin/shard/redis_lua.py against a real Redis: a reaped instance's
    join is refused (it would be a ghost nobody removes), its heartbeat and
    its registration say it was taken for dead, even once its tombstone has
    expired; while after a restart (Redis empty) registering again brings
    its members back silently."""
    import coredis
    import trio

    from garin.shard import redis_lua as lua

    async def check() -> None:
        async with coredis.Redis.from_url(redis.url, verify_version=False) as client:
            async def register(inst: str, epoch: str, *members: str) -> bytes | int:
                return await client.eval(lua.REGISTER, args=[inst, 60_000, epoch, "fresh-" + inst, *members])

            async def join(inst: str, key: int) -> int:
                return await client.eval(
                    lua.JOIN, keys=[lua.roster("r"), lua.owned(inst)],
                    args=[channel("r"), inst, key, "r", f"u{key}"],
                )

            epoch = await register("A", "")
            assert epoch == b"fresh-A"
            assert await register("B", "") == epoch  # one epoch per Redis life
            assert await join("A", 1) == 1 and await join("B", 2) == 2
            await client.delete([lua.alive("A")])  # A's heartbeat expired: it was paused
            assert await client.eval(lua.REAP, args=[60_000]) == 1
            assert await client.hlen(lua.roster("r")) == 1
            # A comes back: its join in flight is refused, not counted.
            assert await join("A", 3) == -1
            assert await client.hlen(lua.roster("r")) == 1
            assert await client.eval(lua.HEARTBEAT, args=["A", 60_000]) == 0
            await client.delete(["garin:reaped:A"])  # paused longer than the tombstone lasts
            assert await client.eval(lua.HEARTBEAT, args=["A", 60_000]) == 0
            assert await register("A", epoch.decode(), "1", "r", "u1") == 0
            assert await client.hlen(lua.roster("r")) == 1
            # Redis restarted empty: B registers its member again, silently.
            await client.flushall()
            assert await register("B", epoch.decode(), "2", "r", "u2") == b"fresh-B"
            assert await client.hgetall(lua.roster("r")) == {b"B:2": b"u2"}
            assert await client.eval(lua.HEARTBEAT, args=["B", 60_000]) == 1
            # Keys flushed under a live link: its heartbeat says so.
            await client.flushall()
            assert await client.eval(lua.HEARTBEAT, args=["B", 60_000]) == 0
            # Every shard process calls REAP every second; it runs once per interval.
            await register("C", "")
            await client.delete([lua.alive("C")])
            assert await client.eval(lua.REAP, args=[60_000]) == 1
            await register("D", "")
            await client.delete([lua.alive("D")])
            assert await client.eval(lua.REAP, args=[60_000]) == 0
            await client.delete(["garin:reaping"])  # the interval is over
            assert await client.eval(lua.REAP, args=[60_000]) == 1

    trio.run(check)


@pytest.mark.cap(60)
def test_tls_and_a_password_file_and_the_password_is_never_shown(people: Clients) -> None:
    tls = RedisServer(tls=True).start()
    try:
        password_file = tls.dir / "password"
        password_file.write_text(tls.password + "\n")
        with contextlib.ExitStack() as stack:
            hosts = Hosts(tls, stack)
            a = hosts.start(shards=1, GARIN_REDIS_PASSWORD_FILE=str(password_file))
            # The other host has the password in its URL.
            b = hosts.start(
                shards=1, GARIN_REDIS_URL=tls.url.replace("rediss://", f"rediss://:{tls.password}@")
            )
            room = new_room("tls")
            alice, bob = new_user("alice"), new_user("bob")
            wa, wb = join_all(people, room, [(alice, a), (bob, b)])
            wa.send(message_frame("over TLS"))
            expect_message(wb, alice, "over TLS")
            help_text = subprocess.run(
                [sys.executable, "-m", "garin", "run", "--help"], env=b.env(), capture_output=True, text=True,
                timeout=30,
            ).stdout
            assert "--redis-url" in help_text and tls.password not in help_text
            for host in (a, b):
                log = host.log_path.read_text(errors="replace")
                assert "Redis link up" in log and tls.password not in log
    finally:
        tls.cleanup()


@pytest.mark.cap(60)
def test_a_redis_on_a_unix_socket(people: Clients) -> None:
    local = RedisServer(unix=True).start()
    try:
        with contextlib.ExitStack() as stack:
            hosts = Hosts(local, stack)
            a, b = hosts.start(shards=1), hosts.start(shards=1)
            alice, bob = new_user("alice"), new_user("bob")
            wa, wb = join_all(people, new_room("unix"), [(alice, a), (bob, b)])
            wb.send(message_frame("over a Unix socket"))
            expect_message(wa, bob, "over a Unix socket")
    finally:
        local.cleanup()


def test_a_bad_redis_url_is_one_line_without_the_url() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GARIN_")}
    env.update(JWT_DECODE_SECRET="x" * 40, ALLOWED_ORIGINS="http://a.test", GARIN_REDIS_URL="http://u:hunter22@h/")
    result = subprocess.run(
        [sys.executable, "-m", "garin", "run"], env=env, capture_output=True, text=True, timeout=30,
        cwd=tempfile.gettempdir(),
    )
    assert result.returncode == 2
    assert "GARIN_REDIS_URL must start with redis://, rediss:// or unix://" in result.stderr
    assert "hunter22" not in result.stderr + result.stdout


def test_a_redis_that_may_evict_keys_is_warned_about(redis: RedisServer, hosts: Hosts) -> None:
    redis.command("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    a = hosts.start(shards=1)
    assert "Redis's maxmemory-policy is volatile-lru: it may evict a live host's heartbeat" in a.log_path.read_text()
    redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    b = hosts.start(shards=1)
    assert "maxmemory-policy" not in b.log_path.read_text()


@pytest.mark.cap(60)
def test_a_redis_cluster_node_is_refused_with_one_line() -> None:
    """garin does not support Redis Cluster (README): `garin run` against a
    Cluster node stops with a line saying so, instead of retrying forever."""
    node = RedisServer(cluster=True).start()
    try:
        server = GarinServer(env_overrides={"GARIN_REDIS_URL": node.url}, shards=1)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "garin", "run", "--shards", "1"], env=server.env(), cwd=server.workdir,
                capture_output=True, text=True, timeout=45,
            )
        finally:
            shutil.rmtree(server.workdir, ignore_errors=True)
        assert result.returncode == 1, result.stderr
        assert (
            "garin: error: shard 0: GARIN_REDIS_URL names a Redis Cluster node; garin needs one Redis"
            in result.stderr
        ), result.stderr
        assert "Traceback" not in result.stderr
    finally:
        node.cleanup()


@pytest.mark.cap(60)
def test_a_shard_paused_past_the_bound_closes_its_members_instead_of_splitting(hosts: Hosts, people: Clients) -> None:
    a, b = hosts.start(shards=1), hosts.start(shards=1)
    room = new_room("pause")
    alice, bob = new_user("alice"), new_user("bob")
    wa, wb = join_all(people, room, [(alice, a), (bob, b)])
    shard = shard_pid(b)
    with paused(shard):
        expect_userleave(wa, bob, 1)  # alice hears bob reaped
    # Back, the paused shard learns it was taken for dead: bob must reconnect.
    expect_close(wb, 1013, "room unavailable", timeout=10)
    bob2 = new_user("bob")
    join_after_unavailable(people, bob2, room, total=2, server=b)
    expect_join(wa, bob2, 2)


def join_after_unavailable(people: Clients, username: str, room: str, total: int, server: GarinServer) -> None:
    """Join as a client does that tries again after 1013 (try again later):
    a shard back from a long pause may still be making its Redis link again
    (backoff) when the first join comes, and hold it past the hold timeout
    on a busy machine."""
    deadline = time.monotonic() + 20
    while True:
        ws = people.authed(username, server=server)
        ws.send(join_frame(username, room))
        try:
            got = json.loads(ws.recv(timeout=10))
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != 1013 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        assert got == {"type": "join", "username": username, "totalUsers": total}
        return

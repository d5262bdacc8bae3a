"""garin behind a real nginx that ends TLS: the README's nginx example, run.

The server block is read from the README's ```nginx code block and changed
only where a test must (its port, a self-signed certificate made here with
`openssl`, garin's port), so the README's example is a tested config. nginx
runs in the foreground as the current user, with its pid file, logs and
temporary files in the test's directory, and is stopped by its PID. Clients
are real wss:// clients (websockets, and `garin chat` on trio-websocket)
trusting that certificate, each from its own loopback address (127.0.0.5,
...), so that the address nginx forwards differs from nginx's own 127.0.0.1.

Skipped with a reason when nginx or openssl is missing (.ci/run installs
Debian's nginx).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ALLOWED_ORIGIN,
    GarinServer,
    auth_frame,
    expect_close,
    expect_join,
    expect_message,
    free_port,
    join_frame,
    message_frame,
    new_room,
    new_user,
    running_server,
)
from test_chat_cli import Chat, talk_and_quit
from websockets.sync.client import ClientConnection, connect

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("hard_cap")]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 10.0
# What the README's block says, and what each becomes here.
README_LISTEN = "listen 443 ssl;"
README_CERT = "/etc/letsencrypt/live/chat.example.com/fullchain.pem"
README_KEY = "/etc/letsencrypt/live/chat.example.com/privkey.pem"
README_UPSTREAM = "proxy_pass http://127.0.0.1:8080;"
PAGE_ORIGIN = "https://chat.example.com"


def nginx_binary() -> str | None:
    # Debian puts it in /usr/sbin, which a non-root PATH may lack.
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def readme_nginx_block() -> str:
    blocks = re.findall(r"^```nginx\n(.*?)^```$", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "the README should have exactly one ```nginx block"
    return str(blocks[0])


def server_block(nginx_port: int, cert: Path, key: Path, garin_port: int) -> str:
    """The README's block with the test's port, certificate and upstream:
    each README line must be there exactly once, so a changed example
    fails here instead of going untested."""
    block = readme_nginx_block()
    for old, new in (
        (README_LISTEN, f"listen 127.0.0.1:{nginx_port} ssl;"),
        (README_CERT, str(cert)),
        (README_KEY, str(key)),
        (README_UPSTREAM, f"proxy_pass http://127.0.0.1:{garin_port};"),
    ):
        assert block.count(old) == 1, f"README's nginx block no longer says {old!r}"
        block = block.replace(old, new)
    return block


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


class Nginx:
    """One nginx in the foreground (`daemon off`), its files under `directory`."""

    def __init__(self, binary: str, directory: Path, garin: GarinServer) -> None:
        self.directory = directory
        self.cert, self.key = make_certificate(directory)
        self.port = free_port()
        self.error_log = directory / "error.log"
        # A worker runs as the `user` directive's user only under root; name
        # ourselves so that it can read what we wrote.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {kind}_temp_path {directory / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (directory / "nginx.conf").write_text(
            f"""{user}
daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {self.error_log} info;
events {{ worker_connections 256; }}
http {{
    access_log {directory / "access.log"};
{temp}
{server_block(self.port, self.cert, self.key, garin.port)}
}}
"""
        )
        self.process = subprocess.Popen(
            [binary, "-e", str(self.error_log), "-p", f"{directory}/", "-c", str(directory / "nginx.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx not listening within {START_TIMEOUT_S} s:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        """SIGTERM (a graceful SIGQUIT would wait for open WebSockets), by PID."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"

    def connect(self, source: str, origin: str = PAGE_ORIGIN, **kw: Any) -> ClientConnection:
        """A wss:// client from loopback address `source`, trusting our certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        return connect(
            self.url, ssl=context, origin=origin, source_address=(source, 0),
            open_timeout=5, close_timeout=3, ping_interval=None, proxy=None, compression=None, max_queue=None, **kw,
        )


@pytest.fixture
def behind_nginx(tmp_path: Path) -> Iterator[Callable[..., tuple[GarinServer, Nginx]]]:
    """Start a garin (settings as keyword arguments) and the README's nginx in front of it."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx; .ci/run installs it)")
    with contextlib.ExitStack() as stack:

        def start(**env: str) -> tuple[GarinServer, Nginx]:
            server = stack.enter_context(running_server(ALLOWED_ORIGINS=f"{ALLOWED_ORIGIN},{PAGE_ORIGIN}", **env))
            directory = tmp_path / f"nginx-{server.port}"
            directory.mkdir()
            proxy = Nginx(binary, directory, server)
            stack.callback(proxy.stop)
            return server, proxy

        yield start


def joined(server: GarinServer, ws: ClientConnection, username: str, room: str, total: int) -> ClientConnection:
    ws.send(auth_frame(server.token(username)))
    ws.send(join_frame(username, room))
    expect_join(ws, username, total)
    return ws


def logged(server: GarinServer, pattern: str, timeout: float = 5.0) -> list[str]:
    """Lines of the server's log matching `pattern`, once there are some."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log_path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def settle(server: GarinServer) -> None:
    """The start-up probes connected straight from 127.0.0.1, nginx's own
    address: let the routers hear that they ended before counting it."""
    time.sleep(0.5)


def test_readme_example_is_the_config_run_here() -> None:
    block = server_block(4443, Path("/c.pem"), Path("/k.pem"), 9999)
    assert block == readme_nginx_block().replace("listen 443 ssl;", "listen 127.0.0.1:4443 ssl;").replace(
        README_CERT, "/c.pem").replace(README_KEY, "/k.pem").replace("127.0.0.1:8080;", "127.0.0.1:9999;")
    for needed in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                   'proxy_set_header Connection "upgrade";',
                   "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"):
        assert needed in block


def test_through_a_trusted_nginx_chat_works_and_limits_and_logs_name_the_real_client(behind_nginx) -> None:
    """nginx on 127.0.0.1 is trusted by default (GARIN_FORWARDED_ALLOW_IPS):
    the per-address limit (2 here) counts 127.0.0.5 and 127.0.0.6 apart,
    though both come through the proxy, and the log names them."""
    server, proxy = behind_nginx(GARIN_MAX_CONNECTIONS_PER_IP="2")
    room = new_room("tls")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    with contextlib.ExitStack() as stack:
        a = joined(server, stack.enter_context(proxy.connect("127.0.0.5")), alice, room, 1)
        b = joined(server, stack.enter_context(proxy.connect("127.0.0.5")), bob, room, 2)
        expect_join(a, bob, 2)
        b.send(message_frame("over TLS, through nginx"))
        expect_message(a, bob, "over TLS, through nginx")
        # A third connection from 127.0.0.5 is over its limit ...
        expect_close(stack.enter_context(proxy.connect("127.0.0.5")), 1013, "too many connections")
        # ... and another client of the same proxy is not.
        joined(server, stack.enter_context(proxy.connect("127.0.0.6")), carol, room, 3)
        for ws in (a, b):
            expect_join(ws, carol, 3)
        a.send(message_frame(""))
        expect_close(a, 1000, "bye")
    refused = logged(server, r"\(127\.0\.0\.5 via 127\.0\.0\.1\): closing 1013 too many connections")
    assert len(refused) == 1, server.log_tail()
    assert logged(server, r"\(127\.0\.0\.5:\d+ via 127\.0\.0\.1\): closing 1000 bye"), server.log_tail()
    assert not logged(server, r"\(127\.0\.0\.1:\d+\): closing", timeout=0), server.log_tail()


def test_through_an_untrusted_nginx_every_client_is_the_proxy(behind_nginx) -> None:
    """With nginx's address not in GARIN_FORWARDED_ALLOW_IPS its
    X-Forwarded-For is ignored: every client counts and logs as 127.0.0.1."""
    server, proxy = behind_nginx(GARIN_MAX_CONNECTIONS_PER_IP="2", GARIN_FORWARDED_ALLOW_IPS="192.0.2.1")
    settle(server)
    room = new_room("tls")
    dave, erin = new_user("dave"), new_user("erin")
    with contextlib.ExitStack() as stack:
        d = joined(server, stack.enter_context(proxy.connect("127.0.0.5")), dave, room, 1)
        e = joined(server, stack.enter_context(proxy.connect("127.0.0.6")), erin, room, 2)
        expect_join(d, erin, 2)
        # A third client, from yet another address: over the proxy's limit.
        expect_close(stack.enter_context(proxy.connect("127.0.0.7")), 1013, "too many connections")
        e.send(message_frame(""))
        expect_close(e, 1000, "bye")
    assert logged(server, r"conn - \(127\.0\.0\.1:\d+\): closing 1013 too many connections"), server.log_tail()
    assert logged(server, r"\(127\.0\.0\.1:\d+\): closing 1000 bye"), server.log_tail()
    assert not logged(server, r"127\.0\.0\.[567]", timeout=0), server.log_tail()


def test_garin_chat_over_wss_through_nginx(behind_nginx) -> None:
    """`garin chat wss://...` (trio-websocket, the system's CA list, here
    SSL_CERT_FILE) chats with a browser-style client through the proxy."""
    server, proxy = behind_nginx()
    room = new_room("tls")
    with proxy.connect("127.0.0.5") as web:
        joined(server, web, "webuser", room, 1)
        chat = Chat(server, room, "termuser", url=proxy.url, SSL_CERT_FILE=str(proxy.cert))
        try:
            chat.expect(f"# connected to {proxy.url} as termuser in {room}")
            talk_and_quit(chat, web)
        finally:
            chat.finish()

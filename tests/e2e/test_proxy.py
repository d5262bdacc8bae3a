"""garin behind a real nginx or Caddy that ends TLS: the README's examples, run.

Each proxy's config is read from the README's code block (```nginx,
```caddyfile) and changed only where a test must (where it listens, a
self-signed certificate made here with `openssl`, garin's port), so the
README's examples are tested configs. The proxy runs in the foreground as
the current user, with its files (nginx's pid file, logs and temporary
files; Caddy's data and config directories, through HOME and XDG_*) in the
test's directory, and is stopped by its PID. Clients are real wss://
clients (websockets, and `garin chat` on trio-websocket) trusting that
certificate, each from its own loopback address (127.0.0.5, ...), so that
the address the proxy forwards differs from the proxy's own 127.0.0.1.
They ask for https://chat.example.com (its TLS name and Host), connected to
127.0.0.1: Caddy serves only the site it names.

Skipped with a reason when nginx, caddy or openssl is missing (.ci/run
installs Debian's).
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
from collections.abc import Callable, Iterator, Sequence
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
STOP_TIMEOUT_S = 10.0
PAGE_HOST = "chat.example.com"
PAGE_ORIGIN = f"https://{PAGE_HOST}"
# What the README's nginx block says, and what each becomes here.
README_LISTEN = "listen 443 ssl;"
README_CERT = "/etc/letsencrypt/live/chat.example.com/fullchain.pem"
README_KEY = "/etc/letsencrypt/live/chat.example.com/privkey.pem"
README_UPSTREAM = "proxy_pass http://127.0.0.1:8080;"
# ... and its Caddy block.
README_SITE = "chat.example.com {"
README_REVERSE_PROXY = "reverse_proxy 127.0.0.1:8080"


def system_binary(name: str) -> str | None:
    # Debian puts some in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def readme_block(tag: str) -> str:
    blocks = re.findall(rf"^```{tag}\n(.*?)^```$", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"the README should have exactly one ```{tag} block"
    return str(blocks[0])


def readme_block_changed(tag: str, changes: Sequence[tuple[str, str]]) -> str:
    """The README's ```tag block with each (old, new) of `changes` made:
    each old README line must be there exactly once, so a changed example
    fails here instead of going untested."""
    block = readme_block(tag)
    for old, new in changes:
        assert block.count(old) == 1, f"README's {tag} block no longer says {old!r}"
        block = block.replace(old, new)
    return block


def server_block(nginx_port: int, cert: Path, key: Path, garin_port: int) -> str:
    """The README's nginx block with the test's port, certificate and upstream."""
    return readme_block_changed("nginx", (
        (README_LISTEN, f"listen 127.0.0.1:{nginx_port} ssl;"),
        (README_CERT, str(cert)),
        (README_KEY, str(key)),
        (README_UPSTREAM, f"proxy_pass http://127.0.0.1:{garin_port};"),
    ))


def site_block(caddy_port: int, cert: Path, key: Path, garin_port: int) -> str:
    """The README's Caddy site on 127.0.0.1 and the test's port, with its
    certificate (no ACME, no network) and upstream."""
    return readme_block_changed("caddyfile", (
        (README_SITE, f"https://{PAGE_HOST}:{caddy_port} {{\n    bind 127.0.0.1\n    tls {cert} {key}"),
        (README_REVERSE_PROXY, f"reverse_proxy 127.0.0.1:{garin_port}"),
    ))


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = system_binary("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={PAGE_HOST}",
         "-addext", f"subjectAltName=DNS:{PAGE_HOST},IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


class Proxy:
    """One proxy in the foreground in front of `garin`, its files under
    `directory`; a subclass writes its config and says how to run it."""

    name = ""

    def __init__(self, binary: str, directory: Path, garin: GarinServer) -> None:
        self.directory = directory
        self.cert, self.key = make_certificate(directory)
        self.port = free_port()
        self.log_path = directory / f"{self.name}.log"
        command, env = self.configure(binary, garin)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def configure(self, binary: str, garin: GarinServer) -> tuple[list[str], dict[str, str] | None]:
        """Write the config; the command line and environment (None: ours)."""
        raise NotImplementedError

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not listening within {START_TIMEOUT_S} s:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (nginx's graceful SIGQUIT would wait for open WebSockets), by PID."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def connect(self, source: str, origin: str = PAGE_ORIGIN, **kw: Any) -> ClientConnection:
        """A wss:// client of chat.example.com (its TLS name and Host) from
        loopback address `source` to our 127.0.0.1, trusting our certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
        try:
            return connect(
                f"wss://{PAGE_HOST}:{self.port}/", sock=sock, ssl=context, origin=origin, open_timeout=5,
                close_timeout=3, ping_interval=None, proxy=None, compression=None, max_queue=None, **kw,
            )
        except BaseException:
            sock.close()
            raise


class Nginx(Proxy):
    name = "nginx"

    def configure(self, binary: str, garin: GarinServer) -> tuple[list[str], dict[str, str] | None]:
        # A worker runs as the `user` directive's user only under root; name
        # ourselves so that it can read what we wrote.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {kind}_temp_path {self.directory / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = self.directory / "nginx.conf"
        config.write_text(
            f"""{user}
daemon off;
worker_processes 1;
pid {self.directory / "nginx.pid"};
error_log {self.log_path} info;
events {{ worker_connections 256; }}
http {{
    access_log {self.directory / "access.log"};
{temp}
{server_block(self.port, self.cert, self.key, garin.port)}
}}
"""
        )
        return [binary, "-e", str(self.log_path), "-p", f"{self.directory}/", "-c", str(config)], None

    @property
    def url(self) -> str:
        """For clients that cannot resolve chat.example.com: nginx's only
        server answers any name (Caddy's site answers only its own)."""
        return f"wss://127.0.0.1:{self.port}/"


class Caddy(Proxy):
    name = "caddy"

    def configure(self, binary: str, garin: GarinServer) -> tuple[list[str], dict[str, str] | None]:
        # Global options, the test's own: no admin endpoint (localhost:2019,
        # one per host), no HTTP->HTTPS redirect (port 80), no HTTP/3 (a UDP
        # port that free_port did not check; WebSockets use HTTP/1.1), and
        # hands off the system's trust store (Caddy's local CA, unused here).
        config = self.directory / "Caddyfile"
        config.write_text(
            f"""{{
    admin off
    auto_https disable_redirects
    servers {{
        protocols h1 h2
    }}
    skip_install_trust
}}

{site_block(self.port, self.cert, self.key, garin.port)}"""
        )
        # Caddy keeps its data (certificates, its CA) and an autosave of the
        # config under these: here, not in the user's home.
        home = {name: str(self.directory / name.lower()) for name in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")}
        return [binary, "run", "--config", str(config), "--adapter", "caddyfile"], {**os.environ, **home}


PROXIES: dict[str, type[Proxy]] = {"nginx": Nginx, "caddy": Caddy}


@pytest.fixture(params=sorted(PROXIES))
def behind_proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., tuple[GarinServer, Proxy]]]:
    """Start a garin (settings as keyword arguments) and the README's nginx
    or Caddy (the parameter) in front of it."""
    name = request.param
    binary = system_binary(name)
    if binary is None:
        pytest.skip(f"{name} is not installed (Debian package {name}; .ci/run installs it)")
    with contextlib.ExitStack() as stack:

        def start(**env: str) -> tuple[GarinServer, Proxy]:
            server = stack.enter_context(running_server(ALLOWED_ORIGINS=f"{ALLOWED_ORIGIN},{PAGE_ORIGIN}", **env))
            directory = tmp_path / f"{name}-{server.port}"
            directory.mkdir()
            proxy = PROXIES[name](binary, directory, server)
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
    """The start-up probes connected straight from 127.0.0.1, the proxy's
    own address: let the routers hear that they ended before counting it."""
    time.sleep(0.5)


def test_readme_nginx_example_is_the_config_run_here() -> None:
    block = server_block(4443, Path("/c.pem"), Path("/k.pem"), 9999)
    assert block == readme_block("nginx").replace("listen 443 ssl;", "listen 127.0.0.1:4443 ssl;").replace(
        README_CERT, "/c.pem").replace(README_KEY, "/k.pem").replace("127.0.0.1:8080;", "127.0.0.1:9999;")
    for needed in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                   'proxy_set_header Connection "upgrade";',
                   "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"):
        assert needed in block


def test_readme_caddy_example_is_the_config_run_here() -> None:
    block = site_block(4443, Path("/c.pem"), Path("/k.pem"), 9999)
    assert block == readme_block("caddyfile").replace(
        "chat.example.com {", "https://chat.example.com:4443 {\n    bind 127.0.0.1\n    tls /c.pem /k.pem").replace(
        "127.0.0.1:8080", "127.0.0.1:9999")
    assert block.startswith("https://chat.example.com:4443 {\n"), block
    assert "reverse_proxy 127.0.0.1:9999" in block


def test_through_a_trusted_proxy_chat_works_and_limits_and_logs_name_the_real_client(behind_proxy) -> None:
    """nginx or Caddy on 127.0.0.1 is trusted by default
    (GARIN_FORWARDED_ALLOW_IPS): the per-address limit (2 here) counts
    127.0.0.5 and 127.0.0.6 apart, though both come through the proxy, and
    the log names them, not an address a client claims for itself."""
    server, proxy = behind_proxy(GARIN_MAX_CONNECTIONS_PER_IP="2")
    room = new_room("tls")
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    with contextlib.ExitStack() as stack:
        spoofing = proxy.connect("127.0.0.5", additional_headers={"X-Forwarded-For": "203.0.113.9"})
        a = joined(server, stack.enter_context(spoofing), alice, room, 1)
        b = joined(server, stack.enter_context(proxy.connect("127.0.0.5")), bob, room, 2)
        expect_join(a, bob, 2)
        b.send(message_frame(f"over TLS, through {proxy.name}"))
        expect_message(a, bob, f"over TLS, through {proxy.name}")
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
    assert not logged(server, r"203\.0\.113\.9", timeout=0), server.log_tail()


def test_through_an_untrusted_proxy_every_client_is_the_proxy(behind_proxy) -> None:
    """With the proxy's address not in GARIN_FORWARDED_ALLOW_IPS its
    X-Forwarded-For is ignored: every client counts and logs as 127.0.0.1."""
    server, proxy = behind_proxy(GARIN_MAX_CONNECTIONS_PER_IP="2", GARIN_FORWARDED_ALLOW_IPS="192.0.2.1")
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


# Through nginx only: Caddy's site answers only chat.example.com, which
# garin chat would have to resolve (the websockets clients above connect
# to 127.0.0.1 and name it themselves).
@pytest.mark.parametrize("behind_proxy", ["nginx"], indirect=True)
def test_garin_chat_says_at_once_that_a_self_signed_certificate_is_not_trusted(behind_proxy) -> None:
    """trio-websocket turns a failed certificate check into a 10 s connect
    timeout ("no answer within 10 s"); garin chat checks the TLS handshake
    first and names the cause and the way around it."""
    server, proxy = behind_proxy()
    assert isinstance(proxy, Nginx)
    started = time.monotonic()
    chat = Chat(server, new_room("tls"), "termuser", url=proxy.url, SSL_CERT_FILE="/nonexistent.pem")
    try:
        chat.expect("certificate is not trusted", timeout=8)
        assert chat.proc.wait(timeout=5) == 1
        assert time.monotonic() - started < 8
        assert "SSL_CERT_FILE" in chat.seen[-1]
    finally:
        chat.finish()


@pytest.mark.parametrize("behind_proxy", ["nginx"], indirect=True)
def test_garin_chat_over_wss_through_nginx(behind_proxy) -> None:
    """`garin chat wss://...` (trio-websocket, the system's CA list, here
    SSL_CERT_FILE) chats with a browser-style client through the proxy."""
    server, proxy = behind_proxy()
    assert isinstance(proxy, Nginx)
    room = new_room("tls")
    with proxy.connect("127.0.0.5") as web:
        joined(server, web, "webuser", room, 1)
        chat = Chat(server, room, "termuser", url=proxy.url, SSL_CERT_FILE=str(proxy.cert))
        try:
            chat.expect(f"# connected to {proxy.url} as termuser in {room}")
            talk_and_quit(chat, web)
        finally:
            chat.finish()

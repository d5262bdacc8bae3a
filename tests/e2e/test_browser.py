"""The demo chat page (scripts/demo) in headless Chromium against a real garin.

The page is served by a Python http.server on 127.0.0.1 (a thread, free port),
and garin allows that origin (plus the fixtures' own probe origin). Chromium is Debian's (`apt-get install
chromium`), driven by Playwright's sync API; `playwright install` is never
needed. Without /usr/bin/chromium or the playwright package the tests skip.

GARIN_DEMO_SCREENSHOT=/tmp/demo.png saves a screenshot of the page mid-chat
(how docs/demo.png was made).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ALLOWED_ORIGIN, SHARED_ENV, GarinServer, ServerFactory, bad_token, running_server

from garin.auth import make_token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DEMO_DIR = Path(__file__).resolve().parents[2] / "scripts" / "demo"
TIMEOUT_MS = 10_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
    ),
    pytest.mark.usefixtures("hard_cap"),
    pytest.mark.cap(90),
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)


# -- the static site ---------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_demo() -> Iterator[str]:
    """scripts/demo over HTTP on 127.0.0.1, a free port; yields the origin."""
    handler = functools.partial(_QuietHandler, directory=str(DEMO_DIR))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with serve_demo() as origin:
        yield origin


def origins(site: str) -> str:
    """ALLOWED_ORIGINS for a garin the page talks to (the fixtures' readiness probe uses ALLOWED_ORIGIN)."""
    return f"{ALLOWED_ORIGIN},{site}"


@pytest.fixture(scope="module")
def server(site: str) -> Iterator[GarinServer]:
    """garin allowing the page's origin; rate limit off (SHARED_ENV)."""
    with running_server(**SHARED_ENV, ALLOWED_ORIGINS=origins(site)) as garin:
        yield garin


# -- the browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class ChatPage:
    """One browser user on the demo page, driven by its documented element ids."""

    page: Any
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def connect(self, url: str, token: str, username: str, room: str) -> None:
        self.page.fill("#server-url", url)
        self.page.fill("#token", token)
        self.page.fill("#username", username)
        self.page.fill("#room", room)
        self.page.click("#connect")

    def join(self, url: str, token: str, username: str, room: str, total: int) -> None:
        self.connect(url, token, username, room)
        expect(self.page.locator("#status")).to_have_attribute("data-state", "joined")
        expect(self.page.locator("#status")).to_have_text(f"connected as {username} in {room}")
        self.expect_count(total)
        expect(self.page.locator("#message")).to_be_focused()

    def type_and_enter(self, text: str) -> None:
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")
        expect(self.page.locator("#message")).to_have_value("")

    def entries(self, kind: str) -> Any:
        return self.page.locator(f'#log li[data-kind="{kind}"]')

    def expect_message(self, who: str, body: str, kind: str = "message") -> None:
        entry = self.entries(kind).filter(has_text=body).last
        expect(entry.locator(".who")).to_have_text(who)
        expect(entry.locator(".body")).to_have_text(body)

    def expect_count(self, total: int) -> None:
        expect(self.page.locator("#user-count")).to_have_text(str(total))

    def expect_closed(self, text: str, code: int, reason: str) -> None:
        status = self.page.locator("#status")
        expect(status).to_have_attribute("data-state", "closed")
        expect(status).to_have_text(text)
        expect(status).to_have_attribute("data-close-code", str(code))
        expect(status).to_have_attribute("data-close-reason", reason)
        expect(self.page.locator("#connect")).to_be_enabled()
        expect(self.page.locator("#message")).to_be_disabled()


@pytest.fixture
def open_page(browser: Any, site: str) -> Iterator[Callable[..., ChatPage]]:
    """Open the demo page in a fresh browser context (its own user); closed at teardown."""
    contexts: list[Any] = []

    def open_(origin: str = site) -> ChatPage:
        context = browser.new_context(viewport={"width": 900, "height": 600}, locale="en-GB")
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        chat = ChatPage(context.new_page())
        chat.page.on("request", lambda request: chat.requests.append(request.url))
        chat.page.on("pageerror", lambda error: chat.problems.append(f"page error: {error}"))
        chat.page.on(
            "console",
            lambda message: chat.problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning")
            else None,
        )
        chat.page.goto(f"{origin}/")
        expect(chat.page.locator("#status")).to_have_attribute("data-state", "idle")
        return chat

    yield open_
    for context in contexts:
        context.close()


def re_text(text: str) -> re.Pattern[str]:
    """Matches a log entry whose text ends with `text` (entries start with a time)."""
    return re.compile(re.escape(text) + "$")


def room_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# -- tests -----------------------------------------------------------------------


def test_two_users_chat_and_another_room_hears_nothing(
    server: GarinServer, site: str, open_page: Callable[..., ChatPage]
) -> None:
    lobby, elsewhere = room_name("lobby"), room_name("elsewhere")
    alice, bob, carol = open_page(), open_page(), open_page()

    alice.join(server.url, server.token("alice"), "alice", lobby, total=1)
    bob.join(server.url, server.token("bob"), "bob", lobby, total=2)
    carol.join(server.url, server.token("carol"), "carol", elsewhere, total=1)
    alice.expect_count(2)
    expect(alice.entries("join")).to_have_text(
        [re_text("alice joined (1 here)"), re_text("bob joined (2 here)")]
    )
    expect(bob.entries("join")).to_have_text([re_text("bob joined (2 here)")])

    # Enter sends; markup in a message is shown as text, never parsed.
    hello = "hi bob! <b>tags</b> & <img src=x onerror=alert(1)> stay plain text"
    alice.type_and_enter(hello)
    alice.expect_message("alice", hello, kind="own")
    bob.expect_message("alice", hello)
    assert bob.page.locator("#log b, #log img").count() == 0

    # The Send button sends too.
    bob.page.fill("#message", "hello alice ✓")
    bob.page.click("#send")
    bob.expect_message("bob", "hello alice ✓", kind="own")
    alice.expect_message("bob", "hello alice ✓")

    if screenshot := os.environ.get("GARIN_DEMO_SCREENSHOT"):
        alice.page.screenshot(path=screenshot, full_page=True)

    # Leave: the server says goodbye, the others see the count drop.
    bob.page.click("#leave")
    bob.expect_closed("closed by server: 1000 bye", 1000, "bye")
    expect(alice.entries("leave")).to_have_text([re_text("bob left (1 here)")])
    alice.expect_count(1)
    expect(alice.page.locator("#status")).to_have_attribute("data-state", "joined")

    # carol, in another room, saw only herself: no message, no join or leave of theirs.
    time.sleep(0.3)  # let anything misrouted land
    expect(carol.entries("join")).to_have_text([re_text("carol joined (1 here)")])
    assert carol.entries("message").count() == 0
    assert carol.entries("leave").count() == 0
    carol.expect_count(1)
    assert "alice" not in carol.page.locator("#log").inner_text()

    # Nothing but the page's own files and the WebSocket; no errors on any page.
    for chat in (alice, bob, carol):
        outside = [u for u in chat.requests if not (u.startswith(site + "/") or u == server.url)]
        assert outside == [], outside
        assert chat.problems == [], chat.problems


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: bad_token("not-the-server-secret-0123456789abcdef", "mallory"), "invalid token"),
        (lambda s: make_token(s.secret, "mallory", time.time() - 120, 60), "token expired"),
    ],
    ids=["invalid", "expired"],
)
def test_a_refused_token_shows_code_and_reason_and_retry_works(
    server: GarinServer, open_page: Callable[..., ChatPage], make: Callable[[GarinServer], str], reason: str
) -> None:
    chat = open_page()
    room = room_name("lobby")
    chat.connect(server.url, make(server), "mallory", room)
    chat.expect_closed(f"closed by server: 1008 {reason}", 1008, reason)
    expect(chat.entries("error").last).to_contain_text(f"closed by server: 1008 {reason}")
    expect(chat.page.locator("#connect")).to_be_focused()

    # The form is usable again: a good token gets in.
    chat.join(server.url, server.token("mallory"), "mallory", room, total=1)


def test_rate_limit_close_is_shown(
    garin_factory: ServerFactory, site: str, open_page: Callable[..., ChatPage]
) -> None:
    limited = garin_factory(
        ALLOWED_ORIGINS=origins(site), GARIN_RATE_LIMIT_COUNT="1", GARIN_RATE_LIMIT_WINDOW="10"
    )
    room = room_name("lobby")
    talker, listener = open_page(), open_page()
    listener.join(limited.url, limited.token("listener"), "listener", room, total=1)
    talker.join(limited.url, limited.token("talker"), "talker", room, total=2)
    talker.type_and_enter("one")
    listener.expect_message("talker", "one")
    talker.type_and_enter("two")
    talker.expect_closed("closed by server: 1008 rate limit exceeded", 1008, "rate limit exceeded")
    expect(listener.entries("leave")).to_have_text([re_text("talker left (1 here)")])


def test_a_page_from_another_origin_is_told_why_it_cannot_connect(
    server: GarinServer, open_page: Callable[..., ChatPage]
) -> None:
    with serve_demo() as other_origin:  # same files, a port garin does not allow
        chat = open_page(other_origin)
        chat.connect(server.url, server.token("visitor"), "visitor", room_name("lobby"))
        status = chat.page.locator("#status")
        expect(status).to_have_attribute("data-state", "closed")
        expect(status).to_have_attribute("data-close-code", "1006")
        expect(status).to_contain_text(f"could not connect to {server.url}")
        expect(status).to_contain_text(f"({other_origin}) in ALLOWED_ORIGINS")


def test_the_username_defaults_to_the_token_name(
    server: GarinServer, open_page: Callable[..., ChatPage]
) -> None:
    chat = open_page()
    expect(chat.page.locator("#server-url")).to_have_value("ws://127.0.0.1:8080/")
    chat.page.fill("#server-url", server.url)
    chat.page.fill("#token", server.token("dora"))
    expect(chat.page.locator("#username")).to_have_value("dora")
    chat.page.fill("#room", room_name("lobby"))
    chat.page.press("#room", "Enter")
    expect(chat.page.locator("#status")).to_have_attribute("data-state", "joined")
    expect(chat.entries("join")).to_have_text([re_text("dora joined (1 here)")])

"""`garin chat`: a terminal client for trying and debugging a deployment.

It speaks the same protocol as any GarinChat frontend (auth, join, message,
userleave) through trio-websocket, so it exercises a server exactly as a
browser would, Origin header included. Lines typed are sent as messages;
`/leave` leaves the room, `/join ROOM` joins another (leaving the one we are
in first), `/quit` (or Ctrl-D) sends an empty message, which leaves and
closes. The typed commands (`ChatInput`), how events are shown (`describe`)
and why a connection failed (`connect_error`, `refused_handshake`) are pure
functions; `chat` only moves their frames and lines.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import TextIO

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

CONNECT_TIMEOUT_S = 10.0


# Shown escaped: C0/C1 controls (newlines, ESC and so terminal escape
# sequences), format characters (bidi overrides, zero-width spaces: text that
# reads differently than it is), line and paragraph separators, surrogates.
_HIDDEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# A username with one of these is shown quoted, so that it cannot pass for
# the end of another name (`<alice> hi`) or a line of garin's own.
_NAME_BREAKERS = frozenset('<>"')


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) not in _HIDDEN:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` on one line with nothing hidden: control and format characters,
    and backslash itself, written as escapes (`\\x1b`, `\\n`, `\\u202e`, `\\\\`)."""
    return "".join(map(_escape, text))


def _name(value: object) -> str:
    if not isinstance(value, str):
        return _count(value)
    shown = visible(value)
    if not shown or any(c.isspace() or c in _NAME_BREAKERS for c in shown):
        return '"' + shown.replace('"', '\\"') + '"'
    return shown


def _count(value: object) -> str:
    # repr writes every non-printable character as an escape (PEP 3138).
    return str(value) if isinstance(value, int) else repr(value)


def describe(text: str) -> str:
    """One human line for a server event.

    What others chose (usernames, bodies) is shown escaped and can neither
    break the line nor start one: garin chat's own lines start with `#` or
    `*`, messages with `<`, anything unexpected with `?`.
    """
    try:
        event = json.loads(text)
    except ValueError:
        return f"? {visible(text)}"
    kind = event.get("type") if isinstance(event, dict) else None
    if kind == "join":
        return f"* {_name(event.get('username'))} joined ({_count(event.get('totalUsers'))} here)"
    if kind == "userleave":
        return f"* {_name(event.get('username'))} left ({_count(event.get('totalUsers'))} here)"
    if kind == "message":
        body = event.get("body")
        return f"<{_name(event.get('username'))}> {visible(body) if isinstance(body, str) else _count(body)}"
    return f"? {visible(text)}"


async def _print_events(ws: WebSocketConnection, out: TextIO) -> None:
    while True:
        message = await ws.get_message()
        print(describe(message if isinstance(message, str) else repr(message)), file=out, flush=True)


@dataclass(frozen=True, slots=True)
class Step:
    """What one typed line does: frames to send, a note to print, whether we are done."""

    frames: tuple[str, ...] = ()
    note: str | None = None
    done: bool = False


def _frame(**fields: str) -> str:
    return json.dumps(fields)


@dataclass(slots=True)
class ChatInput:
    """The typed commands, as a pure object: what each line sends.

    It keeps the one piece of session state the server would otherwise
    close us for: whether we are in a room (a message or /leave outside one
    closes 1008 `not in a room`, a join inside one 1008 `already joined`).
    """

    username: str
    in_room: bool = True

    def line(self, text: str) -> Step:
        if text == "/quit":
            return self.end()
        if text == "/leave":
            if not self.in_room:
                return Step(note="# not in a room; /join ROOM to join one")
            self.in_room = False
            # The server gives a client outside a room GARIN_JOIN_TIMEOUT
            # (2 s by default) to join one before it closes it.
            return Step(
                (_frame(type="userleave"),),
                note="# left the room; /join ROOM soon to join another (the server closes a client "
                "that stays out of every room for its join timeout, 2 s by default)",
            )
        if text == "/join" or text.startswith("/join "):
            room = text.removeprefix("/join").strip()
            if not room:
                return Step(note="# usage: /join ROOM")
            join = _frame(type="join", username=self.username, room=room)
            frames = (_frame(type="userleave"), join) if self.in_room else (join,)
            self.in_room = True
            return Step(frames, note=f"# joining {visible(room)}")
        if not text:
            return Step()
        if not self.in_room:
            return Step(note="# not sent: not in a room; /join ROOM first")
        return Step((_frame(type="message", body=text),))

    def end(self) -> Step:
        """/quit or the end of input: in a room, an empty message leaves it and
        the server closes 1000 bye; outside one, we just close."""
        if self.in_room:
            return Step((_frame(type="message", body=""),), done=True)
        return Step(note="# bye", done=True)


# Where a client reaches a server listening on every address.
_REACHABLE = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def default_url(host: str, port: int) -> str:
    """The server's URL on this machine, from its GARIN_HOST and port: a
    specific address as it is (IPv6 in brackets), a wildcard as loopback."""
    host = _REACHABLE.get(host, host)
    if ":" in host:
        host = "[" + host.replace("%", "%25") + "]"  # fe80::1%eth0: the zone, escaped
    return f"ws://{host}:{port}/"


def url_problem(url: str) -> str | None:
    """Why `url` is no WebSocket URL garin chat can use, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme not in ("ws", "wss"):
        return f"{url!r} is not a WebSocket URL: use ws:// or wss://, e.g. ws://127.0.0.1:{port or 8080}/"
    if not parts.hostname:
        return f"{url!r} names no host, e.g. ws://127.0.0.1:8080/"
    return None


def connect_error(exc: BaseException) -> str:
    """The reason a connection attempt failed, in words (`Connection refused`).

    trio-websocket wraps the OS error in a HandshakeError, and trio wraps the
    errors of every address it tried in a group: find the OS errors inside."""
    if isinstance(exc, ConnectionTimeout):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    reasons: list[str] = []
    seen: set[int] = set()

    def walk(error: BaseException | None) -> None:
        if error is None or id(error) in seen:
            return
        seen.add(id(error))
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        elif isinstance(error, OSError) and error.strerror:
            # trio's strerror names the address too, which the URL already does.
            reason = os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else error.strerror
            if reason not in reasons:
                reasons.append(reason)
            return
        walk(error.__cause__ or error.__context__)

    walk(exc)
    return "; ".join(reasons) or str(exc) or type(exc).__name__


def refused_handshake(exc: ConnectionRejected, origin: str) -> str:
    body = (exc.body or b"").decode("utf-8", errors="replace").strip().splitlines()
    text = f"server refused the handshake: HTTP {exc.status_code}"
    if body:
        text += f" {visible(body[0][:200])}"
    if exc.status_code == 403:
        text += f" (Origin sent: {origin}; --origin sets it, the server's ALLOWED_ORIGINS lists those allowed)"
    return text


async def _send_lines(ws: WebSocketConnection, typed: ChatInput, out: TextIO) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            lines: list[bytes] = []
            if data:
                buffer += data
                *lines, buffer = buffer.split(b"\n")
            steps = [typed.line(raw.decode(errors="replace")) for raw in lines] if data else [typed.end()]
            for step in steps:
                for frame in step.frames:
                    await ws.send_message(frame)
                if step.note is not None:
                    print(step.note, file=out, flush=True)
                if step.done:
                    return


async def _converse(ws: WebSocketConnection, typed: ChatInput, out: TextIO) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_print_events, ws, out)
        await _send_lines(ws, typed, out)
        if not typed.in_room:
            nursery.cancel_scope.cancel()  # nothing to wait for: we close
        # In a room, the server answers the empty message with 1000 bye.


async def tls_problem(url: str) -> str | None:
    """For a wss:// URL: why the server's certificate is not trusted, if it
    is not. trio-websocket reports a failed verification only as a
    connection timeout (python-trio/trio-websocket#199), so a TLS handshake
    alone comes first. Any other failure is left to the real attempt."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "wss" or parts.hostname is None:
        return None
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, parts.port or 443, ssl_context=ssl.create_default_context()
            )
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            return (
                f"the server's TLS certificate is not trusted ({exc.__cause__.verify_message}); for a "
                "self-signed certificate or a private CA, set SSL_CERT_FILE to its PEM file"
            )
    except (OSError, trio.TooSlowError):
        pass
    return None


async def chat(url: str, origin: str, token: str, room: str, username: str, out: TextIO | None = None) -> int:
    """Run until the server closes us or stdin ends; returns a process exit code.
    `url` must pass `url_problem`; lines go to `out` (default: stdout)."""
    out = out or sys.stdout
    headers = [(b"origin", origin.encode())]
    problem = await tls_problem(url)
    if problem is not None:
        print(f"# could not connect to {url}: {problem}", file=out, flush=True)
        return 1
    try:
        async with open_websocket_url(url, extra_headers=headers, connect_timeout=CONNECT_TIMEOUT_S,
                                      disconnect_timeout=2) as ws:
            closed: list[ConnectionClosed] = []
            try:
                # Inside the guard: the server may close us (bad token) before
                # the join is even sent.
                await ws.send_message(_frame(type="auth", body=token))
                await ws.send_message(_frame(type="join", username=username, room=room))
                print(f"# connected to {url} as {username} in {room}; type to chat, /quit to leave",
                      file=out, flush=True)
                await _converse(ws, ChatInput(username), out)
            except* ConnectionClosed as group:
                closed.extend(group.exceptions)  # type: ignore[arg-type]
            if closed:
                reason = closed[0].reason
                code = reason.code if reason is not None else 1006
                text = (reason.reason if reason is not None else None) or ""
                print(f"# closed by server: {code} {visible(text)}".rstrip(), file=out, flush=True)
                return 0 if code == 1000 else 1
    except ConnectionRejected as exc:
        print(f"# {refused_handshake(exc, origin)}", file=out, flush=True)
        return 1
    except DisconnectionTimeout:
        return 0  # we were leaving anyway
    except HandshakeError as exc:
        print(f"# could not connect to {url}: {connect_error(exc)}", file=out, flush=True)
        return 1
    except OSError as exc:
        print(f"# connection to {url} lost: {connect_error(exc)}", file=out, flush=True)
        return 1
    return 0

"""`garin chat`: a terminal client for trying and debugging a deployment.

It speaks the same protocol as any GarinChat frontend (auth, join, message,
userleave) through trio-websocket, so it exercises a server exactly as a
browser would, Origin header included. Lines typed are sent as messages;
`/leave` leaves the room, `/join ROOM` joins another, `/quit` (or Ctrl-D)
sends an empty message, which leaves and closes.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from typing import TextIO

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

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


async def _send_lines(ws: WebSocketConnection, username: str) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                await ws.send_message(json.dumps({"type": "message", "body": ""}))
                return
            buffer += data
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line == "/quit":
                    await ws.send_message(json.dumps({"type": "message", "body": ""}))
                    return
                if line == "/leave":
                    await ws.send_message(json.dumps({"type": "userleave"}))
                elif line.startswith("/join "):
                    room = line.removeprefix("/join ").strip()
                    await ws.send_message(json.dumps({"type": "join", "username": username, "room": room}))
                elif line:
                    await ws.send_message(json.dumps({"type": "message", "body": line}))


async def chat(url: str, origin: str, token: str, room: str, username: str, out: TextIO = sys.stdout) -> int:
    """Run until the server closes us or stdin ends; returns a process exit code."""
    headers = [(b"origin", origin.encode())]
    try:
        async with open_websocket_url(url, extra_headers=headers, connect_timeout=CONNECT_TIMEOUT_S,
                                      disconnect_timeout=2) as ws:
            closed: list[ConnectionClosed] = []
            try:
                # Inside the guard: the server may close us (bad token) before
                # the join is even sent.
                await ws.send_message(json.dumps({"type": "auth", "body": token}))
                await ws.send_message(json.dumps({"type": "join", "username": username, "room": room}))
                print(f"# connected to {url} as {username} in {room}; type to chat, /quit to leave",
                      file=out, flush=True)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_print_events, ws, out)
                    nursery.start_soon(_send_lines, ws, username)
            except* ConnectionClosed as group:
                closed.extend(group.exceptions)  # type: ignore[arg-type]
            if closed:
                reason = closed[0].reason
                code = reason.code if reason is not None else 1006
                text = (reason.reason if reason is not None else None) or ""
                print(f"# closed by server: {code} {visible(text)}".rstrip(), file=out, flush=True)
                return 0 if code == 1000 else 1
    except HandshakeError as exc:
        print(f"# could not connect to {url}: {exc}", file=out, flush=True)
        return 1
    except OSError as exc:
        print(f"# could not connect to {url}: {exc.strerror or exc}", file=out, flush=True)
        return 1
    return 0

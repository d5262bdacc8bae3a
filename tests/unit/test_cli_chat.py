"""`garin chat`'s command line: the default URL follows the configured port,
and every way of failing to start is one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from garin.cli import main

SECRET = "s" * 40


@pytest.fixture(autouse=True)
def elsewhere(no_settings: Path) -> Path:
    """A working directory with no .env, and no settings from the caller's environment."""
    return no_settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["chat", "--room", "lobby", "--user", "alice", *args], env=env)


def test_help_shows_the_default_url() -> None:
    result = CliRunner().invoke(main, ["chat", "--help"], terminal_width=200)
    assert "ws://HOST:PORT/" in result.output and "GARIN_PORT" in result.output
    assert "GARIN_HOST (127.0.0.1 for 0.0.0.0" in result.output


@pytest.mark.parametrize(
    "host, url",
    [
        ("0.0.0.0", "ws://127.0.0.1:8080/"),
        ("::", "ws://[::1]:8080/"),
        ("127.0.0.2", "ws://127.0.0.2:8080/"),
        ("192.0.2.7", "ws://192.0.2.7:8080/"),
        ("::1", "ws://[::1]:8080/"),
        ("2001:db8::7", "ws://[2001:db8::7]:8080/"),
        ("fe80::1%eth0", "ws://[fe80::1%25eth0]:8080/"),
        ("chat.internal", "ws://chat.internal:8080/"),
    ],
)
def test_the_default_url_follows_a_specific_garin_host(monkeypatch: pytest.MonkeyPatch, host: str, url: str) -> None:
    seen: list[str] = []

    async def fake_chat(url: str, origin: str, token: str, room: str, username: str) -> int:
        seen.append(url)
        return 0

    monkeypatch.setattr("garin.chat.chat", fake_chat)
    assert chat("--token", "t", GARIN_HOST=host).exit_code == 0
    assert seen == [url]


def test_a_specific_host_is_where_chat_connects(elsewhere: Path) -> None:
    """Really connecting: the address from .env's GARIN_HOST, not 127.0.0.1."""
    port = free_port()
    (elsewhere / ".env").write_text(f"GARIN_HOST=127.0.0.2\nGARIN_PORT={port}\n")
    result = chat("--token", "t")
    assert result.stdout == f"# could not connect to ws://127.0.0.2:{port}/: Connection refused\n"


@pytest.mark.parametrize(
    "env, dotenv, chosen",
    [
        ({"GARIN_PORT": "{a}"}, "", "a"),
        ({"PORT": "{a}"}, "", "a"),
        ({"GARIN_PORT": "{a}", "PORT": "{b}"}, "", "a"),
        ({}, "PORT={b}\n", "b"),
        ({}, "GARIN_PORT={a}\nPORT={b}\n", "a"),
        ({"PORT": "{b}"}, "GARIN_PORT={a}\n", "a"),  # GARIN_PORT wins over PORT, whatever the source
    ],
)
def test_the_default_url_follows_the_configured_port(elsewhere: Path, env: dict[str, str], dotenv: str, chosen: str) -> None:
    ports = {"a": str(free_port()), "b": str(free_port())}
    (elsewhere / ".env").write_text(dotenv.format(**ports))
    result = chat("--token", "t", **{k: v.format(**ports) for k, v in env.items()})
    # Nothing listens there: the error names the URL it tried, and why.
    assert result.exit_code == 1
    assert result.stdout == f"# could not connect to ws://127.0.0.1:{ports[chosen]}/: Connection refused\n"


def test_without_any_port_setting_the_url_is_port_8080(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    async def fake_chat(url: str, origin: str, token: str, room: str, username: str) -> int:
        seen.append((url, origin))
        return 0

    monkeypatch.setattr("garin.chat.chat", fake_chat)
    result = chat(JWT_DECODE_SECRET=SECRET, ALLOWED_ORIGINS="*,http://first.test/,http://second.test")
    assert result.exit_code == 0, result.output
    assert seen == [("ws://127.0.0.1:8080/", "http://first.test")]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/", "https://chat.example.com/", "localhost:8080"])
def test_a_non_websocket_url_is_one_line(url: str) -> None:
    result = chat(url, "--token", "t")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "use ws:// or wss://" in result.stderr


def test_a_missing_secret_suggests_what_chat_accepts() -> None:
    result = chat("ws://127.0.0.1:1/")
    assert result.exit_code == 2
    assert "--token" in result.stderr and "JWT_DECODE_SECRET" in result.stderr
    assert "--jwt-secret" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_public_key_algorithm_asks_for_a_token() -> None:
    result = chat("ws://127.0.0.1:1/", GARIN_JWT_ALGORITHM="RS256")
    assert result.exit_code == 2 and "--token" in result.stderr and "RS256" in result.stderr


def test_with_everything_given_no_settings_are_read(elsewhere: Path) -> None:
    (elsewhere / ".env").write_text("GARIN_SHARDS=four\n")  # would stop any command that reads settings
    port = free_port()
    result = chat(f"ws://127.0.0.1:{port}/", "--token", "t", "--origin", "http://x.test")
    assert result.stdout == f"# could not connect to ws://127.0.0.1:{port}/: Connection refused\n"


def test_the_secret_from_dotenv_mints_the_token(elsewhere: Path) -> None:
    port = free_port()
    (elsewhere / ".env").write_text(f"JWT_DECODE_SECRET={SECRET}\nGARIN_PORT={port}\n")
    result = chat()
    assert result.exit_code == 1 and "Connection refused" in result.stdout


def test_help_gives_name_lengths_as_the_settings_that_set_them() -> None:
    """Not a hard-coded "3+ characters": the server's settings decide."""
    text = " ".join(CliRunner().invoke(main, ["chat", "--help"], terminal_width=200).output.split())
    assert "Room to join (the server's GARIN_ROOM_MIN to GARIN_ROOM_MAX characters: 3 to 64 by default)" in text
    assert "(the server's GARIN_USERNAME_MIN to GARIN_USERNAME_MAX characters: 3 to 32 by default)" in text
    assert "3+" not in text

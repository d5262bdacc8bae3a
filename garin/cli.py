"""The `garin` command. Each subcommand builds a Config and calls one run_* function."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from garin.auth import MIN_SECRET_BYTES
from garin.config import SETTINGS, Config, ConfigError, load_config, read_dotenv

F = Callable[..., Any]


def _config_options(func: F) -> F:
    """One click option per setting; values stay text so load_config validates them all alike."""
    for setting in reversed(SETTINGS):
        default = "(required)" if setting.default is None else (setting.default or "see help")
        if setting.secret:
            default = "(required, never printed)"
        func = click.option(
            setting.option,
            setting.name,
            default=None,
            metavar=setting.metavar,
            help=f"{setting.help} [env {setting.env}; default {default}]",
        )(func)
    return func


def _fail(message: str) -> None:
    click.echo(f"garin: error: {message}", err=True)
    sys.exit(2)


def _load(options: dict[str, Any], required: tuple[str, ...] = ("jwt_secret", "allowed_origins")) -> Config:
    try:
        dotenv = read_dotenv(Path(".env")) if Path(".env").is_file() else {}
        config = load_config(options, os.environ, dotenv, required)
    except ConfigError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable")
    if config.jwt_secret and len(config.jwt_secret.encode()) < MIN_SECRET_BYTES[config.jwt_algorithm]:
        click.echo(
            "garin: warning: JWT_DECODE_SECRET is short and GARIN_ALLOW_WEAK_SECRET is on: "
            "fine on your laptop, never in production",
            err=True,
        )
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="garin")
def main() -> None:
    """garin: a sharded WebSocket chat-room server, wire-compatible with GarinChat.

    Settings come from options, then the environment, then ./.env.
    Start everything with `garin run`; `garin token NAME` mints a test token.
    """


@main.command()
@_config_options
def run(**options: Any) -> None:
    """Run the whole server: N shard processes and M routers, supervised.

    Ctrl-C or SIGTERM closes every client with 1001 and stops all processes.
    """
    from garin.logs import setup_logging
    from garin.supervisor import run_supervisor

    config = _load(options)
    setup_logging(config.log_level, "garin")
    try:
        code = run_supervisor(config)
    except OSError as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command()
@click.option("--router-id", default=None, help="Name in logs and in shard hellos [default: HONCHO_PROCESS_NAME or pid].")
@click.option("--listen-fd", type=int, default=None, hidden=True)
@click.option("--lifeline-fd", type=int, default=None, hidden=True)
@_config_options
def router(router_id: str | None, listen_fd: int | None, lifeline_fd: int | None, **options: Any) -> None:
    """Run one router: the WebSocket front (for Procfile / systemd use)."""
    from garin.logs import setup_logging
    from garin.profiling import run_trio
    from router.server import serve_router
    from router.shard_link import ShardRefused

    config = _load(options)
    router_id = router_id or os.environ.get("HONCHO_PROCESS_NAME") or str(os.getpid())
    setup_logging(config.log_level, router_id if router_id.startswith("router") else f"router.{router_id}")
    try:
        run_trio(f"router-{router_id}", serve_router, config, router_id, listen_fd, lifeline_fd)
    except* ShardRefused as group:
        _fail(str(group.exceptions[0]))
    except* OSError as group:
        _fail(f"router: {group.exceptions[0]}")


def _index_from_honcho() -> int | None:
    match = re.fullmatch(r"shard\.?(\d+)", os.environ.get("HONCHO_PROCESS_NAME", ""))
    return int(match.group(1)) - 1 if match else None


@main.command()
@click.option("--index", type=int, default=None, help="Which shard this is, 0..shards-1 [default: from HONCHO_PROCESS_NAME shard.N as N-1].")
@click.option("--lifeline-fd", type=int, default=None, hidden=True)
@_config_options
def shard(index: int | None, lifeline_fd: int | None, **options: Any) -> None:
    """Run one shard: owns the rooms that hash to it (for Procfile / systemd use)."""
    from garin.logs import setup_logging
    from garin.profiling import run_trio
    from shard.server import serve_shard

    config = _load(options, required=())
    if index is None:
        index = _index_from_honcho()
        if index is None:
            _fail("shard needs --index (or HONCHO_PROCESS_NAME like shard.1)")
    assert index is not None
    if not 0 <= index < config.shards:
        _fail(f"--index {index} is outside 0..{config.shards - 1} (GARIN_SHARDS={config.shards})")
    setup_logging(config.log_level, f"shard.{index}")
    try:
        run_trio(f"shard-{index}", serve_shard, config, index, lifeline_fd)
    except* (OSError, RuntimeError) as group:
        _fail(f"shard {index}: {group.exceptions[0]}")


def _duration(text: str) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if text.strip() in ("0", "none", "never"):
        return None
    if not match:
        raise click.BadParameter(f"expected a duration like 30m, 12h or 7d, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@main.command()
@click.argument("username")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 90s, 30m, 12h, 7d; 0 for a token that never expires.")
@click.option("--jwt-secret", "jwt_secret", default=None, help="Signing secret [env JWT_DECODE_SECRET].")
@click.option("--jwt-algorithm", "jwt_algorithm", default=None, help="[env GARIN_JWT_ALGORITHM; default HS256]")
@click.option("--allow-weak-secret", "allow_weak_secret", default=None, help="[env GARIN_ALLOW_WEAK_SECRET]")
def token(username: str, ttl: str, **options: Any) -> None:
    """Print a JWT for USERNAME signed with the server's secret, to try the server."""
    from garin.auth import make_token

    ttl_s = _duration(ttl)
    config = _load(options, required=("jwt_secret",))
    click.echo(make_token(config.jwt_secret, username, time.time(), ttl_s, config.jwt_algorithm))

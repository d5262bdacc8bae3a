"""The `garin` command. Each subcommand builds a Config and calls one run_* function."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from garin.auth import HMAC_ALGORITHMS, MIN_SECRET_BYTES
from garin.config import (
    BY_NAME,
    ROUTER_SETTINGS,
    SETTINGS,
    SHARD_SETTINGS,
    Config,
    ConfigError,
    legacy_ban_db_warning,
    load_config,
    read_dotenv,
)

F = Callable[..., Any]
T = TypeVar("T")


def _config_options(names: frozenset[str] | None = None, shard: bool = False) -> Callable[[F], F]:
    """One click option per setting (only `names`, if given: the settings
    that command uses; `shard`: described as a shard uses them); values stay
    text so load_config validates them all alike. Every setting is still
    read from the environment and .env."""

    def decorate(func: F) -> F:
        for setting in reversed(SETTINGS):
            if names is not None and setting.name not in names:
                continue
            default = "required" if setting.default is None else (setting.default or "none")
            if setting.secret:
                default += ", never printed"
            env = "GARIN_PORT or PORT" if setting.name == "port" else setting.env
            # A default the help text explains itself is not repeated as "none".
            shown = f"; default {default}" if "(default " not in setting.help or setting.default else ""
            flag: dict[str, Any] = {}
            if setting.metavar == "BOOL":
                # As `garin token --allow-weak-secret`: given alone it means
                # true; a value (`false`, `=0`) still overrides the env.
                flag = {"is_flag": False, "flag_value": "true"}
            func = click.option(
                setting.option,
                setting.name,
                default=None,
                metavar=setting.metavar,
                help=f"{shard and setting.shard_help or setting.help} [env {env}{shown}]",
                **flag,
            )(func)
        return func

    return decorate


def _innermost(exc: BaseException) -> BaseException:
    """The error itself, out of the exception groups of nested nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _fail(message: str) -> NoReturn:
    click.echo(f"garin: error: {message}", err=True)
    sys.exit(2)


def _load(
    options: dict[str, Any], required: tuple[str, ...] = ("jwt_secret", "allowed_origins"), standalone: bool = False
) -> Config:
    try:
        dotenv = read_dotenv(Path(".env")) if Path(".env").is_file() else {}
        config = load_config(options, os.environ, dotenv, required, standalone)
    except ConfigError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable")
    return config


def _warn_weak_secret(config: Config) -> None:
    """Once per server, as a log line (JSON with GARIN_LOG_FORMAT=json): by
    `garin run`, or by a router or shard started on its own, never by the
    children of `garin run` or by client commands."""
    if config.jwt_secret and len(config.jwt_secret.encode()) < MIN_SECRET_BYTES.get(config.jwt_algorithm, 0):
        import logging

        logging.getLogger("garin").warning(
            "JWT_DECODE_SECRET is short and GARIN_ALLOW_WEAK_SECRET is on: fine on your laptop, never in production"
        )


def _warn_legacy_ban_db(config: Config, log: bool = True) -> None:
    """The old ./garin-bans.sqlite3 of an upgraded install: said at start by
    whoever warns about the secret, and by every `garin ban` command."""
    warning = legacy_ban_db_warning(config.ban_db, os.environ, Path.cwd())
    if warning is None:
        return
    if log:
        import logging

        logging.getLogger("garin").warning("%s", warning)
    else:
        click.echo(f"garin: warning: {warning}", err=True)


def _enable_metrics(config: Config, forget_dead: bool) -> None:
    """Multi-process metrics must be switched on before prometheus_client
    loads. `garin run` starts the directory afresh once it knows no other
    server uses it (garin/supervisor.py), its children inherit it; a
    process started on its own forgets the files of processes that are gone."""
    from garin.metrics_setup import enable_for

    try:
        enable_for(config, fresh=False, forget_dead=forget_dead)
    except ConfigError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="garin")
def main() -> None:
    """garin: a sharded WebSocket chat-room server, wire-compatible with GarinChat.

    Settings come from options, then the environment, then ./.env.
    Start everything with `garin run`; `garin token NAME` mints a test token.
    """


@main.command(short_help="Run the whole server: shards and routers, supervised.")
@_config_options()
def run(**options: Any) -> None:
    """Run the whole server: N shard processes and M routers, supervised.

    Ctrl-C or SIGTERM closes every client with 1001 and stops all processes.
    """
    from garin.logs import setup_logging
    from garin.supervisor import run_supervisor

    config = _load(options)
    setup_logging(config.log_level, "garin", config.log_format)
    _warn_weak_secret(config)
    _warn_legacy_ban_db(config)
    try:
        code = run_supervisor(config)
    except (OSError, ConfigError) as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command(short_help="Run one router, the WebSocket front (Procfile, systemd).")
@click.option("--router-id", default=None, help="Name in logs and in shard hellos [default: HONCHO_PROCESS_NAME or pid].")
@click.option("--listen-fd", type=int, default=None, hidden=True)
@click.option("--lifeline-fd", type=int, default=None, hidden=True)
@_config_options(ROUTER_SETTINGS)
def router(router_id: str | None, listen_fd: int | None, lifeline_fd: int | None, **options: Any) -> None:
    """Run one router: the WebSocket front (for Procfile / systemd use)."""
    from garin.logs import setup_logging
    from garin.profiling import run_trio

    config = _load(options, standalone=listen_fd is None)
    _enable_metrics(config, forget_dead=listen_fd is None)
    from garin.router.server import serve_router
    from garin.router.shard_link import ShardRefused

    router_id = router_id or os.environ.get("HONCHO_PROCESS_NAME") or str(os.getpid())
    setup_logging(
        config.log_level, router_id if router_id.startswith("router") else f"router.{router_id}", config.log_format
    )
    if listen_fd is None:  # not a child of `garin run`, which warned and checked already
        _warn_weak_secret(config)
        _warn_legacy_ban_db(config)
        from garin import banstore

        try:
            banstore.open_at_start(config)
        except ConfigError as exc:
            _fail(str(exc))
    try:
        run_trio(f"router-{router_id}", serve_router, config, router_id, listen_fd, lifeline_fd)
    except* (ShardRefused, ConfigError) as group:
        _fail(str(group.exceptions[0]))
    except* OSError as group:
        _fail(f"router: {group.exceptions[0]}")


def _index_from_honcho() -> int | None:
    match = re.fullmatch(r"shard\.?(\d+)", os.environ.get("HONCHO_PROCESS_NAME", ""))
    return int(match.group(1)) - 1 if match else None


@main.command(short_help="Run one shard, owner of the rooms that hash to it.")
@click.option("--index", type=int, default=None, help="Which shard this is, 0..shards-1 [default: from HONCHO_PROCESS_NAME shard.N as N-1].")
@click.option("--lifeline-fd", type=int, default=None, hidden=True)
@_config_options(SHARD_SETTINGS, shard=True)
def shard(index: int | None, lifeline_fd: int | None, **options: Any) -> None:
    """Run one shard: owns the rooms that hash to it (for Procfile / systemd use)."""
    from garin.logs import setup_logging
    from garin.profiling import run_trio

    config = _load(options, required=(), standalone=lifeline_fd is None)
    source = f"--index {index}"
    if index is None:
        index = _index_from_honcho()
        if index is None:
            _fail("shard needs --index (or HONCHO_PROCESS_NAME like shard.1)")
        source = f"HONCHO_PROCESS_NAME={os.environ['HONCHO_PROCESS_NAME']} (index {index})"
    assert index is not None
    if not 0 <= index < config.shards:
        count = f"GARIN_SHARDS={config.shards}" if options["shards"] is None else f"--shards {config.shards}"
        _fail(f"{source} is outside 0..{config.shards - 1} ({count})")
    setup_logging(config.log_level, f"shard.{index}", config.log_format)
    _enable_metrics(config, forget_dead=lifeline_fd is None)
    from garin.shard.server import serve_shard

    try:
        run_trio(f"shard-{index}", serve_shard, config, index, lifeline_fd)
    except* ConfigError as group:
        _fail(str(group.exceptions[0]))
    except* (OSError, RuntimeError) as group:
        _fail(f"shard {index}: {_innermost(group)}")


def _duration(text: str, option: str, zero: str) -> float | None:
    """`option`'s duration as seconds, or None for `0` (no end: `zero` says
    what that means). Anything else that is not more than zero, like `0s` (a
    token born expired) or `-1h`, is one error line. `none` and `never` are
    refused too: `--for never` reads as "never banned" as well as "banned
    forever"; `0` is the one way to say "no end"."""
    text = text.strip()
    if text == "0":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] if match else 0.0
    if seconds <= 0:
        _fail(f"{option} must be a duration like 90s, 30m, 12h or 7d, or 0 {zero}; not {text!r}")
    return seconds


@main.command(short_help="Print a test JWT for USERNAME, signed with the secret.")
@click.argument("username")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 90s, 30m, 12h, 7d; 0 for a token that never expires.")
@click.option("--jwt-secret", "jwt_secret", default=None, help="Signing secret [env JWT_DECODE_SECRET].")
@click.option("--jwt-algorithm", "jwt_algorithm", default=None,
              help="Algorithm to sign with: HS256, HS384 or HS512 [env GARIN_JWT_ALGORITHM; default HS256].")
@click.option("--allow-weak-secret", "allow_weak_secret", is_flag=True, default=None,
              help="Accept a short secret (local development) [env GARIN_ALLOW_WEAK_SECRET].")
def token(username: str, ttl: str, **options: Any) -> None:
    """Print a JWT for USERNAME signed with the server's secret, to try the server."""
    from garin.auth import make_token

    if options["allow_weak_secret"] is not None:
        options["allow_weak_secret"] = "true" if options["allow_weak_secret"] else None

    ttl_s = _duration(ttl, "--ttl", "for a token that never expires")
    config = _load(options, required=("jwt_secret",))
    if config.jwt_secret is None or config.jwt_algorithm not in HMAC_ALGORITHMS:
        _fail(f"garin token signs with JWT_DECODE_SECRET (HS256/384/512); {config.jwt_algorithm} tokens come from your auth provider")
    assert config.jwt_secret is not None
    click.echo(make_token(config.jwt_secret, username, time.time(), ttl_s, config.jwt_algorithm))


@main.command(short_help="Chat in a room from the terminal.")
@click.argument("url", required=False)
@click.option("--room", required=True, help="Room to join (the server's GARIN_ROOM_MIN to GARIN_ROOM_MAX "
              f"characters: {BY_NAME['room_min'].default} to {BY_NAME['room_max'].default} by default).")
@click.option("--user", "username", required=True, help="Username to join as (the server's GARIN_USERNAME_MIN "
              f"to GARIN_USERNAME_MAX characters: {BY_NAME['username_min'].default} to "
              f"{BY_NAME['username_max'].default} by default).")
@click.option("--token", default=None, help="JWT to send; default: mint one with JWT_DECODE_SECRET (as `garin token`).")
@click.option("--origin", default=None, help="Origin header; default: the first of ALLOWED_ORIGINS, else http://localhost.")
def chat(url: str | None, room: str, username: str, token: str | None, origin: str | None) -> None:
    """Chat in a room from the terminal: type to send; /leave, /join ROOM, /quit.

    URL defaults to ws://HOST:PORT/, where the server is configured to
    listen: GARIN_HOST (127.0.0.1 for 0.0.0.0, the default; [::1] for ::)
    and GARIN_PORT, else PORT (8080 if neither is set), from the environment
    or ./.env. JWT_DECODE_SECRET and ALLOWED_ORIGINS are read the same way.
    A wss:// server's certificate must be trusted by the system's CA list;
    SSL_CERT_FILE=cert.pem trusts a self-signed one (or a private CA) instead.
    """
    import trio

    from garin.auth import make_token
    from garin.chat import chat as run_chat
    from garin.chat import default_url, url_problem

    # Everything given: no settings needed (nor checked).
    config = _load({}, required=()) if None in (url, token, origin) else None
    if url is None:
        assert config is not None
        url = default_url(config.host, config.port)
    problem = url_problem(url)
    if problem is not None:
        _fail(problem)
    if token is None:
        assert config is not None
        if config.jwt_algorithm not in HMAC_ALGORITHMS:
            _fail(f"pass --token TOKEN: with GARIN_JWT_ALGORITHM={config.jwt_algorithm}, tokens come from your auth provider")
        if config.jwt_secret is None:
            _fail(
                "garin chat needs a token: pass --token TOKEN, or set JWT_DECODE_SECRET "
                "(in the environment or ./.env) to mint one"
            )
        assert config.jwt_secret is not None
        token = make_token(config.jwt_secret, username, time.time(), 3600, config.jwt_algorithm)
    if origin is None:
        assert config is not None
        origins = [o for o in config.allowed_origins or () if o != "*"]
        origin = origins[0] if origins else "http://localhost"
    sys.exit(trio.run(run_chat, url, origin, token, room, username))


@main.group(short_help="Show and change the ban list (token subjects refused).")
def ban() -> None:
    """The ban list: who is refused at auth (close 4003 banned).

    Routers add token subjects closed by the rate limiter GARIN_BAN_STRIKES
    times within GARIN_BAN_WINDOW; changes made here reach running routers
    within a few seconds. The list lives in
    $XDG_STATE_HOME/garin/bans.sqlite3 (~/.local/state/garin/bans.sqlite3),
    the same file whatever the working directory, unless GARIN_BAN_DB (or
    --ban-db) names another; every ban command prints the absolute path of
    the file it used, and the server logs it at start.
    With GARIN_REDIS_URL set the list lives in Redis, shared by every host.
    """


def _ban_db_option(func: F) -> F:
    setting = BY_NAME["ban_db"]
    return click.option(
        setting.option,
        setting.name,
        default=None,
        metavar="FILE",
        help=f"{setting.help} [env {setting.env}; default {setting.default}]",
    )(func)


def _ban_path(ban_db: str | None) -> str:
    """The ban list's absolute path, from --ban-db, GARIN_BAN_DB or ./.env."""
    config = _load({"ban_db": ban_db}, required=())
    if not config.ban_db:
        _fail(f"{'GARIN_BAN_DB' if ban_db is None else '--ban-db'} is empty: the ban list is turned off")
    _warn_legacy_ban_db(config, log=False)
    return os.path.abspath(config.ban_db)


@contextlib.contextmanager
def _ban_store(path: str) -> Iterator[Any]:
    """The store at `path`; any SQLite or file error is one line and exit 2."""
    import sqlite3

    from garin.banstore import BanStore

    try:
        yield BanStore(path)
    except (sqlite3.Error, OSError) as exc:
        _fail(f"cannot use the ban list {path}: {exc}")


def _redis_bans(ban_db: str | None) -> Config | None:
    """The config if the ban list lives in Redis (GARIN_REDIS_URL), else None."""
    config = _load({"ban_db": ban_db}, required=())
    return config if config.redis_url else None


def _in_redis(config: Config, call: Callable[[Any], Awaitable[T]]) -> T:
    """Run `call(store)` against the ban list in Redis; any failure is one line, exit 2."""
    import trio

    from garin.redisbans import RedisBanStore

    async def run() -> T:
        async with RedisBanStore.open(config.redis_url, config.redis_password_file) as store:
            return await call(store)

    try:
        return trio.run(run)
    except Exception as group:  # unreachable, refused, timed out: never echo the URL
        exc = _innermost(group)
        _fail(f"cannot use the ban list in Redis: {type(exc).__name__}: {exc}")


@ban.command("list")
@_ban_db_option
def ban_list(ban_db: str | None) -> None:
    """Show the active bans."""
    from garin.chat import visible

    redis = _redis_bans(ban_db)
    if redis is not None:
        where = "Redis"
        rows = _in_redis(redis, lambda store: store.listing(time.time()))
    else:
        where = _ban_path(ban_db)
        if not os.path.exists(where):  # do not leave an empty file where no server looks
            click.echo(f"no active bans (ban list: {where}, no such file yet)")
            return
        with _ban_store(where) as store:
            rows = store.listing(time.time())
    if not rows:
        click.echo(f"no active bans (ban list: {where})")
        return
    click.echo(f"{len(rows)} active {'ban' if len(rows) == 1 else 'bans'} (ban list: {where})")
    for subject, until, reason, created in rows:
        ends = "until removed" if until is None else time.strftime("until %Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
        # Subjects come from tokens: escaped (as garin chat shows others'
        # text) so that none can break the columns or paint the terminal.
        click.echo(f"{visible(subject)}\t{ends}\t{visible(reason)}")


@ban.command("add")
@click.argument("subject")
@click.option("--for", "duration", default="0", show_default=True, help="How long: 30m, 12h, 7d; 0 bans until removed.")
@click.option("--reason", default="manual", show_default=True)
@_ban_db_option
def ban_add(subject: str, duration: str, reason: str, ban_db: str | None) -> None:
    """Ban a token subject (the JWT `sub`), replacing any ban it has."""
    from garin.chat import visible

    seconds = _duration(duration, "--for", "to ban until removed")
    now = time.time()
    until = None if seconds is None else now + seconds
    redis = _redis_bans(ban_db)
    if redis is not None:
        where = "Redis"
        _in_redis(redis, lambda store: store.add(subject, until, reason, now))
    else:
        where = _ban_path(ban_db)
        with _ban_store(where) as store:
            store.add(subject, until, reason, now)
    how = "" if seconds is None else f" for {duration}"
    click.echo(f"banned {visible(subject)}{how} (ban list: {where})")


@ban.command("remove")
@click.argument("subject")
@_ban_db_option
def ban_remove(subject: str, ban_db: str | None) -> None:
    """Lift a ban."""
    from garin.chat import visible

    redis = _redis_bans(ban_db)
    if redis is not None:
        where = "Redis"
        removed = _in_redis(redis, lambda store: store.remove(subject))
    else:
        where = _ban_path(ban_db)
        if not os.path.exists(where):
            _fail(f"{visible(subject)} is not banned (ban list: {where}, no such file)")
        with _ban_store(where) as store:
            removed = store.remove(subject)
    if not removed:
        _fail(f"{visible(subject)} is not banned (ban list: {where})")
    click.echo(f"unbanned {visible(subject)} (ban list: {where})")

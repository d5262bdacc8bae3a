"""Configuration: one table of settings, one frozen Config, validated once.

Each setting has an environment variable (GarinChat's names are kept: PORT,
JWT_DECODE_SECRET, ALLOWED_ORIGINS; everything new is GARIN_*) and a click
option with the same meaning. Precedence: command-line option, then the
environment, then a `.env` file in the working directory, then the default
(but GARIN_PORT, from either, beats PORT from either). A bad value raises
ConfigError with one line naming the variable.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from garin.auth import HMAC_ALGORITHMS, MIN_SECRET_BYTES, PUBLIC_KEY_ALGORITHMS, load_public_key
from garin.bans import BanPolicy
from garin.protocol import NameLimits
from garin.proxies import TrustedProxies
from garin.session import SessionRules


class ConfigError(Exception):
    """A setting is missing or bad; str() is the one line to show."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # Config attribute
    env: str
    option: str
    default: str | None  # None: required
    help: str
    parse: Callable[[str], Any]
    # Settings only the supervisor and routers need still appear on every
    # command so that one .env serves all; `secret` hides the value in --help.
    secret: bool = False
    # `garin shard --help`'s text, where `help` speaks of routers only.
    shard_help: str = ""

    @property
    def metavar(self) -> str:
        kind = getattr(self.parse, "__qualname__", "")
        for key, name in (("_int", "N"), ("_seconds", "SECONDS"), ("_bool", "BOOL"), ("_origins", "LIST")):
            if kind.startswith(key):
                return name
        return "TEXT"


def _int(low: int, high: int = 2**31) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, not {value}")
        return value

    return parse


def _seconds(low: float, high: float = 86400.0) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip().removesuffix("s"))
        except ValueError:
            raise ValueError(f"must be a number of seconds, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, not {value:g}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, not {text!r}")


_NOT_PAGE_SCHEMES = frozenset(("ftp", "ftps", "sftp", "file", "ws", "wss", "data", "blob", "about", "javascript", "mailto"))


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("must list at least one origin (or *)")
    for origin in origins:
        if origin == "*":
            continue
        # What a browser (or an app's web view: capacitor://, app://) sends as
        # a page's Origin: scheme://host[:port]. Schemes of things that are
        # not pages never appear there, so naming one is a mistake.
        match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://[^/\s]+", origin)
        if not match:
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
        if match.group(1) in _NOT_PAGE_SCHEMES:
            raise ValueError(
                f"{origin!r} is not a web page's origin ({match.group(1)}:// pages do not open WebSockets); "
                "use one like https://chat.example.com"
            )
    return origins


def _proxies(text: str) -> str:
    TrustedProxies.parse(text)  # ValueError names the bad entry
    return ",".join(part.strip() for part in text.split(",") if part.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _redis_url(text: str) -> str:
    # Never repeat the value: it may hold a password.
    if text and not re.match(r"(redis|rediss|unix)://", text):
        raise ValueError("must start with redis://, rediss:// or unix:// (value not shown: it may hold a password)")
    return text


def _text(text: str) -> str:
    return text


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "GARIN_HOST", "--host", "0.0.0.0", "Address routers listen on.", _nonempty),
    Setting("port", "PORT", "--port", "8080",
            "Public WebSocket port (GARIN_PORT, from the environment or ./.env, wins over PORT from "
            "either: process managers assign PORT per process).", _int(0, 65535),
            shard_help="The routers' public port: with GARIN_PORT or --port, it names the default "
            "socket directory (a shard listens on no TCP port)."),
    Setting("jwt_secret", "JWT_DECODE_SECRET", "--jwt-secret", None,
            "HMAC secret that signs client tokens (at least 32 bytes; 48/64 for HS384/HS512).", _nonempty, secret=True),
    Setting("allow_weak_secret", "GARIN_ALLOW_WEAK_SECRET", "--allow-weak-secret", "false",
            "Accept a JWT secret shorter than 32 bytes (local development only).", _bool),
    Setting("jwt_algorithm", "GARIN_JWT_ALGORITHM", "--jwt-algorithm", "HS256",
            "The only JWT algorithm accepted: HS256/384/512 with JWT_DECODE_SECRET, or "
            "RS*/PS*/ES* with GARIN_JWT_PUBLIC_KEY_FILE or GARIN_JWKS_URL.",
            _choice(*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)),
    Setting("jwt_leeway_s", "GARIN_JWT_LEEWAY", "--jwt-leeway", "0",
            "Clock skew allowed on exp/nbf, seconds.", _seconds(0, 600)),
    Setting("jwt_public_key_file", "GARIN_JWT_PUBLIC_KEY_FILE", "--jwt-public-key-file", "",
            "PEM public key that verifies tokens (RS*/PS*/ES* algorithms).", _text),
    Setting("jwks_url", "GARIN_JWKS_URL", "--jwks-url", "",
            "JWKS URL of your auth provider (RS*/PS*/ES*); fetched off the event loop, cached.",
            _text),
    Setting("jwks_refresh_s", "GARIN_JWKS_REFRESH", "--jwks-refresh", "300",
            "Seconds between JWKS refreshes (sooner when a token names an unknown kid).",
            _seconds(1, 86400)),
    Setting("jwt_audience", "GARIN_JWT_AUDIENCE", "--jwt-audience", "",
            "If set, tokens must carry this `aud`.", _text),
    Setting("jwt_issuer", "GARIN_JWT_ISSUER", "--jwt-issuer", "",
            "If set, tokens must carry this `iss`.", _text),
    Setting("username_claim", "GARIN_USERNAME_CLAIM", "--username-claim", "",
            "Token claim (e.g. sub or name) that sets the username, ignoring the join's; "
            "empty keeps GarinChat's behaviour (the join names the user).", _text),
    # Not "./garin-bans.sqlite3": `garin ban` run from another directory
    # would write a file the server never reads. The default is resolved
    # from XDG_STATE_HOME (or HOME) by default_ban_db.
    Setting("ban_db", "GARIN_BAN_DB", "--ban-db", "~/.local/state/garin/bans.sqlite3",
            "SQLite file of the ban list, shared by routers and `garin ban` (default under "
            "$XDG_STATE_HOME when that is set; its directory is created 0700); empty turns bans off.",
            _text),
    Setting("ban_strikes", "GARIN_BAN_STRIKES", "--ban-strikes", "3",
            "Rate-limit closes within GARIN_BAN_WINDOW that ban a token subject; 0: no automatic bans.",
            _int(0, 1000)),
    Setting("ban_window_s", "GARIN_BAN_WINDOW", "--ban-window", "600",
            "Window for counting rate-limit closes, seconds.", _seconds(1, 30 * 86400)),
    Setting("ban_duration_s", "GARIN_BAN_DURATION", "--ban-duration", "3600",
            "How long an automatic ban lasts, seconds.", _seconds(1, 365 * 86400)),
    Setting("allowed_origins", "ALLOWED_ORIGINS", "--allowed-origins", None,
            "Comma list of browser origins allowed to connect; * allows any.", _origins),
    # One shard per core is the usual choice: each shard fans out its own
    # rooms (README, Performance).
    Setting("shards", "GARIN_SHARDS", "--shards", "2",
            "Number of shard processes (part of the routing: all processes must agree).",
            _int(1, 256)),
    Setting("routers", "GARIN_ROUTERS", "--routers", "1",
            "Number of router processes `garin run` starts (they accept, authenticate and hand "
            "each client to its room's shard).", _int(1, 64),
            shard_help="Number of routers that hand this shard clients; with --max-connections, it "
            "sizes the shard's open-files limit."),
    Setting("socket_dir", "GARIN_SOCKET_DIR", "--socket-dir", "",
            "Directory for the shards' Unix sockets (default /tmp/garin-UID-PORT; for a router or shard "
            "started on its own, /tmp/garin-UID, or /tmp/garin-UID-GARIN_PORT when that is set).", _text),
    Setting("auth_timeout_s", "GARIN_AUTH_TIMEOUT", "--auth-timeout", "2",
            "Seconds a new connection has to send auth.", _seconds(0.01)),
    Setting("join_timeout_s", "GARIN_JOIN_TIMEOUT", "--join-timeout", "2",
            "Seconds after auth (or userleave) to send join.", _seconds(0.01)),
    Setting("rate_limit_count", "GARIN_RATE_LIMIT_COUNT", "--rate-limit-count", "1",
            "Messages allowed per rate-limit window; 0 turns the limit off.", _int(0)),
    Setting("rate_limit_window_s", "GARIN_RATE_LIMIT_WINDOW", "--rate-limit-window", "1",
            "Length of the rate-limit window, seconds.", _seconds(0.001)),
    Setting("join_limit_count", "GARIN_JOIN_LIMIT_COUNT", "--join-limit-count", "10",
            "Joins a connection may make at once; after that, one every join-limit window / this "
            "count seconds (each join and userleave is announced to the room); faster closes 1008 "
            "(join limit exceeded). 0 turns the limit off.", _int(0)),
    Setting("join_limit_window_s", "GARIN_JOIN_LIMIT_WINDOW", "--join-limit-window", "20",
            "Seconds over which the join limit's count refills.", _seconds(0.001)),
    Setting("max_message_bytes", "GARIN_MAX_MESSAGE_BYTES", "--max-message-bytes", "65536",
            "Largest client message, bytes of UTF-8; larger closes 1009 (as does, with "
            "GARIN_REDIS_URL, one over 8 MiB). Before its join a client may send at most 32 KiB.",
            _int(64, 16 * 1024 * 1024)),
    Setting("max_body_chars", "GARIN_MAX_BODY_CHARS", "--max-body-chars", "4096",
            "Longest message body, characters; longer closes 1008 (body too long). "
            "0: only the message size limits it.", _int(0)),
    Setting("ping_interval_s", "GARIN_PING_INTERVAL", "--ping-interval", "20",
            "Seconds of silence from a client before it is pinged; 0 turns keepalive off.",
            _seconds(0)),
    Setting("ping_timeout_s", "GARIN_PING_TIMEOUT", "--ping-timeout", "20",
            "Seconds a pinged client has to send any frame (a pong will do) before it is "
            "closed 1011 (keepalive ping timeout).", _seconds(0.01)),
    Setting("idle_timeout_s", "GARIN_IDLE_TIMEOUT", "--idle-timeout", "0",
            "Seconds a member in a room may send nothing (pings and pongs do not count) "
            "before it is closed 1001 (idle timeout); 0 turns it off.", _seconds(0)),
    Setting("username_min", "GARIN_USERNAME_MIN", "--username-min", "3",
            "Shortest username, characters.", _int(1, 1024)),
    Setting("username_max", "GARIN_USERNAME_MAX", "--username-max", "32",
            "Longest username, characters.", _int(1, 1024)),
    Setting("room_min", "GARIN_ROOM_MIN", "--room-min", "3",
            "Shortest room name, characters.", _int(1, 1024)),
    Setting("room_max", "GARIN_ROOM_MAX", "--room-max", "64",
            "Longest room name, characters.", _int(1, 1024)),
    Setting("max_outbox_bytes", "GARIN_MAX_OUTBOX_BYTES", "--max-outbox-bytes", "1048576",
            "Bytes queued for a client that is not reading before it is closed (too slow).",
            _int(1024)),
    Setting("send_buffer_bytes", "GARIN_SEND_BUFFER_BYTES", "--send-buffer-bytes", "262144",
            "Kernel send buffer of each client socket (SO_SNDBUF): what a client that does not read "
            "holds in the kernel besides GARIN_MAX_OUTBOX_BYTES. 0: the kernel's autotuning "
            "(up to 4 MiB a socket on Linux).", _int(0)),
    # Kept so that existing .env files still load: since connections live in
    # their room's shard, nothing is held for a shard any more.
    Setting("shard_hold_bytes", "GARIN_SHARD_HOLD_BYTES", "--shard-hold-bytes", "4194304",
            "No longer used (nothing is held for an unreachable shard); accepted and ignored.",
            _int(0)),
    # A supervisor restarts a dead shard well within a second: 10 s covers
    # that with a wide margin while a client waits for its join.
    Setting("shard_hold_timeout_s", "GARIN_SHARD_HOLD_TIMEOUT", "--shard-hold-timeout", "10",
            "Seconds a join to an unreachable shard's room waits for it before the client is "
            "closed 1013 (room unavailable); with GARIN_REDIS_URL, also how long a join or "
            "message waits for an unreachable Redis.", _seconds(0, 3600)),
    # Several hosts (README "Several hosts"). The URL may hold a password:
    # hidden in --help, never logged.
    Setting("redis_url", "GARIN_REDIS_URL", "--redis-url", "",
            "Redis (or Valkey) that several garin hosts share: redis://, rediss:// (TLS) or unix://. "
            "Unset: one host, no Redis.", _redis_url, secret=True),
    Setting("redis_password_file", "GARIN_REDIS_PASSWORD_FILE", "--redis-password-file", "",
            "File holding the Redis password (instead of putting it in GARIN_REDIS_URL).", _text),
    # Heartbeats are sent every second: 5 s rides out a few lost ones.
    Setting("redis_dead_after_s", "GARIN_REDIS_DEAD_AFTER", "--redis-dead-after", "5",
            "Seconds without a heartbeat after which another host removes a shard process's "
            "members (announced as userleave).", _seconds(2, 600)),
    Setting("handshake_timeout_s", "GARIN_HANDSHAKE_TIMEOUT", "--handshake-timeout", "10",
            "Seconds to complete the HTTP upgrade.", _seconds(0.1)),
    Setting("max_connections", "GARIN_MAX_CONNECTIONS", "--max-connections", "10000",
            "Connections one router holds (handshakes included); more are closed 1013 "
            "(server full). 0: no limit.", _int(0),
            shard_help="Connections one router holds: this shard raises its open-files limit to hold "
            "--routers times as many."),
    # 1000: a NAT, an office or a load test puts hundreds of real users
    # behind one address (GarinChat has no such limit); one address still
    # cannot take more than a tenth of a router's default 10,000.
    Setting("max_connections_per_ip", "GARIN_MAX_CONNECTIONS_PER_IP", "--max-connections-per-ip", "1000",
            "Connections per client address (IPv6: per /64), all routers that `garin run` starts "
            "together; more are closed 1013 (too many connections). 0: no limit. Behind a proxy, set "
            "GARIN_FORWARDED_ALLOW_IPS so that it applies to the real client.", _int(0)),
    Setting("forwarded_allow_ips", "GARIN_FORWARDED_ALLOW_IPS", "--forwarded-allow-ips", "127.0.0.1,::1",
            "Comma list of proxy addresses or networks (or *) whose X-Forwarded-For / Forwarded "
            "headers name the client (for the per-address limit and logs), as uvicorn's option.",
            _proxies),
    Setting("shutdown_timeout_s", "GARIN_SHUTDOWN_TIMEOUT", "--shutdown-timeout", "5",
            "Seconds a stopping process waits for clients to close before it exits.",
            _seconds(0.1, 600)),
    Setting("log_level", "GARIN_LOG_LEVEL", "--log-level", "info",
            "Log level.", _choice("debug", "info", "warning", "error")),
    Setting("metrics_port", "GARIN_METRICS_PORT", "--metrics-port", "0",
            "Port for GET /metrics (Prometheus) and GET /health on every router; 0 turns it off.",
            _int(0, 65535),
            shard_help="Port of the routers' GET /metrics and /health; not 0: this shard writes its "
            "metrics for them (in GARIN_SOCKET_DIR/metrics)."),
    Setting("metrics_host", "GARIN_METRICS_HOST", "--metrics-host", "127.0.0.1",
            "Address of the metrics and health port (keep it private).", _nonempty,
            shard_help="Not used by a shard (its routers serve the metrics); accepted so that one "
            ".env serves every process."),
    Setting("log_format", "GARIN_LOG_FORMAT", "--log-format", "text",
            "Log lines as text (for people) or json (one object per line, for log shippers).",
            _choice("text", "json")),
)

BY_NAME = {s.name: s for s in SETTINGS}

# What a shard process uses (its --help lists only these): it runs members'
# sessions from the join on, fans out, and finds its socket.
SHARD_SETTINGS = frozenset((
    "port", "shards", "routers", "socket_dir", "rate_limit_count", "rate_limit_window_s", "join_limit_count",
    "join_limit_window_s", "max_message_bytes", "max_body_chars", "ping_interval_s", "ping_timeout_s",
    "idle_timeout_s", "username_min", "username_max", "room_min", "room_max", "max_outbox_bytes",
    "shard_hold_timeout_s", "max_connections", "shutdown_timeout_s", "log_level", "log_format", "metrics_port",
    "metrics_host", "redis_url", "redis_password_file", "redis_dead_after_s",
))
# A router uses everything but the count of routers (`garin run`'s).
ROUTER_SETTINGS = frozenset(s.name for s in SETTINGS) - {"routers"}


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    jwt_secret: str | None = field(repr=False)
    allow_weak_secret: bool
    jwt_algorithm: str
    jwt_leeway_s: float
    jwt_public_key_file: str
    jwks_url: str
    jwks_refresh_s: float
    jwt_audience: str
    jwt_issuer: str
    username_claim: str
    ban_db: str
    ban_strikes: int
    ban_window_s: float
    ban_duration_s: float
    allowed_origins: tuple[str, ...]
    shards: int
    routers: int
    socket_dir: str
    auth_timeout_s: float
    join_timeout_s: float
    rate_limit_count: int
    rate_limit_window_s: float
    join_limit_count: int
    join_limit_window_s: float
    max_message_bytes: int
    max_body_chars: int
    ping_interval_s: float
    ping_timeout_s: float
    idle_timeout_s: float
    username_min: int
    username_max: int
    room_min: int
    room_max: int
    max_outbox_bytes: int
    send_buffer_bytes: int
    shard_hold_bytes: int
    shard_hold_timeout_s: float
    redis_url: str = field(repr=False)
    redis_password_file: str
    redis_dead_after_s: float
    handshake_timeout_s: float
    max_connections: int
    max_connections_per_ip: int
    forwarded_allow_ips: str
    shutdown_timeout_s: float
    log_level: str
    log_format: str
    metrics_port: int
    metrics_host: str

    @property
    def trusted_proxies(self) -> TrustedProxies:
        return TrustedProxies.parse(self.forwarded_allow_ips)

    @property
    def ban_policy(self) -> BanPolicy:
        return BanPolicy(self.ban_strikes, self.ban_window_s, self.ban_duration_s)

    @property
    def session_rules(self) -> SessionRules:
        return SessionRules(
            auth_timeout_s=self.auth_timeout_s,
            join_timeout_s=self.join_timeout_s,
            rate_limit_count=self.rate_limit_count,
            rate_limit_window_s=self.rate_limit_window_s,
            join_limit_count=self.join_limit_count,
            join_limit_window_s=self.join_limit_window_s,
            names=NameLimits(self.username_min, self.username_max, self.room_min, self.room_max),
            max_body_chars=self.max_body_chars,
            ping_interval_s=self.ping_interval_s,
            ping_timeout_s=self.ping_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
        )

    @property
    def metrics_dir(self) -> Path:
        return Path(self.socket_dir) / "metrics"

    def shard_socket(self, index: int) -> Path:
        return Path(self.socket_dir) / f"shard-{index}.sock"

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process load this same config."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                text = ",".join(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[setting.env] = text
        env["GARIN_PORT"] = env["PORT"]
        return env


def state_home(environ: Mapping[str, str]) -> Path:
    """The XDG Base Directory state home: $XDG_STATE_HOME if it is an absolute
    path (the spec says to ignore a relative one), else ~/.local/state."""
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg)
    return _home(environ) / ".local" / "state"


def default_ban_db(environ: Mapping[str, str]) -> str:
    """Where the ban list lives unless GARIN_BAN_DB says otherwise: one place
    per user, whatever the working directory of the server or `garin ban`."""
    return str(state_home(environ) / "garin" / "bans.sqlite3")


# Where garin kept the ban list before it moved under XDG_STATE_HOME.
LEGACY_BAN_DB = "garin-bans.sqlite3"


def legacy_ban_db_warning(ban_db: str, environ: Mapping[str, str], cwd: Path) -> str | None:
    """One line for an operator upgrading from a garin that kept its bans in
    ./garin-bans.sqlite3: that file is no longer read, so its bans would be
    lifted without a word. None unless the default list is in use and the
    old file sits in `cwd`."""
    old = cwd / LEGACY_BAN_DB
    if not ban_db or ban_db != default_ban_db(environ) or not old.is_file():
        return None
    return (
        f"{old} (where older garin versions kept the ban list) is not read: bans are in {ban_db}; "
        f"set GARIN_BAN_DB={old} to keep using the old file, or move it to {ban_db}"
    )


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME", "")
    return Path(home) if os.path.isabs(home) else Path.home()


def _expand_home(path: str, environ: Mapping[str, str]) -> str:
    """A leading `~/` (as in --help's default, copied into .env, where no
    shell expands it) is the home directory."""
    return str(_home(environ) / path[2:]) if path.startswith("~/") else path


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as honcho reads them: # comments, optional quotes, `export`."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {raw.strip()!r:.60}")
        value = value.strip()
        quoted = re.fullmatch(r"""(['"])(.*)\1(\s+#.*)?""", value)
        if quoted:
            value = quoted.group(2)
        else:
            value = value.split(" #", 1)[0].strip()
        values[key.strip()] = value
    return values


def load_config(
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str] | None = None,
    required: tuple[str, ...] = ("jwt_secret", "allowed_origins"),
    standalone: bool = False,
) -> Config:
    """Build the Config from CLI `options` (by setting name; None = not given).

    `standalone`: a router or shard started on its own (Procfile, systemd),
    whose default socket directory must not depend on a per-process PORT."""
    dotenv = dotenv or {}
    values: dict[str, Any] = {}
    port_source = _lookup(BY_NAME["port"], options, environ, dotenv)[0]
    hmac = _lookup(BY_NAME["jwt_algorithm"], options, environ, dotenv)[1] in HMAC_ALGORITHMS
    for setting in SETTINGS:
        source, text = _lookup(setting, options, environ, dotenv)
        if text is None:
            # Public-key algorithms need no shared secret.
            if setting.name in required and (hmac or setting.name != "jwt_secret"):
                raise ConfigError(
                    f"{setting.env} is not set (or pass {setting.option}); "
                    f"it is required: {setting.help}"
                )
            values[setting.name] = None
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{source} {exc}") from None
    if _given(BY_NAME["ban_db"], options, environ, dotenv):
        values["ban_db"] = _expand_home(values["ban_db"], environ)
    else:
        values["ban_db"] = default_ban_db(environ)
    if not values["socket_dir"]:
        # `garin run` passes its own to its children. A Procfile's processes
        # each get their own PORT from honcho: only GARIN_PORT (or --port),
        # the same in all of them, may name the directory.
        uid = os.getuid()
        if standalone and port_source not in ("GARIN_PORT", "--port"):
            values["socket_dir"] = f"/tmp/garin-{uid}"
        else:
            values["socket_dir"] = f"/tmp/garin-{uid}-{values['port']}"
    return _check(values, required)


def _lookup(
    setting: Setting,
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
) -> tuple[str, str | None]:
    given = options.get(setting.name)
    if given is not None:
        return setting.option, given
    # GARIN_PORT wins over PORT whatever the source of each: a .env's
    # GARIN_PORT, the same for every process, beats the PORT that a process
    # manager gives each process (and `garin chat` finds the routers' port).
    names = ("GARIN_PORT", "PORT") if setting.name == "port" else (setting.env,)
    for env in names:
        for source in (environ, dotenv):
            if env in source:
                return env, source[env]
    return setting.env, setting.default


def _given(setting: Setting, options: Mapping[str, str | None], environ: Mapping[str, str],
           dotenv: Mapping[str, str]) -> bool:
    return options.get(setting.name) is not None or setting.env in environ or setting.env in dotenv


def _check_public_key(values: dict[str, Any]) -> None:
    algorithm, key_file, jwks_url = values["jwt_algorithm"], values["jwt_public_key_file"], values["jwks_url"]
    if bool(key_file) == bool(jwks_url):
        raise ConfigError(
            f"GARIN_JWT_ALGORITHM={algorithm} needs exactly one of GARIN_JWT_PUBLIC_KEY_FILE or GARIN_JWKS_URL"
        )
    if key_file:
        try:
            load_public_key(key_file, algorithm)
        except ValueError as exc:
            raise ConfigError(f"GARIN_JWT_PUBLIC_KEY_FILE: {exc}") from None
    elif not re.fullmatch(r"https?://\S+", jwks_url):
        raise ConfigError(f"GARIN_JWKS_URL must be an http(s) URL, not {jwks_url!r}")


# The URL options (coredis's) that name files of the TLS set-up.
_REDIS_FILE_OPTIONS = frozenset(("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"))
# As the README says: garin is installed from its clone, not from an index.
INSTALL_REDIS = "install the redis extra (pip install '.[redis]' in garin's checkout)"


def _check_redis_url(url: str) -> None:
    """What coredis would only find when connecting (so every shard would
    retry it forever): a bad port, database or option, a missing TLS file.
    Never repeats the URL, which may hold a password."""
    import coredis  # only here: GARIN_REDIS_URL is set

    secret = re.search(r"//[^@/]*:([^@/]*)@", url)
    password = secret.group(1) if secret else ""
    try:
        parts = urlsplit(url)
        database = parts.path.strip("/") if parts.scheme != "unix" else ""
        if database and not database.isdigit():
            raise ValueError("the database (the URL's path) must be a number")
        # coredis would say only "No such file or directory", not which.
        for option, paths in parse_qs(parts.query).items():
            for path in paths if option in _REDIS_FILE_OPTIONS else ():
                if not os.access(path, os.R_OK):
                    raise ValueError(f"{option}={path}: {'cannot be read' if os.path.exists(path) else 'no such file'}")
        coredis.Redis.from_url(url)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        if password and password in detail:
            detail = type(exc).__name__
        raise ConfigError(f"GARIN_REDIS_URL cannot be used: {detail} (value not shown: it may hold a password)") from None


def _check(values: dict[str, Any], required: tuple[str, ...]) -> Config:
    secret = values["jwt_secret"]
    algorithm = values["jwt_algorithm"]
    if algorithm in PUBLIC_KEY_ALGORITHMS and "jwt_secret" in required:
        _check_public_key(values)
    if algorithm in HMAC_ALGORITHMS and "jwt_secret" in required:
        # Else ignored: every provider token would be refused 1008 without a word.
        for name, env in (("jwt_public_key_file", "GARIN_JWT_PUBLIC_KEY_FILE"), ("jwks_url", "GARIN_JWKS_URL")):
            if values[name]:
                raise ConfigError(
                    f"{env} is set but GARIN_JWT_ALGORITHM is {algorithm}, which checks tokens with "
                    "JWT_DECODE_SECRET: set GARIN_JWT_ALGORITHM to your provider's algorithm (e.g. RS256)"
                )
    needed = MIN_SECRET_BYTES.get(algorithm, 0)
    if secret is not None and len(secret.encode()) < needed and not values["allow_weak_secret"]:
        raise ConfigError(
            f"JWT_DECODE_SECRET is {len(secret.encode())} bytes; {values['jwt_algorithm']} needs "
            f"at least {needed} random bytes, or set GARIN_ALLOW_WEAK_SECRET=1 for local development"
        )
    for kind in ("username", "room"):
        low, high = values[f"{kind}_min"], values[f"{kind}_max"]
        if low > high:
            raise ConfigError(
                f"GARIN_{kind.upper()}_MIN ({low}) is larger than GARIN_{kind.upper()}_MAX ({high})"
            )
    if values["redis_url"]:
        if importlib.util.find_spec("coredis") is None:
            raise ConfigError(f"GARIN_REDIS_URL is set but coredis is not installed: {INSTALL_REDIS}")
        _check_redis_url(values["redis_url"])
    if values["redis_password_file"]:
        if not values["redis_url"]:
            raise ConfigError("GARIN_REDIS_PASSWORD_FILE is set but GARIN_REDIS_URL is not")
        try:
            Path(values["redis_password_file"]).read_text()
        except OSError as exc:
            raise ConfigError(f"GARIN_REDIS_PASSWORD_FILE: cannot read {values['redis_password_file']}: {exc.strerror}") from None
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})

"""Configuration: one table of settings, one frozen Config, validated once.

Each setting has an environment variable (GarinChat's names are kept: PORT,
JWT_DECODE_SECRET, ALLOWED_ORIGINS; everything new is GARIN_*) and a click
option with the same meaning. Precedence: command-line option, then the
environment, then a `.env` file in the working directory, then the default.
A bad value raises ConfigError with one line naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from garin.auth import HMAC_ALGORITHMS, MIN_SECRET_BYTES
from garin.protocol import NameLimits
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


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("must list at least one origin (or *)")
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
    return origins


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _text(text: str) -> str:
    return text


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "GARIN_HOST", "--host", "0.0.0.0", "Address routers listen on.", _nonempty),
    Setting("port", "PORT", "--port", "8080",
            "Public WebSocket port (GARIN_PORT wins over PORT, for process managers "
            "that assign PORT per process).", _int(0, 65535)),
    Setting("jwt_secret", "JWT_DECODE_SECRET", "--jwt-secret", None,
            "HMAC secret that signs client tokens (at least 32 bytes; 48/64 for HS384/HS512).", _nonempty, secret=True),
    Setting("allow_weak_secret", "GARIN_ALLOW_WEAK_SECRET", "--allow-weak-secret", "false",
            "Accept a JWT secret shorter than 32 bytes (local development only).", _bool),
    Setting("jwt_algorithm", "GARIN_JWT_ALGORITHM", "--jwt-algorithm", "HS256",
            "The only JWT algorithm accepted.", _choice(*HMAC_ALGORITHMS)),
    Setting("jwt_leeway_s", "GARIN_JWT_LEEWAY", "--jwt-leeway", "0",
            "Clock skew allowed on exp/nbf, seconds.", _seconds(0, 600)),
    Setting("allowed_origins", "ALLOWED_ORIGINS", "--allowed-origins", None,
            "Comma list of browser origins allowed to connect; * allows any.", _origins),
    Setting("shards", "GARIN_SHARDS", "--shards", "4",
            "Number of shard processes (part of the routing: all processes must agree).",
            _int(1, 256)),
    Setting("routers", "GARIN_ROUTERS", "--routers", "1",
            "Number of router processes: `garin run` starts this many, and a starting shard "
            "waits (2 s at most) for this many to replay their members before it applies "
            "new events, so set it to match when you run routers yourself.", _int(1, 64)),
    Setting("socket_dir", "GARIN_SOCKET_DIR", "--socket-dir", "",
            "Directory for the shards' Unix sockets (default /tmp/garin-UID-PORT).", _text),
    Setting("auth_timeout_s", "GARIN_AUTH_TIMEOUT", "--auth-timeout", "2",
            "Seconds a new connection has to send auth.", _seconds(0.01)),
    Setting("join_timeout_s", "GARIN_JOIN_TIMEOUT", "--join-timeout", "2",
            "Seconds after auth (or userleave) to send join.", _seconds(0.01)),
    Setting("rate_limit_count", "GARIN_RATE_LIMIT_COUNT", "--rate-limit-count", "1",
            "Messages allowed per rate-limit window; 0 turns the limit off.", _int(0)),
    Setting("rate_limit_window_s", "GARIN_RATE_LIMIT_WINDOW", "--rate-limit-window", "1",
            "Length of the rate-limit window, seconds.", _seconds(0.001)),
    Setting("max_message_bytes", "GARIN_MAX_MESSAGE_BYTES", "--max-message-bytes", "65536",
            "Largest client message (characters of a text frame); larger closes 1009.",
            _int(64, 16 * 1024 * 1024)),
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
    # While a shard is unreachable (killed, restarting) each router holds the
    # events for its rooms and sends them once it is back. 4 MiB and 10 s
    # cover a supervisor restart (well under a second) with a wide margin,
    # yet cap the memory one dead shard can cost a router.
    Setting("shard_hold_bytes", "GARIN_SHARD_HOLD_BYTES", "--shard-hold-bytes", "4194304",
            "Bytes of events a router holds for an unreachable shard; past that the clients "
            "in its rooms are closed (1013 room unavailable). 0 holds nothing.", _int(0)),
    Setting("shard_hold_timeout_s", "GARIN_SHARD_HOLD_TIMEOUT", "--shard-hold-timeout", "10",
            "Seconds a router waits for an unreachable shard before closing the clients in its "
            "rooms (1013 room unavailable) and refusing joins there until it is back.",
            _seconds(0, 3600)),
    Setting("handshake_timeout_s", "GARIN_HANDSHAKE_TIMEOUT", "--handshake-timeout", "10",
            "Seconds to complete the HTTP upgrade.", _seconds(0.1)),
    Setting("shutdown_timeout_s", "GARIN_SHUTDOWN_TIMEOUT", "--shutdown-timeout", "5",
            "Seconds a stopping process waits for clients to close before it exits.",
            _seconds(0.1, 600)),
    Setting("log_level", "GARIN_LOG_LEVEL", "--log-level", "info",
            "Log level.", _choice("debug", "info", "warning", "error")),
)

BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    jwt_secret: str = field(repr=False)
    allow_weak_secret: bool
    jwt_algorithm: str
    jwt_leeway_s: float
    allowed_origins: tuple[str, ...]
    shards: int
    routers: int
    socket_dir: str
    auth_timeout_s: float
    join_timeout_s: float
    rate_limit_count: int
    rate_limit_window_s: float
    max_message_bytes: int
    username_min: int
    username_max: int
    room_min: int
    room_max: int
    max_outbox_bytes: int
    shard_hold_bytes: int
    shard_hold_timeout_s: float
    handshake_timeout_s: float
    shutdown_timeout_s: float
    log_level: str

    @property
    def session_rules(self) -> SessionRules:
        return SessionRules(
            auth_timeout_s=self.auth_timeout_s,
            join_timeout_s=self.join_timeout_s,
            rate_limit_count=self.rate_limit_count,
            rate_limit_window_s=self.rate_limit_window_s,
            names=NameLimits(self.username_min, self.username_max, self.room_min, self.room_max),
        )

    def shard_socket(self, index: int) -> Path:
        return Path(self.socket_dir) / f"shard-{index}.sock"

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process load this same config."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if isinstance(value, tuple):
                text = ",".join(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[setting.env] = text
        env["GARIN_PORT"] = env["PORT"]
        return env


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
) -> Config:
    """Build the Config from CLI `options` (by setting name; None = not given)."""
    dotenv = dotenv or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        source, text = _lookup(setting, options, environ, dotenv)
        if text is None:
            if setting.name in required:
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
    return _check(values, options, environ, dotenv)


def _lookup(
    setting: Setting,
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
) -> tuple[str, str | None]:
    given = options.get(setting.name)
    if given is not None:
        return setting.option, given
    names = ("GARIN_PORT", "PORT") if setting.name == "port" else (setting.env,)
    for source in (environ, dotenv):
        for env in names:
            if env in source:
                return env, source[env]
    return setting.env, setting.default


def _check(
    values: dict[str, Any],
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
) -> Config:
    secret = values["jwt_secret"]
    needed = MIN_SECRET_BYTES[values["jwt_algorithm"]]
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
    if not values["socket_dir"]:
        values["socket_dir"] = f"/tmp/garin-{os.getuid()}-{values['port']}"
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})

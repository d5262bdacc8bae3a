"""garin.config: settings from options, environment, .env and defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from garin.config import BY_NAME, SETTINGS, Config, ConfigError, load_config, read_dotenv
from garin.protocol import NameLimits
from garin.session import SessionRules

SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes: the minimum
ORIGIN = "https://chat.example.com"
BASE = {"JWT_DECODE_SECRET": SECRET, "ALLOWED_ORIGINS": ORIGIN}


def load(environ: dict[str, str] | None = None, options: dict[str, str | None] | None = None,
         dotenv: dict[str, str] | None = None) -> Config:
    return load_config(options or {}, {**BASE, **(environ or {})}, dotenv)


def error_of(environ: dict[str, str] | None = None,
             options: dict[str, str | None] | None = None,
             dotenv: dict[str, str] | None = None, base: dict[str, str] = BASE) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(options or {}, {**base, **(environ or {})}, dotenv)
    message = str(info.value)
    assert "\n" not in message  # one clear line
    return message


# --- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    config = load()
    assert config.host == "0.0.0.0"
    assert config.port == 8080
    assert config.jwt_secret == SECRET
    assert config.allow_weak_secret is False
    assert config.jwt_algorithm == "HS256"
    assert config.jwt_leeway_s == 0.0
    assert config.allowed_origins == (ORIGIN,)
    assert (config.shards, config.routers) == (2, 1)
    assert config.socket_dir == f"/tmp/garin-{os.getuid()}-8080"
    assert (config.auth_timeout_s, config.join_timeout_s) == (2.0, 2.0)
    assert (config.rate_limit_count, config.rate_limit_window_s) == (1, 1.0)
    assert (config.join_limit_count, config.join_limit_window_s) == (10, 20.0)
    assert config.max_message_bytes == 65536
    assert config.max_body_chars == 4096
    assert (config.ping_interval_s, config.ping_timeout_s) == (20.0, 20.0)
    assert config.idle_timeout_s == 0.0
    assert (config.username_min, config.username_max) == (3, 32)
    assert (config.room_min, config.room_max) == (3, 64)
    assert config.max_outbox_bytes == 1048576
    assert (config.shard_hold_bytes, config.shard_hold_timeout_s) == (4 * 1024 * 1024, 10.0)
    assert (config.handshake_timeout_s, config.shutdown_timeout_s) == (10.0, 5.0)
    assert (config.max_connections, config.max_connections_per_ip) == (10000, 1000)
    assert config.forwarded_allow_ips == "127.0.0.1,::1"
    assert config.log_level == "info"


def test_defaults_match_the_session_defaults() -> None:
    assert load().session_rules == SessionRules()


def test_every_setting_is_a_config_field() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(Config)}
    assert BY_NAME["port"].env == "PORT"
    envs = [s.env for s in SETTINGS]
    assert len(envs) == len(set(envs))
    options = [s.option for s in SETTINGS]
    assert len(options) == len(set(options))
    for setting in SETTINGS:
        assert setting.option.startswith("--")
        assert setting.env in ("PORT", "JWT_DECODE_SECRET", "ALLOWED_ORIGINS") or \
            setting.env.startswith("GARIN_")


def test_socket_dir_default_follows_port() -> None:
    assert load({"PORT": "9001"}).socket_dir == f"/tmp/garin-{os.getuid()}-9001"
    assert load({"GARIN_SOCKET_DIR": "/run/garin"}).socket_dir == "/run/garin"


def test_ban_db_default_is_the_xdg_state_dir() -> None:
    assert load({"XDG_STATE_HOME": "/state"}).ban_db == "/state/garin/bans.sqlite3"
    assert load({"HOME": "/home/zed"}).ban_db == "/home/zed/.local/state/garin/bans.sqlite3"
    # The spec: a relative XDG_STATE_HOME is ignored.
    assert load({"HOME": "/home/zed", "XDG_STATE_HOME": "rel"}).ban_db == "/home/zed/.local/state/garin/bans.sqlite3"
    assert load({"XDG_STATE_HOME": "/state"}, dotenv={"XDG_STATE_HOME": "/no"}).ban_db == "/state/garin/bans.sqlite3"


@pytest.mark.parametrize("where", ["environ", "dotenv", "options"])
def test_ban_db_given_wins_and_empty_turns_bans_off(where: str) -> None:
    def given(value: str) -> Config:
        if where == "options":
            return load({"XDG_STATE_HOME": "/state"}, options={"ban_db": value})
        return load({"XDG_STATE_HOME": "/state", **({"GARIN_BAN_DB": value} if where == "environ" else {})},
                    dotenv={"GARIN_BAN_DB": value} if where == "dotenv" else None)

    assert given("bans.db").ban_db == "bans.db"  # relative: to the working directory, as given
    assert given("/var/lib/garin/bans.db").ban_db == "/var/lib/garin/bans.db"
    assert given("").ban_db == ""
    # --help's default, copied into .env where no shell expands `~`:
    assert load({"HOME": "/home/zed", "GARIN_BAN_DB": "~/.local/state/garin/bans.sqlite3"}).ban_db == \
        "/home/zed/.local/state/garin/bans.sqlite3"


def test_shard_socket() -> None:
    config = load({"GARIN_SOCKET_DIR": "/run/garin"})
    assert config.shard_socket(0) == Path("/run/garin/shard-0.sock")
    assert config.shard_socket(11) == Path("/run/garin/shard-11.sock")


def test_session_rules() -> None:
    config = load({
        "GARIN_AUTH_TIMEOUT": "1.5", "GARIN_JOIN_TIMEOUT": "3", "GARIN_RATE_LIMIT_COUNT": "5",
        "GARIN_RATE_LIMIT_WINDOW": "2.5", "GARIN_USERNAME_MIN": "2", "GARIN_USERNAME_MAX": "20",
        "GARIN_ROOM_MIN": "4", "GARIN_ROOM_MAX": "40", "GARIN_MAX_BODY_CHARS": "500",
        "GARIN_PING_INTERVAL": "7", "GARIN_PING_TIMEOUT": "3.5", "GARIN_IDLE_TIMEOUT": "600",
        "GARIN_JOIN_LIMIT_COUNT": "3", "GARIN_JOIN_LIMIT_WINDOW": "30",
    })
    assert config.session_rules == SessionRules(
        1.5, 3.0, 5, 2.5, NameLimits(2, 20, 4, 40),
        max_body_chars=500, ping_interval_s=7.0, ping_timeout_s=3.5, idle_timeout_s=600.0,
        join_limit_count=3, join_limit_window_s=30.0,
    )


# --- precedence -----------------------------------------------------------------------------

# (setting name, env var, option value, environ value, dotenv value, default, parsed values)
PRECEDENCE = [
    ("port", "PORT", "1001", "1002", "1003", 8080),
    ("host", "GARIN_HOST", "10.0.0.1", "10.0.0.2", "10.0.0.3", "0.0.0.0"),
    ("shards", "GARIN_SHARDS", "6", "3", "5", 2),
    ("auth_timeout_s", "GARIN_AUTH_TIMEOUT", "0.5", "1.5", "2.5", 2.0),
    ("log_level", "GARIN_LOG_LEVEL", "debug", "warning", "error", "info"),
    ("jwt_algorithm", "GARIN_JWT_ALGORITHM", "HS384", "HS512", "HS256", "HS256"),
]


@pytest.mark.parametrize(("name", "env", "opt", "envval", "dotval", "default"), PRECEDENCE)
def test_precedence(name: str, env: str, opt: str, envval: str, dotval: str,
                    default: object) -> None:
    secret = {"JWT_DECODE_SECRET": "k" * 64}  # long enough for HS512 too
    parse = BY_NAME[name].parse
    full = load_config({name: opt}, {**BASE, **secret, env: envval}, {env: dotval})
    assert getattr(full, name) == parse(opt)
    no_option = load_config({name: None}, {**BASE, **secret, env: envval}, {env: dotval})
    assert getattr(no_option, name) == parse(envval)
    dotenv_only = load_config({}, {**BASE, **secret}, {env: dotval})
    assert getattr(dotenv_only, name) == parse(dotval)
    assert getattr(load_config({}, {**BASE, **secret}, {}), name) == default


def test_required_values_from_dotenv() -> None:
    config = load_config({}, {}, dict(BASE))
    assert config.jwt_secret == SECRET and config.allowed_origins == (ORIGIN,)


def test_required_values_from_options() -> None:
    config = load_config({"jwt_secret": SECRET, "allowed_origins": "*"}, {})
    assert config.jwt_secret == SECRET and config.allowed_origins == ("*",)


def test_empty_option_string_is_given() -> None:
    # None means "not given"; an empty string is a value (and here a bad one).
    assert "--host" in error_of(options={"host": ""})


@pytest.mark.parametrize(
    ("environ", "dotenv", "port"),
    [
        ({"PORT": "5000"}, {}, 5000),
        ({"GARIN_PORT": "6000"}, {}, 6000),
        ({"PORT": "5000", "GARIN_PORT": "6000"}, {}, 6000),
        ({"GARIN_PORT": "6000", "PORT": "5000"}, {}, 6000),
        ({}, {"PORT": "5000", "GARIN_PORT": "6000"}, 6000),
        ({}, {"PORT": "5000"}, 5000),
        ({"PORT": "5000"}, {"PORT": "7000"}, 5000),
        ({"GARIN_PORT": "6000"}, {"GARIN_PORT": "7000"}, 6000),
        # Whatever the source of each: the more specific name wins.
        ({"PORT": "5000"}, {"GARIN_PORT": "7000"}, 7000),
        ({"GARIN_PORT": "6000"}, {"PORT": "7000"}, 6000),
    ],
)
def test_garin_port_beats_port(environ: dict[str, str], dotenv: dict[str, str],
                               port: int) -> None:
    assert load(environ, dotenv=dotenv).port == port


def test_port_option_beats_both() -> None:
    assert load({"PORT": "5000", "GARIN_PORT": "6000"}, {"port": "7000"}).port == 7000


def test_bad_garin_port_is_named() -> None:
    message = error_of({"GARIN_PORT": "http", "PORT": "5000"})
    assert message.startswith("GARIN_PORT ")


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["JWT_DECODE_SECRET", "ALLOWED_ORIGINS"])
def test_required(missing: str) -> None:
    base = {k: v for k, v in BASE.items() if k != missing}
    message = error_of(base=base)
    assert missing in message
    assert BY_NAME["jwt_secret" if missing == "JWT_DECODE_SECRET" else "allowed_origins"].option \
        in message
    assert "required" in message


def test_required_can_be_relaxed() -> None:
    config = load_config({}, {}, None, required=())
    assert config.jwt_secret is None
    assert config.allowed_origins is None


INVALID = [
    ("PORT", "abc"), ("PORT", ""), ("PORT", "-1"), ("PORT", "65536"), ("PORT", "80.5"),
    ("PORT", "0x50"), ("GARIN_PORT", "99999"),
    ("GARIN_HOST", ""),
    ("JWT_DECODE_SECRET", ""),
    ("GARIN_ALLOW_WEAK_SECRET", "maybe"), ("GARIN_ALLOW_WEAK_SECRET", "2"),
    ("GARIN_JWT_ALGORITHM", "EdDSA"), ("GARIN_JWT_ALGORITHM", "none"),
    ("GARIN_JWT_ALGORITHM", "hs256"), ("GARIN_JWT_ALGORITHM", ""),
    ("GARIN_JWT_LEEWAY", "-1"), ("GARIN_JWT_LEEWAY", "601"), ("GARIN_JWT_LEEWAY", "soon"),
    ("ALLOWED_ORIGINS", ""), ("ALLOWED_ORIGINS", " , "), ("ALLOWED_ORIGINS", "chat.example.com"),
    ("ALLOWED_ORIGINS", "https://chat.example.com/path"), ("ALLOWED_ORIGINS", "HTTPS://x.com"),
    ("ALLOWED_ORIGINS", "https://ok.com,nope"), ("ALLOWED_ORIGINS", "https://"),
    ("ALLOWED_ORIGINS", "https://a b.com"),
    ("GARIN_SHARDS", "0"), ("GARIN_SHARDS", "257"), ("GARIN_SHARDS", "four"),
    ("GARIN_SHARDS", "2.0"),
    ("GARIN_ROUTERS", "0"), ("GARIN_ROUTERS", "65"),
    ("GARIN_AUTH_TIMEOUT", "0"), ("GARIN_AUTH_TIMEOUT", "-1"), ("GARIN_AUTH_TIMEOUT", "abc"),
    ("GARIN_AUTH_TIMEOUT", "nan"), ("GARIN_AUTH_TIMEOUT", "inf"),
    ("GARIN_AUTH_TIMEOUT", "86401"), ("GARIN_AUTH_TIMEOUT", ""), ("GARIN_AUTH_TIMEOUT", "2ms"),
    ("GARIN_JOIN_TIMEOUT", "0.001"), ("GARIN_JOIN_TIMEOUT", "-inf"),
    ("GARIN_RATE_LIMIT_COUNT", "-1"), ("GARIN_RATE_LIMIT_COUNT", "1.5"),
    ("GARIN_RATE_LIMIT_WINDOW", "0"), ("GARIN_RATE_LIMIT_WINDOW", "x"),
    ("GARIN_JOIN_LIMIT_COUNT", "-1"), ("GARIN_JOIN_LIMIT_COUNT", "two"),
    ("GARIN_JOIN_LIMIT_WINDOW", "0"), ("GARIN_JOIN_LIMIT_WINDOW", "-5"),
    ("GARIN_MAX_MESSAGE_BYTES", "63"), ("GARIN_MAX_MESSAGE_BYTES", str(16 * 1024 * 1024 + 1)),
    ("GARIN_USERNAME_MIN", "0"), ("GARIN_USERNAME_MAX", "1025"),
    ("GARIN_ROOM_MIN", "-3"), ("GARIN_ROOM_MAX", "big"),
    ("GARIN_MAX_OUTBOX_BYTES", "1023"),
    ("GARIN_MAX_BODY_CHARS", "-1"), ("GARIN_MAX_BODY_CHARS", "4k"),
    ("GARIN_PING_INTERVAL", "-1"), ("GARIN_PING_INTERVAL", "often"), ("GARIN_PING_INTERVAL", "86401"),
    ("GARIN_PING_TIMEOUT", "0"), ("GARIN_PING_TIMEOUT", "0.001"),
    ("GARIN_IDLE_TIMEOUT", "-5"), ("GARIN_IDLE_TIMEOUT", "1h"),
    ("GARIN_SHARD_HOLD_BYTES", "-1"), ("GARIN_SHARD_HOLD_BYTES", "4MiB"),
    ("GARIN_SHARD_HOLD_TIMEOUT", "-1"), ("GARIN_SHARD_HOLD_TIMEOUT", "3601"),
    ("GARIN_SHARD_HOLD_TIMEOUT", "long"),
    ("GARIN_HANDSHAKE_TIMEOUT", "0.05"),
    ("GARIN_MAX_CONNECTIONS", "-1"), ("GARIN_MAX_CONNECTIONS", "10k"),
    ("GARIN_MAX_CONNECTIONS_PER_IP", "-1"), ("GARIN_MAX_CONNECTIONS_PER_IP", "many"),
    ("GARIN_SHUTDOWN_TIMEOUT", "601"), ("GARIN_SHUTDOWN_TIMEOUT", "0"),
    ("GARIN_LOG_LEVEL", "verbose"), ("GARIN_LOG_LEVEL", "INFO"), ("GARIN_LOG_LEVEL", ""),
]


@pytest.mark.parametrize(("env", "value"), INVALID)
def test_invalid_environ_value_names_the_variable(env: str, value: str) -> None:
    message = error_of({env: value})
    assert message.startswith(env + " ")


@pytest.mark.parametrize(("env", "value"), INVALID)
def test_invalid_dotenv_value_names_the_variable(env: str, value: str) -> None:
    base = {k: v for k, v in BASE.items() if k != env}
    message = error_of(dotenv={env: value}, base=base)
    assert message.startswith(env + " ")


BY_ENV = {s.env: s for s in SETTINGS}


@pytest.mark.parametrize(("env", "value"), [(e, v) for e, v in INVALID if e != "GARIN_PORT"])
def test_invalid_option_value_names_the_option(env: str, value: str) -> None:
    setting = BY_ENV[env]
    message = error_of(options={setting.name: value})
    assert message.startswith(setting.option + " ")


@pytest.mark.parametrize(
    ("env", "value", "attr", "parsed"),
    [
        ("PORT", " 8081 ", "port", 8081),
        ("PORT", "0", "port", 0),
        ("PORT", "65535", "port", 65535),
        ("GARIN_AUTH_TIMEOUT", "2s", "auth_timeout_s", 2.0),
        ("GARIN_AUTH_TIMEOUT", " 0.25 ", "auth_timeout_s", 0.25),
        ("GARIN_AUTH_TIMEOUT", "0.01", "auth_timeout_s", 0.01),
        ("GARIN_AUTH_TIMEOUT", "86400", "auth_timeout_s", 86400.0),
        ("GARIN_JWT_LEEWAY", "600", "jwt_leeway_s", 600.0),
        ("GARIN_RATE_LIMIT_COUNT", "0", "rate_limit_count", 0),
        ("GARIN_JOIN_LIMIT_COUNT", "0", "join_limit_count", 0),
        ("GARIN_SHARDS", "1", "shards", 1),
        ("GARIN_SHARDS", "256", "shards", 256),
        ("GARIN_MAX_MESSAGE_BYTES", "64", "max_message_bytes", 64),
        ("GARIN_MAX_BODY_CHARS", "0", "max_body_chars", 0),
        ("GARIN_MAX_CONNECTIONS", "0", "max_connections", 0),
        ("GARIN_MAX_CONNECTIONS", "1000000", "max_connections", 1000000),
        ("GARIN_MAX_CONNECTIONS_PER_IP", "0", "max_connections_per_ip", 0),
        ("GARIN_MAX_CONNECTIONS_PER_IP", "1", "max_connections_per_ip", 1),
        ("GARIN_PING_INTERVAL", "0", "ping_interval_s", 0.0),
        ("GARIN_PING_INTERVAL", "0.5s", "ping_interval_s", 0.5),
        ("GARIN_PING_TIMEOUT", "0.01", "ping_timeout_s", 0.01),
        ("GARIN_IDLE_TIMEOUT", "0", "idle_timeout_s", 0.0),
        ("GARIN_IDLE_TIMEOUT", "3600", "idle_timeout_s", 3600.0),
        ("GARIN_SHARD_HOLD_BYTES", "0", "shard_hold_bytes", 0),
        ("GARIN_SHARD_HOLD_BYTES", "65536", "shard_hold_bytes", 65536),
        ("GARIN_SHARD_HOLD_TIMEOUT", "0", "shard_hold_timeout_s", 0.0),
        ("GARIN_SHARD_HOLD_TIMEOUT", "2.5s", "shard_hold_timeout_s", 2.5),
        ("GARIN_LOG_LEVEL", "debug", "log_level", "debug"),
        ("GARIN_SOCKET_DIR", "", "socket_dir", f"/tmp/garin-{os.getuid()}-8080"),
        ("ALLOWED_ORIGINS", "*", "allowed_origins", ("*",)),
        ("ALLOWED_ORIGINS", "https://a.com/", "allowed_origins", ("https://a.com",)),
        ("ALLOWED_ORIGINS", " https://a.com , http://localhost:3000 ,", "allowed_origins",
         ("https://a.com", "http://localhost:3000")),
        ("ALLOWED_ORIGINS", "https://a.com,*", "allowed_origins", ("https://a.com", "*")),
        ("ALLOWED_ORIGINS", "app+x.y-z://host", "allowed_origins", ("app+x.y-z://host",)),
    ],
)
def test_valid_values(env: str, value: str, attr: str, parsed: object) -> None:
    assert getattr(load({env: value}), attr) == parsed


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_bool_values(text: str, value: bool) -> None:
    assert load({"GARIN_ALLOW_WEAK_SECRET": text}).allow_weak_secret is value


# --- the JWT secret ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "ok"),
    [
        ("x" * 31, False),
        ("x" * 32, True),
        ("x" * 100, True),
        ("hunter2", False),
        ("é" * 16, True),  # 32 bytes of UTF-8, 16 characters
        ("é" * 15 + "x", False),  # 31 bytes
        ("日本語" * 3 + "abcde", True),  # 27 + 5 = 32 bytes
    ],
)
def test_weak_secret(secret: str, ok: bool) -> None:
    environ = {"JWT_DECODE_SECRET": secret}
    if ok:
        assert load(environ).jwt_secret == secret
        return
    message = error_of(environ)
    assert "JWT_DECODE_SECRET" in message and "GARIN_ALLOW_WEAK_SECRET" in message
    assert secret not in message


@pytest.mark.parametrize("allow", ["1", "true", "yes", "on"])
@pytest.mark.parametrize("where", ["environ", "dotenv", "option"])
def test_weak_secret_allowed(allow: str, where: str) -> None:
    environ = {"JWT_DECODE_SECRET": "hunter2"}
    if where == "environ":
        config = load({**environ, "GARIN_ALLOW_WEAK_SECRET": allow})
    elif where == "dotenv":
        config = load(environ, dotenv={"GARIN_ALLOW_WEAK_SECRET": allow})
    else:
        config = load(environ, {"allow_weak_secret": allow})
    assert config.jwt_secret == "hunter2" and config.allow_weak_secret is True


@pytest.mark.parametrize("allow", ["0", "false", "no", "off", ""])
def test_weak_secret_not_allowed(allow: str) -> None:
    error_of({"JWT_DECODE_SECRET": "hunter2", "GARIN_ALLOW_WEAK_SECRET": allow})


def test_secret_from_option_is_checked_too() -> None:
    assert "JWT_DECODE_SECRET" in error_of(options={"jwt_secret": "short"})


@pytest.mark.parametrize(
    ("algorithm", "length", "ok"),
    [
        ("HS256", 32, True),
        ("HS384", 47, False),
        ("HS384", 48, True),
        ("HS512", 32, False),
        ("HS512", 63, False),
        ("HS512", 64, True),
    ],
)
def test_secret_must_be_as_long_as_the_hash(algorithm: str, length: int, ok: bool) -> None:
    # RFC 7518 3.2: "A key of the same size as the hash output (for instance,
    # 256 bits for HS256) or larger MUST be used". PyJWT enforces the same
    # with InsecureKeyLengthWarning on every token.
    environ = {"JWT_DECODE_SECRET": "k" * length, "GARIN_JWT_ALGORITHM": algorithm}
    if ok:
        assert load(environ).jwt_algorithm == algorithm
    else:
        assert "JWT_DECODE_SECRET" in error_of(environ)
        allowed = load({**environ, "GARIN_ALLOW_WEAK_SECRET": "1"})
        assert allowed.jwt_algorithm == algorithm


def test_secret_not_in_repr() -> None:
    secret = "TOP-SECRET-" + "z" * 40
    config = load({"JWT_DECODE_SECRET": secret})
    assert secret not in repr(config)
    assert secret not in str(config)
    assert "jwt_secret" not in repr(config)
    assert "allowed_origins" in repr(config)  # the rest is still shown


def test_config_is_frozen() -> None:
    config = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


# --- min / max -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["USERNAME", "ROOM"])
def test_min_larger_than_max(kind: str) -> None:
    message = error_of({f"GARIN_{kind}_MIN": "10", f"GARIN_{kind}_MAX": "9"})
    assert f"GARIN_{kind}_MIN" in message and f"GARIN_{kind}_MAX" in message
    assert "10" in message and "9" in message


@pytest.mark.parametrize("kind", ["USERNAME", "ROOM"])
def test_min_equal_max(kind: str) -> None:
    config = load({f"GARIN_{kind}_MIN": "5", f"GARIN_{kind}_MAX": "5"})
    assert getattr(config, f"{kind.lower()}_min") == getattr(config, f"{kind.lower()}_max") == 5


def test_min_larger_than_default_max() -> None:
    assert "GARIN_USERNAME_MIN" in error_of({"GARIN_USERNAME_MIN": "33"})
    assert "GARIN_ROOM_MIN" in error_of(options={"room_min": "65"})


# --- to_env round trip ---------------------------------------------------------------------


ROUND_TRIP = [
    {},
    {"PORT": "9000", "GARIN_SHARDS": "16", "GARIN_ROUTERS": "3"},
    {"JWT_DECODE_SECRET": "weak", "GARIN_ALLOW_WEAK_SECRET": "yes"},
    {"ALLOWED_ORIGINS": "https://a.com, http://localhost:3000/ ,*"},
    {"GARIN_AUTH_TIMEOUT": "0.1", "GARIN_JOIN_TIMEOUT": "1s", "GARIN_RATE_LIMIT_WINDOW": "0.3",
     "GARIN_JWT_LEEWAY": "2.5", "GARIN_SHUTDOWN_TIMEOUT": "0.7", "GARIN_HANDSHAKE_TIMEOUT": "3"},
    {"GARIN_RATE_LIMIT_COUNT": "0", "GARIN_LOG_LEVEL": "debug", "GARIN_HOST": "127.0.0.1",
     "GARIN_SOCKET_DIR": "/run/garin dir", "GARIN_JWT_ALGORITHM": "HS384",
     "JWT_DECODE_SECRET": "é" * 24},
    {"GARIN_USERNAME_MIN": "1", "GARIN_USERNAME_MAX": "1", "GARIN_ROOM_MIN": "7",
     "GARIN_ROOM_MAX": "1024", "GARIN_MAX_MESSAGE_BYTES": "64",
     "GARIN_MAX_OUTBOX_BYTES": "1024"},
    {"GARIN_MAX_BODY_CHARS": "0", "GARIN_PING_INTERVAL": "0", "GARIN_PING_TIMEOUT": "0.25",
     "GARIN_IDLE_TIMEOUT": "90", "GARIN_MAX_CONNECTIONS": "0", "GARIN_MAX_CONNECTIONS_PER_IP": "7"},
    {"GARIN_SHARD_HOLD_BYTES": "0", "GARIN_SHARD_HOLD_TIMEOUT": "0.5"},
]


@pytest.mark.parametrize("environ", ROUND_TRIP)
def test_to_env_round_trip(environ: dict[str, str]) -> None:
    config = load(environ)
    env = config.to_env()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert load_config({}, env) == config
    # Even with a conflicting .env around, the child sees the same config.
    assert load_config({}, env, {"PORT": "1", "GARIN_SHARDS": "99"}) == config


def test_to_env_contents() -> None:
    env = load({"PORT": "9000"}).to_env()
    assert env["PORT"] == env["GARIN_PORT"] == "9000"
    assert env["JWT_DECODE_SECRET"] == SECRET
    assert env["GARIN_ALLOW_WEAK_SECRET"] == "false"
    assert env["ALLOWED_ORIGINS"] == ORIGIN
    assert set(env) == {s.env for s in SETTINGS} | {"GARIN_PORT"}


# --- read_dotenv -------------------------------------------------------------------------------


def dotenv(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / ".env"
    path.write_text(text)
    return read_dotenv(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("\n\n   \n", {}),
        ("# just a comment\n", {}),
        ("A=1", {"A": "1"}),
        ("A=1\nB=2\n", {"A": "1", "B": "2"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("  A = 1  ", {"A": "1"}),
        ("A=", {"A": ""}),
        ("A=1\nA=2", {"A": "2"}),
        ("export A=1", {"A": "1"}),
        ("export   A=1", {"A": "1"}),
        ("_A_1=x", {"_A_1": "x"}),
        ("lower_case=x", {"lower_case": "x"}),
        ("A=b=c", {"A": "b=c"}),
        ("URL=postgres://u:p@h/db?x=1", {"URL": "postgres://u:p@h/db?x=1"}),
        ('A="quoted value"', {"A": "quoted value"}),
        ("A='single quoted'", {"A": "single quoted"}),
        ('A="  spaces kept  "', {"A": "  spaces kept  "}),
        ('A=""', {"A": ""}),
        ("A=''", {"A": ""}),
        ('A="a # not a comment"', {"A": "a # not a comment"}),
        ("A='#x'", {"A": "#x"}),
        ("A=value # a comment", {"A": "value"}),
        ("A=value#not-a-comment", {"A": "value#not-a-comment"}),
        ("A=#x", {"A": "#x"}),
        ('A="mismatched\'', {"A": "\"mismatched'"}),
        ('A="', {"A": '"'}),
        ("# comment\nexport JWT_DECODE_SECRET='s e c r e t'\n  # indented comment\nPORT=80\n",
         {"JWT_DECODE_SECRET": "s e c r e t", "PORT": "80"}),
        ("A=日本語", {"A": "日本語"}),
        # A quoted value may be followed by a comment, like an unquoted one.
        ('A="quoted" # comment', {"A": "quoted"}),
        ("A='quoted value' # comment", {"A": "quoted value"}),
    ],
)
def test_read_dotenv(tmp_path: Path, text: str, expected: dict[str, str]) -> None:
    assert dotenv(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("JUSTAKEY", 1),
        ("A=1\nB", 2),
        ("# ok\n\nA=1\n1A=2", 4),
        ("A-B=1", 1),
        ("=value", 1),
        ("A B=1", 1),
        ("export", 1),
    ],
)
def test_read_dotenv_bad_lines(tmp_path: Path, text: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        dotenv(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / '.env'}:{line}: ")
    assert "KEY=VALUE" in message


def test_dotenv_feeds_load_config(tmp_path: Path) -> None:
    values = dotenv(tmp_path, f"""
# garin settings
export JWT_DECODE_SECRET="{SECRET}"
ALLOWED_ORIGINS=https://a.com,https://b.com  # two origins
GARIN_SHARDS=8
PORT=9000
""")
    config = load_config({}, {"GARIN_SHARDS": "2"}, values)
    assert config.jwt_secret == SECRET
    assert config.allowed_origins == ("https://a.com", "https://b.com")
    assert config.shards == 2  # the environment wins over .env
    assert config.port == 9000


@pytest.mark.parametrize("origin", ["ftp://x", "ws://chat.example.com", "file://host"])
def test_origins_of_things_that_are_not_pages_are_refused(origin: str) -> None:
    with pytest.raises(ConfigError, match="not a web page's origin"):
        load_config({}, {"JWT_DECODE_SECRET": "x" * 40, "ALLOWED_ORIGINS": origin})


# --- Redis (several hosts) -----------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://:hunter22@redis.example/0",
    "redis://:hunter22@127.0.0.1:notaport/0",
    "redis://:hunter22@127.0.0.1:6379/notadb",
    "redis://:hunter22@[::1/0",
    "redis://:hunter22@127.0.0.1:6379/0?db=x",
    "redis://:hunter22@127.0.0.1:6379/0?connect_timeout=soon",
    "rediss://:hunter22@127.0.0.1:6379/0?ssl_cert_reqs=bogus",
    "rediss://:hunter22@127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/hunter22.pem",
])
def test_a_redis_url_coredis_cannot_use_is_refused_without_showing_it(url: str) -> None:
    pytest.importorskip("coredis")
    message = error_of({"GARIN_REDIS_URL": url})
    assert message.startswith("GARIN_REDIS_URL ")
    assert "hunter22" not in message


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://:pw@redis.example", "rediss://u:pw@redis.example:6380/3",
    "unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock?db=2",
])
def test_redis_urls_garin_takes(url: str) -> None:
    pytest.importorskip("coredis")
    assert load({"GARIN_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("option", ["ssl_ca_certs", "ssl_certfile", "ssl_keyfile"])
def test_a_missing_tls_file_in_the_redis_url_is_named(option: str, tmp_path: Path) -> None:
    """coredis says only "No such file or directory", not which file."""
    pytest.importorskip("coredis")
    missing = tmp_path / "nonexistent.pem"
    message = error_of({"GARIN_REDIS_URL": f"rediss://:s3cret@127.0.0.1:6399/0?{option}={missing}"})
    assert message == (
        f"GARIN_REDIS_URL cannot be used: {option}={missing}: no such file (value not shown: it may hold a password)"
    )


def test_without_coredis_the_hint_is_the_readmes_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """garin is installed from its clone: `pip install 'garin[redis]'` would ask
    the package index for some other project called garin."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coredis" else find_spec(name, *a))
    assert error_of({"GARIN_REDIS_URL": "redis://127.0.0.1:6379/0"}) == (
        "GARIN_REDIS_URL is set but coredis is not installed: "
        "install the redis extra (pip install '.[redis]' in garin's checkout)"
    )
    assert "pip install -q '.[redis]'" in (Path(__file__).parents[2] / "README.md").read_text()

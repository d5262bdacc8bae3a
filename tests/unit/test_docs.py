"""The README, .env.example and --help stay true to the code."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from garin.bans import subject_of
from garin.cli import main
from garin.closes import ALL_CLOSES
from garin.config import BY_NAME, ROUTER_SETTINGS, SETTINGS, SHARD_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_setting_is_documented(setting):
    assert f"`{setting.env}`" in README
    assert f"`{setting.option}`" in README
    assert setting.env in ENV_EXAMPLE or setting.env == "PORT"


@pytest.mark.parametrize(("close", "when"), ALL_CLOSES, ids=lambda c: str(getattr(c, "reason", c)))
def test_every_close_is_in_the_readme_table(close, when):
    reason = close.reason.replace("<field> ", "")
    rows = [line for line in README.splitlines() if line.startswith(f"| {close.code} |")]
    assert any(reason in row for row in rows), f"no README row for {close}"


@pytest.mark.parametrize(
    ("command", "names"), [("run", None), ("router", ROUTER_SETTINGS), ("shard", SHARD_SETTINGS)]
)
def test_help_lists_the_settings_each_command_uses(command, names):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for setting in SETTINGS:
        listed = setting.option in result.output
        assert listed == (names is None or setting.name in names), setting.option
        if listed:
            assert setting.env in result.output
    assert "see help" not in result.output
    assert "GARIN_PORT or PORT" in result.output


def test_garin_help_shows_whole_summaries():
    result = CliRunner().invoke(main, ["--help"], terminal_width=100)
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands, commands


def test_the_procfile_holds_the_shard_count_on_every_line():
    procfile = (ROOT / "Procfile").read_text()
    lines = [line for line in procfile.splitlines() if line and not line.startswith("#")]
    shard_lines = [line for line in lines if line.startswith("shard")]
    count = len(shard_lines)
    assert lines[0] == f"router: exec garin router --shards {count}"
    for index, line in enumerate(shard_lines):
        assert line == f"shard{index}: exec garin shard --shards {count} --index {index}"
    # .env must not fight it (an option beats the environment anyway).
    assert "\nGARIN_SHARDS=" not in ENV_EXAMPLE


def test_the_module_table_names_every_module():
    modules = [p for d in ("garin", "router", "shard") for p in sorted((ROOT / d).glob("*.py"))
               if p.name not in ("__init__.py", "__main__.py")]
    missing = [f"{p.parent.name}/{p.name}" for p in modules if f"`{p.parent.name}/{p.name}`" not in README]
    assert not missing, missing


def test_the_readme_computes_a_fallback_ban_subject_as_garin_does():
    (line,) = [line for line in README.splitlines() if line.startswith("python3 -c 'import hashlib")]
    argv = shlex.split(line)
    assert argv[:2] == ["python3", "-c"] and argv[3] == '{"username":"zed"}'
    for claims in ('{"username":"zed"}', '{"name":"Zoë","iss":"https://auth.example"}'):
        shown = subprocess.run([sys.executable, "-c", argv[2], claims], capture_output=True, text=True, check=True)
        assert shown.stdout.strip() == subject_of({**json.loads(claims), "exp": 1, "iat": 0})


def test_env_example_lines_are_plain_key_value_pairs():
    """systemd's EnvironmentFile= keeps a `# comment` after a value as part of
    the value (garin's .env reader and honcho strip it): every setting line,
    active or commented out for the reader to enable, is KEY=VALUE alone."""
    for line in ENV_EXAMPLE.splitlines():
        setting = line.removeprefix("# ")
        if line.startswith("#") and not re.match(r"[A-Z_][A-Z0-9_]*=", setting):
            continue  # prose
        assert line.strip() == "" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s#]*", setting), line


def test_shard_help_describes_the_settings_as_a_shard_uses_them():
    text = " ".join(CliRunner().invoke(main, ["shard", "--help"], terminal_width=200).output.split())
    for setting in SETTINGS:
        if setting.shard_help:
            assert setting.name in SHARD_SETTINGS, setting.env
            assert f"{setting.shard_help} [env " in text and f"{setting.help} [env " not in text, setting.env
    for name in ("routers", "max_connections", "metrics_port"):
        assert BY_NAME[name].shard_help, name

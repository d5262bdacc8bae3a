"""The README, .env.example and --help stay true to the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from garin.cli import main
from garin.closes import ALL_CLOSES
from garin.config import SETTINGS

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


@pytest.mark.parametrize("command", ["run", "router", "shard"])
def test_help_lists_every_setting(command):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for setting in SETTINGS:
        assert setting.option in result.output and setting.env in result.output


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

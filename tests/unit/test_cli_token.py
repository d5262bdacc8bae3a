"""`garin token`: the lifetime it is given, or one line saying why not."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner, Result

from garin.cli import main

SECRET = "s" * 40


pytestmark = pytest.mark.usefixtures("no_settings")


def token(*args: str) -> Result:
    return CliRunner().invoke(main, ["token", "alice", *args], env={"JWT_DECODE_SECRET": SECRET})


def claims(result: Result) -> dict[str, object]:
    assert result.exit_code == 0, result.output
    decoded: dict[str, object] = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"],
                                            options={"verify_exp": False})
    return decoded


@pytest.mark.parametrize("ttl, seconds", [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                          ("45", 45), ("0.5s", 0), (" 2m ", 120)])
def test_a_lifetime_sets_exp(ttl: str, seconds: int) -> None:
    before = int(time.time())
    got = claims(token("--ttl", ttl))
    assert isinstance(got["exp"], int) and isinstance(got["iat"], int)
    assert before <= got["iat"] <= time.time()
    assert got["exp"] - got["iat"] in (seconds, seconds + 1)


def test_the_default_lifetime_is_an_hour() -> None:
    got = claims(token())
    assert isinstance(got["exp"], int) and isinstance(got["iat"], int)
    assert got["exp"] - got["iat"] == 3600


def test_zero_is_a_token_that_never_expires() -> None:
    assert "exp" not in claims(token("--ttl", "0"))


@pytest.mark.parametrize("ttl", ["0s", "0m", "0.0", "00h", "-1h", "-5", "soon", "1e3", "", "none", "never"])
def test_a_lifetime_that_is_not_more_than_zero_is_one_line(ttl: str) -> None:
    """`0s` used to mint a token that was expired when printed; `none` and
    `never` were taken, undocumented, for "no expiry"."""
    result = token("--ttl", ttl)
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"garin: error: --ttl must be a duration like 90s, 30m, 12h or 7d, "
                     f"or 0 for a token that never expires; not {ttl.strip()!r}"]


def test_help_describes_every_option_and_the_readme_shows_the_default_lifetime() -> None:
    result = CliRunner().invoke(main, ["token", "--help"], terminal_width=200)
    (line,) = [line for line in result.output.splitlines() if "--jwt-algorithm" in line]
    assert "Algorithm to sign with: HS256, HS384 or HS512" in line
    ttl = next(p for p in main.commands["token"].params if p.name == "ttl").default
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (row,) = [row for row in readme.splitlines() if row.startswith("| `garin token ")]
    assert row.startswith(f"| `garin token USERNAME [--ttl {ttl}]` |")

"""`garin ban`: which file it uses, bad durations, broken files; one line each."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from garin.bans import FOREVER
from garin.banstore import BanStore
from garin.cli import main


@pytest.fixture(autouse=True)
def elsewhere(no_settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no .env, no GARIN_* from the caller's
    environment, and a state home of its own."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return work


@pytest.fixture
def default_db(tmp_path: Path) -> Path:
    """Where the ban list is by default: $XDG_STATE_HOME/garin/bans.sqlite3."""
    return tmp_path / "state" / "garin" / "bans.sqlite3"


def ban(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["ban", *args], env=env)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("garin: error: "), result.output
    return lines[0]


def test_every_command_names_the_absolute_file(default_db: Path) -> None:
    path = default_db
    added = ban("add", "zed")
    assert added.exit_code == 0 and added.stdout == f"banned zed (ban list: {path})\n"
    listed = ban("list")
    assert listed.stdout.splitlines() == [f"1 active ban (ban list: {path})", "zed\tuntil removed\tmanual"]
    removed = ban("remove", "zed")
    assert removed.stdout == f"unbanned zed (ban list: {path})\n"
    assert ban("list").stdout == f"no active bans (ban list: {path})\n"
    assert str(path) in one_line_error(ban("remove", "zed"))


def test_list_shows_subjects_and_reasons_escaped(default_db: Path) -> None:
    """A subject is whatever a token says: control and format characters
    cannot break the listing's lines and columns or reach the terminal."""
    hostile = "zed\n1 active ban\x1b[2J\tuntil removed\u202e\\"
    default_db.parent.mkdir(parents=True)
    BanStore(default_db).add(hostile, None, "spam\r\x07", now=time.time())
    lines = ban("list").stdout.splitlines()
    assert lines[1:] == ["zed\\n1 active ban\\x1b[2J\\tuntil removed\\u202e\\\\\tuntil removed\tspam\\r\\x07"]


@pytest.mark.parametrize("command", [["list"], ["add", "zed"], ["remove", "zed"]])
def test_ban_db_option_beats_the_environment_and_dotenv(elsewhere: Path, tmp_path: Path, command: list[str]) -> None:
    (elsewhere / ".env").write_text("GARIN_BAN_DB=from-dotenv.sqlite3\n")
    chosen = tmp_path / "chosen.sqlite3"
    BanStore(chosen).add("zed", None, "manual", now=0)
    result = ban(*command, "--ban-db", str(chosen), GARIN_BAN_DB=str(tmp_path / "from-env.sqlite3"))
    assert str(chosen) in result.output, result.output
    assert not (elsewhere / "from-dotenv.sqlite3").exists() and not (tmp_path / "from-env.sqlite3").exists()


def test_environment_and_dotenv_are_read_and_relative_paths_resolved(elsewhere: Path) -> None:
    (elsewhere / ".env").write_text("GARIN_BAN_DB=sub/dotenv.sqlite3\n")
    (elsewhere / "sub").mkdir()
    assert f"(ban list: {elsewhere / 'sub' / 'dotenv.sqlite3'})" in ban("add", "zed").stdout
    assert f"(ban list: {elsewhere / 'env.sqlite3'})" in ban("add", "zed", GARIN_BAN_DB="env.sqlite3").stdout


def test_list_and_remove_do_not_create_a_file(elsewhere: Path, tmp_path: Path) -> None:
    listed = ban("list")
    assert listed.exit_code == 0 and "no such file yet" in listed.stdout
    assert "no such file" in one_line_error(ban("remove", "zed"))
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "state").exists()


def test_the_default_is_the_same_file_from_any_directory(elsewhere: Path, default_db: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert ban("add", "zed").stdout == f"banned zed (ban list: {default_db})\n"
    other = elsewhere / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    assert ban("list").stdout.splitlines()[1] == "zed\tuntil removed\tmanual"
    # Created private, as the XDG spec asks: the list names users.
    for directory in (default_db.parent, default_db.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    assert list(elsewhere.iterdir()) == [other]


def test_without_xdg_state_home_the_default_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / ".local" / "state" / "garin" / "bans.sqlite3"
    assert ban("add", "zed").stdout == f"banned zed (ban list: {path})\n"
    assert path.exists()


@pytest.mark.parametrize("duration", ["0s", "0m", "0.0", "00h", "-1h", "-5", "soon", "1e3", "", "none", "never"])
def test_zero_negative_and_bad_durations_are_refused(elsewhere: Path, default_db: Path, duration: str) -> None:
    line = one_line_error(ban("add", "zed", "--for", duration))
    assert "--for must be a duration" in line and repr(duration) in line
    assert list(elsewhere.iterdir()) == []  # nothing was banned, no file made
    assert not default_db.exists()


@pytest.mark.parametrize("duration, seconds", [("0", FOREVER), ("90s", 90), ("30m", 1800), ("1.5h", 5400), ("7d", 604800), ("45", 45)])
def test_good_durations(default_db: Path, duration: str, seconds: float) -> None:
    before = time.time()
    result = ban("add", "zed", "--for", duration)
    assert result.exit_code == 0
    assert result.stdout.startswith("banned zed" + ("" if seconds == FOREVER else f" for {duration}") + " (ban list: ")
    until = BanStore(default_db).active(before)["zed"]
    assert until == FOREVER if seconds == FOREVER else before + seconds <= until <= time.time() + seconds


@pytest.mark.parametrize("command", [["list"], ["add", "zed"], ["remove", "zed"]])
@pytest.mark.parametrize("content", [b"this is not a database, just text " * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_corrupt_file_is_one_line(default_db: Path, command: list[str], content: bytes) -> None:
    path = default_db
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    line = one_line_error(ban(*command))
    assert str(path) in line
    assert path.read_bytes() == content


def test_a_missing_directory_is_created(elsewhere: Path) -> None:
    path = elsewhere / "missing" / "bans.sqlite3"
    assert ban("add", "zed", "--ban-db", str(path)).exit_code == 0
    assert path.exists() and path.parent.stat().st_mode & 0o777 == 0o700


def test_an_unusable_directory_is_one_line(elsewhere: Path) -> None:
    (elsewhere / "a-file").write_text("")
    line = one_line_error(ban("add", "zed", "--ban-db", str(elsewhere / "a-file" / "bans.sqlite3")))
    assert "a-file" in line and "unable to open" in line


def test_empty_ban_db_means_bans_are_off() -> None:
    assert one_line_error(ban("list", GARIN_BAN_DB="")) == "garin: error: GARIN_BAN_DB is empty: the ban list is turned off"
    # The option given is the one named.
    assert one_line_error(ban("add", "zed", "--ban-db", "")) == "garin: error: --ban-db is empty: the ban list is turned off"
    assert one_line_error(ban("list", "--ban-db", "", GARIN_BAN_DB="x")).startswith("garin: error: --ban-db is empty")


@pytest.mark.parametrize("command", ["list", "add", "remove"])
def test_help_shows_ban_db(command: str) -> None:
    result = CliRunner().invoke(main, ["ban", command, "--help"], terminal_width=200)
    assert "--ban-db" in result.output and "GARIN_BAN_DB" in result.output


# coredis leaves memory streams unclosed when a connection fails: collected
# here, so that their warnings do not land on another test.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("command", [("list",), ("add", "zed"), ("remove", "zed")])
def test_an_unreachable_redis_is_one_line_naming_the_error(command: tuple[str, ...]) -> None:
    pytest.importorskip("coredis")
    line = one_line_error(ban(*command, GARIN_REDIS_URL="redis://:hunter22@127.0.0.1:1/0"))
    gc.collect()
    assert line.startswith("garin: error: cannot use the ban list in Redis: ConnectionError: "), line
    assert "hunter22" not in line


def test_an_old_ban_list_in_the_working_directory_is_warned_about(elsewhere: Path, default_db: Path) -> None:
    """Older garin versions kept the list in ./garin-bans.sqlite3: an
    operator listing bans after the upgrade must learn why they are gone."""
    old = elsewhere / "garin-bans.sqlite3"
    assert ban("add", "old-offender", GARIN_BAN_DB=str(old)).exit_code == 0
    listed = ban("list")
    assert listed.exit_code == 0
    assert listed.stdout.startswith(f"no active bans (ban list: {default_db}")
    warning = listed.stderr.strip()
    assert warning.startswith("garin: warning: ") and f"GARIN_BAN_DB={old}" in warning, listed.stderr
    # Named explicitly, the old file is used, and nothing is said.
    kept = ban("list", GARIN_BAN_DB=str(old))
    assert kept.stderr == "" and "old-offender" in kept.stdout
    # Without the old file, nothing is said either.
    old.unlink()
    assert ban("list").stderr == ""


def test_add_and_remove_echo_the_subject_escaped_as_list_does(default_db: Path) -> None:
    """A raw newline would let a subject forge a line of output ('[fake] line')."""
    hostile = "evil\n[fake] line\x1b[2J"
    shown = "evil\\n[fake] line\\x1b[2J"
    assert ban("add", hostile).stdout == f"banned {shown} (ban list: {default_db})\n"
    assert ban("remove", hostile).stdout == f"unbanned {shown} (ban list: {default_db})\n"
    assert one_line_error(ban("remove", hostile)) == f"garin: error: {shown} is not banned (ban list: {default_db})"

"""garin.clientcounts: the routers' shared counts per client, in a real
memory-mapped file, with real processes as the owners of rows."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from garin import clientcounts
from garin.clientcounts import SLOTS, ClientCounts, bucket_of


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to own a row, as another router would."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def no_refresh_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # Look at the rows' owners at every question, not once a second.
    monkeypatch.setattr(clientcounts, "REFRESH_S", 0.0)


def test_a_router_sees_what_the_others_hold(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    mine = ClientCounts(tmp_path)
    other = ClientCounts(tmp_path, pid=sleeper.pid)
    assert mine.claimed and other.claimed
    other.add("10.0.0.1", 1)
    other.add("10.0.0.1", 1)
    mine.add("10.0.0.1", 5)  # its own count is not "elsewhere"
    assert mine.elsewhere("10.0.0.1") == 2
    assert other.elsewhere("10.0.0.1") == 5
    other.add("10.0.0.1", -1)
    assert mine.elsewhere("10.0.0.1") == 1
    assert mine.elsewhere("10.0.0.2") == (1 if bucket_of("10.0.0.2") == bucket_of("10.0.0.1") else 0)


def test_counts_cross_processes(tmp_path: Path) -> None:
    mine = ClientCounts(tmp_path)
    script = (
        "import sys, time\n"
        "from garin.clientcounts import ClientCounts\n"
        f"counts = ClientCounts({str(tmp_path)!r})\n"
        "counts.add('192.0.2.7', 3)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            assert mine.elsewhere("192.0.2.7") == 3
        finally:
            proc.kill()
    # Its owner is gone: its row no longer counts.
    assert mine.elsewhere("192.0.2.7") == 0


def test_the_row_of_a_dead_router_is_ignored_then_reused(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = ClientCounts(tmp_path, pid=proc.pid)
    dead.add("10.0.0.1", 7)
    mine = ClientCounts(tmp_path)
    assert mine.elsewhere("10.0.0.1") == 7
    proc.kill()
    proc.wait()
    assert mine.elsewhere("10.0.0.1") == 0
    # The next router to start takes the free row, emptied.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as again:
        try:
            newcomer = ClientCounts(tmp_path, pid=again.pid)
            assert newcomer._row == dead._row
            assert mine.elsewhere("10.0.0.1") == 0
            newcomer.add("10.0.0.1", 1)
            assert mine.elsewhere("10.0.0.1") == 1
        finally:
            again.kill()


def test_a_reused_pid_is_not_taken_for_the_router(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    other = ClientCounts(tmp_path, pid=sleeper.pid)
    other.add("10.0.0.1", 4)
    # The row says the same pid but another start time: a process that
    # merely got the dead router's pid.
    other._cells[other._row * clientcounts._OWNER + 1] ^= 1  # type: ignore[operator]
    mine = ClientCounts(tmp_path)
    assert mine.elsewhere("10.0.0.1") == 0


def test_close_gives_the_row_back(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    other = ClientCounts(tmp_path, pid=sleeper.pid)
    other.add("10.0.0.1", 2)
    mine = ClientCounts(tmp_path)
    assert mine.elsewhere("10.0.0.1") == 2
    other.close()
    assert mine.elsewhere("10.0.0.1") == 0


def test_with_every_row_taken_a_router_counts_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    routers = [ClientCounts(tmp_path) for _ in range(SLOTS)]
    assert all(r.claimed for r in routers)
    assert len({r._row for r in routers}) == SLOTS
    extra = ClientCounts(tmp_path)
    assert not extra.claimed
    assert "counts connections per client alone" in caplog.text
    extra.add("10.0.0.1", 1)  # a no-op, not an error
    routers[0].add("10.0.0.1", 1)
    assert extra.elsewhere("10.0.0.1") == 1


def test_a_count_never_goes_below_zero(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    other = ClientCounts(tmp_path, pid=sleeper.pid)
    other.add("10.0.0.1", -1)  # a bug elsewhere must not take the router down
    assert ClientCounts(tmp_path).elsewhere("10.0.0.1") == 0


def test_the_file_is_private(tmp_path: Path) -> None:
    ClientCounts(tmp_path)
    assert os.stat(tmp_path / clientcounts.FILE_NAME).st_mode & 0o077 == 0


def test_a_new_router_counts_at_once_a_dead_one_stops_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clientcounts, "REFRESH_S", 1.0)
    mine = ClientCounts(tmp_path)
    assert mine.elsewhere("10.0.0.1") == 0
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        other = ClientCounts(tmp_path, pid=proc.pid)
        other.add("10.0.0.1", 1)
        assert mine.elsewhere("10.0.0.1") == 1  # its row appeared: read now
        proc.kill()
    assert mine.elsewhere("10.0.0.1") == 1  # its death is looked up once a second
    time.sleep(1.05)
    assert mine.elsewhere("10.0.0.1") == 0


def test_without_process_start_times_a_router_counts_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # /proc/PID/stat unreadable (another OS, another PID namespace): rows
    # could not be told apart, so none is claimed nor read.
    other = ClientCounts(tmp_path)
    other.add("10.0.0.1", 3)
    monkeypatch.setattr(clientcounts, "_start_time", lambda pid: None)
    alone = ClientCounts(tmp_path)
    assert not alone.claimed and "counts connections per client alone" in caplog.text
    alone.add("10.0.0.1", 1)
    assert alone.elsewhere("10.0.0.1") == 0
    monkeypatch.undo()
    assert ClientCounts(tmp_path).elsewhere("10.0.0.1") == 3
    alone.close()


def test_an_owner_that_cannot_be_looked_up_is_taken_for_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeper: subprocess.Popen[bytes]
) -> None:
    # Out of descriptors, say: its row is neither stolen nor ignored.
    other = ClientCounts(tmp_path, pid=sleeper.pid)
    other.add("10.0.0.1", 2)
    real = clientcounts._start_time
    monkeypatch.setattr(clientcounts, "_start_time", lambda pid: None if pid == sleeper.pid else real(pid))
    mine = ClientCounts(tmp_path)
    assert mine._row != other._row
    assert mine.elsewhere("10.0.0.1") == 2


def test_no_room_for_the_row_means_counting_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full filesystem: the row is allocated before the map is written to
    # (a write through the map there would be SIGBUS, the router's death).
    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        if offset > 0:  # the owners' page fits, the row does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    alone = ClientCounts(tmp_path)
    assert not alone.claimed
    assert "No space left on device" in caplog.text
    alone.add("10.0.0.1", 1)  # a no-op
    monkeypatch.undo()
    assert ClientCounts(tmp_path).elsewhere("10.0.0.1") == 0


def test_a_full_filesystem_is_survived_not_sigbus(tmp_path: Path) -> None:
    # The real thing: a tiny tmpfs, filled, and routers that start on it.
    # A write (or a read of a hole) through the map there would kill the
    # process with SIGBUS; each must instead count alone or read what is
    # allocated. Needs root (mount); run in a child so a SIGBUS shows.
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        script = (
            "import subprocess, sys\n"
            "from garin.clientcounts import ClientCounts\n"
            f"a = ClientCounts({str(mnt)!r}); a.add('10.0.0.1', 5)\n"
            f"subprocess.run(['dd', 'if=/dev/zero', 'of={mnt}/fill', 'bs=4k'], capture_output=True)\n"
            f"b = ClientCounts({str(mnt)!r})\n"
            "print(a.claimed, b.claimed, b.elsewhere('10.0.0.1'), a.elsewhere('10.0.0.1'))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "False", "5", "0"]
        assert "no room for this router's row (No space left on device)" in result.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

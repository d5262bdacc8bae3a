"""No unit test touches the real home: the default ban list
($XDG_STATE_HOME/garin/bans.sqlite3) points into a temporary directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture
def no_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For the commands' tests: the working directory is `tmp_path` (no
    .env), and no garin setting comes from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("GARIN_") or name in ("PORT", "JWT_DECODE_SECRET", "ALLOWED_ORIGINS"):
            monkeypatch.delenv(name)
    return tmp_path

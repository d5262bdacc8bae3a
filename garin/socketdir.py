"""The socket directory (GARIN_SOCKET_DIR): the shards' Unix sockets, the
routers' shared connection counts, and the metrics files live there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from garin.clientcounts import FILE_NAME as CLIENT_COUNTS
from garin.config import ConfigError


def prepare_socket_dir(path: Path) -> None:
    """Create the socket directory private to this user, or refuse a shared
    one; ConfigError names GARIN_SOCKET_DIR."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"GARIN_SOCKET_DIR: {path} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"GARIN_SOCKET_DIR: cannot create {path}: {exc.strerror}") from None
    if info.st_uid != os.getuid():
        raise ConfigError(f"GARIN_SOCKET_DIR: {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def remove_socket_dir(path: Path) -> None:
    """What garin put there, and the directory if nothing else is left."""
    if not path.is_dir():
        return
    shutil.rmtree(path / "metrics", ignore_errors=True)
    for entry in path.glob("shard-*.sock"):
        entry.unlink(missing_ok=True)
    (path / CLIENT_COUNTS).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: something else lives there; leave it

"""The type checker is part of the tests: `mypy --strict` over the garin
package (garin/, with router/ and shard/ as garin.router and garin.shard, as
installed) must stay clean.

mypy cannot follow setuptools' package-dir mapping, so the package is laid
out as installed in a temporary directory (copies, not links: mypy resolves
links to their real paths and would name the modules after those)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def installed_layout(target: Path) -> Path:
    package = target / "garin"
    shutil.copytree(ROOT / "garin", package, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("router", "shard"):
        shutil.copytree(ROOT / sub, package / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    package = installed_layout(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), str(package)],
        cwd=tmp_path / "src", capture_output=True, text=True, timeout=300,
    )
    # Name the files as they are in the repository.
    report = (result.stdout + result.stderr).replace("garin/router/", "router/").replace("garin/shard/", "shard/")
    assert result.returncode == 0, report

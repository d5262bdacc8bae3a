"""The type checker is part of the tests: `mypy --strict` over the garin
package (garin/, with router/ and shard/ as garin.router and garin.shard, as
installed) and the benchmark tools (scripts/garin_bench as garin_bench, and
the entry scripts scripts/*.py) must stay clean.

mypy cannot follow setuptools' package-dir mapping, so the package is laid
out as installed in a temporary directory (copies, not links: mypy resolves
links to their real paths and would name the modules after those)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def installed_layout(target: Path) -> list[Path]:
    """What to check, laid out as installed under `target`."""
    skip = shutil.ignore_patterns("__pycache__")
    package = target / "garin"
    shutil.copytree(ROOT / "garin", package, ignore=skip)
    for sub in ("router", "shard"):
        shutil.copytree(ROOT / sub, package / sub, ignore=skip)
    bench = target / "garin_bench"
    shutil.copytree(ROOT / "scripts" / "garin_bench", bench, ignore=skip)
    entries = target / "entry_scripts"
    entries.mkdir()
    for script in sorted((ROOT / "scripts").glob("*.py")):
        shutil.copy(script, entries / script.name)
    return [package, bench, *sorted(entries.glob("*.py"))]


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    paths = installed_layout(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), *map(str, paths)],
        cwd=tmp_path / "src", capture_output=True, text=True, timeout=300,
    )
    # Name the files as they are in the repository.
    report = (
        (result.stdout + result.stderr)
        .replace("garin/router/", "router/").replace("garin/shard/", "shard/")
        .replace("garin_bench/", "scripts/garin_bench/").replace("entry_scripts/", "scripts/")
    )
    assert result.returncode == 0, report

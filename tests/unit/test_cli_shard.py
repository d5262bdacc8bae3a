"""`garin shard`: which shard it is, or one line saying why not."""

from __future__ import annotations

import pytest
from click.testing import CliRunner, Result

from garin.cli import main

pytestmark = pytest.mark.usefixtures("no_settings")


def shard(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["shard", *args], env=env)


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--shards", "4"], {"HONCHO_PROCESS_NAME": "shard.9"},
     "HONCHO_PROCESS_NAME=shard.9 (index 8) is outside 0..3 (--shards 4)"),
    ([], {"HONCHO_PROCESS_NAME": "shard5", "GARIN_SHARDS": "4"},
     "HONCHO_PROCESS_NAME=shard5 (index 4) is outside 0..3 (GARIN_SHARDS=4)"),
    (["--index", "4", "--shards", "4"], {"HONCHO_PROCESS_NAME": "shard.1"}, "--index 4 is outside 0..3 (--shards 4)"),
    (["--index", "2"], {}, "--index 2 is outside 0..1 (GARIN_SHARDS=2)"),
])
def test_an_index_out_of_range_names_where_index_and_count_came_from(args: list[str], env: dict[str, str], line: str) -> None:
    result = shard(*args, **env)
    assert result.exit_code == 2
    assert result.stderr == f"garin: error: {line}\n"

"""garin.routing: room -> shard must be the same in every process and every run."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin.routing import HASH_NAME, shard_for


def test_hash_name() -> None:
    # Travels in the router's hello; a shard compares it with its own.
    assert HASH_NAME == "crc32"


# Pinned CRC-32 (IEEE) values. 0x3610A686 and 0x414FA339 are the published
# check values for "hello" and the quick-brown-fox sentence. If any of these
# change, rooms would move between shards across a mixed deploy.
PINNED = [
    ("", 0x00000000),
    ("hello", 0x3610A686),
    ("The quick brown fox jumps over the lazy dog", 0x414FA339),
    ("lobby", 0xCCE455F7),
    ("general", 0xCE29364A),
    ("café", 0x98AD42B5),  # UTF-8, not Latin-1
    ("日本語", 0xA80B52E5),
]


@pytest.mark.parametrize(("room", "crc"), PINNED)
def test_pinned_crc32(room: str, crc: int) -> None:
    assert zlib.crc32(room.encode("utf-8")) == crc
    for shards in (1, 2, 3, 4, 7, 16, 256):
        assert shard_for(room, shards) == crc % shards


@pytest.mark.parametrize(
    ("room", "shards", "shard"),
    [
        ("hello", 4, 2),
        ("hello", 16, 6),
        ("hello", 3, 1),
        ("lobby", 4, 3),
        ("lobby", 7, 1),
        ("general", 4, 2),
        ("general", 16, 10),
        ("café", 4, 1),
        ("日本語", 7, 5),
        ("The quick brown fox jumps over the lazy dog", 16, 9),
        ("", 5, 0),
    ],
)
def test_pinned_shards(room: str, shards: int, shard: int) -> None:
    assert shard_for(room, shards) == shard


@pytest.mark.parametrize("room", ["lobby", "x" * 1000, "日本語", "a b c", "😀😀😀"])
def test_one_shard_takes_everything(room: str) -> None:
    assert shard_for(room, 1) == 0


@settings(max_examples=200, deadline=None)
@given(room=st.text(st.characters(exclude_categories=("Cs",))), shards=st.integers(1, 1024))
def test_in_range_and_stable(room: str, shards: int) -> None:
    shard = shard_for(room, shards)
    assert 0 <= shard < shards
    assert shard_for(room, shards) == shard
    assert shard == zlib.crc32(room.encode()) % shards


def test_case_and_whitespace_matter() -> None:
    # Rooms are exact strings: these are different rooms, routed independently.
    values = {shard_for(room, 2**31) for room in ["lobby", "Lobby", "LOBBY", " lobby", "lobby "]}
    assert len(values) == 5


@pytest.mark.parametrize("shards", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("pattern", ["room-{}", "{}", "user{}-chat", "ルーム{}"])
def test_distribution(shards: int, pattern: str) -> None:
    rooms = 20_000
    counts = Counter(shard_for(pattern.format(i), shards) for i in range(rooms))
    assert set(counts) == set(range(shards))
    mean = rooms / shards
    for shard, count in counts.items():
        assert abs(count - mean) < 0.15 * mean, (shard, count, mean)

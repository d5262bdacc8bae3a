"""Which shard owns a room.

The hash must agree across every process and every run, so Python's salted
`hash()` is out. CRC-32 is stable, in the standard library and fast; its
name travels in the router's hello so a shard can refuse a router that routes
differently (a different function or shard count would split rooms silently).
"""

from __future__ import annotations

import zlib

HASH_NAME = "crc32"


def shard_for(room: str, shards: int) -> int:
    return zlib.crc32(room.encode()) % shards

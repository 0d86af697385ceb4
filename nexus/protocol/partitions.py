"""Which partition of a group an event belongs to: the one rule the router (intake,
dead-letter replay, recovery, fan-out, fetch) applies, and a producer or member may.

An event is partitioned by its `key`, or by its `source` when it has none; the key's
hash is stable across processes and Python versions (unlike hash()), and the journal
stores it (`Entry.khash`), so changing it would move journaled events to other
partitions.
"""

from __future__ import annotations

import zlib


def partition_key(key: str | None, source: str) -> str:
    """The string an event is partitioned by."""
    return source if key is None else key


def key_hash(key: str) -> int:
    """The stable hash of a partition key (CRC-32 of its UTF-8, lone surrogates kept)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


def partition_of(khash: int, partitions: int) -> int:
    """The partition, of a group with `partitions` partitions, of a key with hash `khash`."""
    return khash % partitions

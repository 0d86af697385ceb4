"""The partition rule (nexus/protocol/partitions.py): pinned, because the journal stores
each event's key hash and a changed hash would move journaled events to other partitions."""

from __future__ import annotations

import pytest

from nexus.protocol.events import Event
from nexus.protocol.partitions import key_hash, partition_key, partition_of


@pytest.mark.parametrize(
    ("key", "khash", "of16"),
    [
        ("src", 1615078541, 13),
        ("k1", 2517541033, 9),
        ("bench-0", 2530901313, 1),
        ("", 0, 0),
        ("ключ", 212833818, 10),  # UTF-8
        ("\udc80", 1697699323, 11),  # a lone surrogate hashes, never raises
    ],
)
def test_key_hash_and_partition_are_pinned(key, khash, of16):
    assert key_hash(key) == khash
    assert partition_of(khash, 16) == of16
    assert partition_of(khash, 1) == 0


def test_an_event_is_partitioned_by_its_key_or_else_its_source():
    assert partition_key("k1", "s1") == "k1"
    assert partition_key("", "s1") == ""  # an empty key is a key
    assert partition_key(None, "s1") == "s1"
    event = Event(type="a.b", source="s1", payload={}, id="e1", time=1.0)
    assert event.partition_key == "s1"

"""Unit tests for nexus/backlog.py: lag kept incrementally (issue 10 #17)."""
from __future__ import annotations

from nexus import backlog
from nexus.backlog import Backlog


def test_lag_counts_seqs_after_each_partition_cursor():
    b = Backlog()
    b.add_group("g", [0, 0])
    b.streams["g"][0].add([1, 3, 5])
    b.streams["g"][1].add([2, 4])
    assert b.lag("g", [0, 0]) == 5
    assert b.lag("g", [3, 2]) == 2
    assert b.lag("g", [5, 4]) == 0
    assert b.lag("unknown", []) == 0


def test_rewound_cursor_is_marked_at_least(monkeypatch):
    b = Backlog()
    b.add_group("g", [10])
    st = b.streams["g"][0]
    st.add(range(11, 10_000))
    assert b.lag("g", [9_000]) == 999
    assert b.lag("g", [10]) == ">=999"          # rewound below what was trimmed (a replay)
    monkeypatch.setattr(backlog, "TRACK_MAX", 100)
    st.add(range(10_000, 10_200))
    assert isinstance(b.lag("g", [9_000]), str)    # the oldest were forgotten: at least N
    assert b.lag("g", [10_199]) == 0

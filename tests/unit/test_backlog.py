"""Unit tests for nexus/router/backlog.py: lag kept incrementally (issue 10 #17)."""

from __future__ import annotations

from nexus.router import backlog
from nexus.router.backlog import Backlog


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
    assert b.lag("g", [10]) == ">=999"  # rewound below what was trimmed (a replay)
    monkeypatch.setattr(backlog, "EXACT_MAX", 100)  # small windows: the same forgetting
    monkeypatch.setattr(backlog, "EVERY", 10)
    monkeypatch.setattr(backlog, "TRACK_MAX", 4)
    st.add(range(10_000, 10_200))
    assert isinstance(b.lag("g", [9_000]), str)  # the oldest were forgotten: at least N
    assert b.lag("g", [10_199]) == 0


def test_a_big_backlog_costs_a_checkpoint_per_block_not_8_bytes_per_event():
    """Review #19: every unacked seq was kept (8 MiB per partition per group at 1M). The
    newest EXACT_MAX are kept exactly, older ones as one checkpoint per EVERY seqs: lag
    is exact at a block boundary or among the newest, else ">=N" within EVERY."""
    b = Backlog()
    b.add_group("g", [0])
    st = b.streams["g"][0]
    n = 1_000_000
    seqs = range(3, 3 * n + 1, 3)  # one partition's seqs among others
    for i in range(0, n, 10_000):
        st.add(seqs[i : i + 10_000])
    assert sum(a.itemsize * len(a) for a in (st.seqs, getattr(st, "marks", st.seqs[:0]))) < 2 * 2**20
    assert len(st.seqs) <= backlog.EXACT_MAX and len(st.marks) <= n // backlog.EVERY
    assert b.lag("g", [0]) == n  # the cursor is the first block's lower bound
    boundary = st.marks[1000]
    assert b.lag("g", [boundary]) == n - seqs.index(boundary) - 1  # a block boundary: exact
    inside = boundary + 3 * 100
    lag = b.lag("g", [inside])
    true = n - seqs.index(inside) - 1
    assert isinstance(lag, str) and true - backlog.EVERY < int(lag[2:]) <= true
    newest = st.seqs[10]  # (cursors only move on: checkpoints are dropped)
    assert b.lag("g", [newest]) == n - seqs.index(newest) - 1  # among the exact ones
    st.add_one(3 * n + 3)
    assert b.lag("g", [3 * n]) == 1

"""Unit tests for nexus/router/journalread.py: the `Read` coord request over a real journal
(type globs, positions, bounds, gaps after retention, dead-letter replays left out)."""

from __future__ import annotations

import os

import msgspec

from nexus.protocol.events import decode_wire_event, encode, new_id
from nexus.protocol.wire import Journaled, Read, coord_decoder, encoder
from nexus.router import journalread
from nexus.router.journal import Journal, encode_entries


def wire_event(type_: str, n: int, pad: int = 0) -> msgspec.Raw:
    return msgspec.Raw(
        encode({"type": type_, "source": "t", "payload": {"n": n, "pad": "x" * pad}, "id": new_id(), "time": 1.0})
    )


def journal_of(path, types: list[str], pad: int = 0, **kw) -> Journal:
    j = Journal(str(path), fsync="never", **kw)
    j.open()
    for i, t in enumerate(types):
        j.append(encode_entries([t], [0], [wire_event(t, i + 1, pad)], 1.0))
    return j


def numbers(reply: Journaled) -> list[int]:
    return [msgspec.msgpack.decode(decode_wire_event(bytes(e)).payload)["n"] for e in reply.events]


def test_reads_by_glob_in_order_and_says_where_to_go_on(tmp_path):
    types = ["a.x", "b.y", "a.z", "c.q", "a.x", "b.y"]
    j = journal_of(tmp_path / "j", types)
    got = journalread.read(j, Read(after=0, types=["a.*"]), 1000, 1 << 20)
    assert (got.seqs, numbers(got)) == ([1, 3, 5], [1, 3, 5])
    assert (got.first, got.last, got.upto) == (1, 6, 6)
    both = journalread.read(j, Read(after=2, types=["b.*", "c.q"]), 1000, 1 << 20)
    assert both.seqs == [4, 6]
    every = journalread.read(j, Read(after=0), 1000, 1 << 20)
    assert every.seqs == [1, 2, 3, 4, 5, 6]
    # caught up: nothing, upto stays at the end
    end = journalread.read(j, Read(after=6, types=["*"]), 1000, 1 << 20)
    assert (end.seqs, end.upto, end.last) == ([], 6, 6)
    # limit 0: only the positions
    pos = journalread.read(j, Read(after=0, limit=0), 1000, 1 << 20)
    assert (pos.seqs, pos.upto, pos.first, pos.last) == ([], 0, 1, 6)
    j.close()


def test_bounded_by_events_and_bytes_and_resumes_from_upto(tmp_path):
    j = journal_of(tmp_path / "j", ["a.x"] * 50, pad=1000)
    got = journalread.read(j, Read(after=0, limit=20), 10, 1 << 20)  # the router's fetch_limit wins
    assert got.seqs == list(range(1, 11)) and got.upto == 10
    small = journalread.read(j, Read(after=10, limit=1000, max_bytes=3000), 1000, 1 << 20)
    assert 1 <= len(small.seqs) <= 3 and small.seqs[0] == 11 and small.upto == small.seqs[-1]
    # paging from upto reads everything once
    seen, after = [], 0
    while True:
        page = journalread.read(j, Read(after=after, limit=7), 1000, 1 << 20)
        seen += page.seqs
        after = page.upto
        if after >= page.last:
            break
    assert seen == list(range(1, 51))
    j.close()


def test_filtered_scan_is_bounded_but_moves_on(tmp_path, monkeypatch):
    monkeypatch.setattr(journalread, "SCAN_RECORDS", 100)
    j = journal_of(tmp_path / "j", ["b.y"] * 300 + ["a.x"])
    got = journalread.read(j, Read(after=0, limit=1, types=["a.*"]), 1000, 1 << 20)
    assert got.seqs == [] and 0 < got.upto < 301  # stopped early: no events, but progress
    after, seen = got.upto, []
    while after < 301:
        page = journalread.read(j, Read(after=after, limit=1, types=["a.*"]), 1000, 1 << 20)
        assert page.upto > after
        after, seen = page.upto, seen + page.seqs
    assert seen == [301]
    j.close()


def test_first_seq_shows_a_gap_after_retention(tmp_path):
    j = journal_of(tmp_path / "j", ["a.x"] * 8, segment_bytes=40, retain=0.0)
    now = 2_000_000_000.0
    for seg in j.segments:
        os.utime(seg.path, (now - 10, now - 10))
    assert j.enforce_retention(5, now=now) > 0
    got = journalread.read(j, Read(after=2), 1000, 1 << 20)
    assert got.first > 3  # the reply says events 3 .. first-1 are gone
    assert got.seqs == list(range(got.first, 9))
    j.close()


def test_dead_letter_replays_are_left_out(tmp_path):
    j = journal_of(tmp_path / "j", ["a.x"])
    j.append(encode_entries(["a.x"], [0], [wire_event("a.x", 2)], 1.0, group="g"))  # a DLQ replay
    j.append(encode_entries(["a.x"], [0], [wire_event("a.x", 3)], 1.0))
    got = journalread.read(j, Read(after=0), 1000, 1 << 20)
    assert got.seqs == [1, 3]
    j.close()


def test_read_round_trips_on_the_wire():
    msg = coord_decoder.decode(encoder.encode(Read(after=5, limit=10, types=["a.*"])))
    assert msg == Read(after=5, limit=10, types=["a.*"])

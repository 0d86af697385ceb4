"""Unit tests for nexus/router/journal.py: segments, reads, recovery, retention, fsync."""

from __future__ import annotations

import os
import tempfile

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus.router.journal import HEADER, SUFFIX, Entry, Journal, entry_decoder, entry_encoder


def body(i: int, size: int = 10) -> bytes:
    return (f"r{i}:".encode() + b"x" * size)[: max(size, len(str(i)) + 2)]


def open_journal(path, **kw) -> Journal:
    """record_events=1 (unless given): one record per event, the layout these tests
    place their damage in by offset (and all a router wrote before batch records);
    batch records: tests/unit/test_journal_batch.py."""
    j = Journal(str(path), **{"fsync": "never", "record_events": 1, **kw})
    j.open()
    return j


def seg_files(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(SUFFIX))


def fill(j: Journal, n: int, per_call: int = 1) -> dict[int, bytes]:
    written = {}
    i = 0
    while i < n:
        chunk = [body(k) for k in range(i, min(n, i + per_call))]
        first = j.append(chunk)
        for off, b in enumerate(chunk):
            written[first + off] = b
        i += len(chunk)
    return written


# -- append and read ------------------------------------------------------------------
def test_empty_journal(tmp_path):
    j = open_journal(tmp_path / "j")
    assert j.last_seq == 0
    assert j.read(0, 10) == []
    assert list(j.iter_all()) == []
    assert j.first_seq() == 1
    assert j.append([]) == 1
    assert j.last_seq == 0
    assert seg_files(tmp_path / "j") == [f"{1:020d}{SUFFIX}"]
    j.close()


def test_append_returns_first_seq_and_reads_back(tmp_path):
    j = open_journal(tmp_path / "j")
    assert j.append([b"a", b"bb", b"ccc"]) == 1
    assert j.append([b"d"]) == 4
    assert j.last_seq == 4
    assert j.read(0, 100) == [(1, b"a"), (2, b"bb"), (3, b"ccc"), (4, b"d")]
    j.close()


def test_append_across_small_segments(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=64)
    written = fill(j, 40)
    files = seg_files(d)
    assert len(files) > 5
    # each segment file is named after its first seq, in order
    firsts = [int(f[: -len(SUFFIX)]) for f in files]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    assert [s.first for s in j.segments] == firsts
    assert j.read(0, 1000) == sorted(written.items())
    # a segment rolls over only after reaching segment_bytes
    for seg in j.segments[:-1]:
        assert seg.size >= 64
        assert seg.last == j.segments[j.segments.index(seg) + 1].first - 1
    j.close()


def test_a_batch_is_never_split_between_segments(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=40)
    j.append([b"a" * 30])  # 46 bytes: the segment is full
    j.append([b"b" * 30, b"c" * 30, b"d" * 30])  # goes to a new segment, whole
    assert [(s.first, s.last) for s in j.segments] == [(1, 1), (2, 4)]
    assert [s for s, _ in j.read(0, 10)] == [1, 2, 3, 4]
    j.close()


def test_read_boundaries(tmp_path):
    j = open_journal(tmp_path / "j", segment_bytes=100)
    written = fill(j, 30, per_call=3)
    last = j.last_seq
    assert last == 30
    assert [s for s, _ in j.read(0, 1000)] == list(range(1, 31))
    assert j.read(last, 10) == []
    assert j.read(last + 5, 10) == []
    assert j.read(last - 1, 10) == [(30, written[30])]
    assert j.read(0, 0) == []
    assert j.read(0, 1) == [(1, written[1])]
    assert j.read(7, 5) == [(s, written[s]) for s in range(8, 13)]
    # a read that spans a segment boundary
    boundary = j.segments[1].first
    assert [s for s, _ in j.read(boundary - 2, 4)] == list(range(boundary - 1, boundary + 3))
    j.close()


def test_iter_all(tmp_path):
    j = open_journal(tmp_path / "j", segment_bytes=80)
    written = fill(j, 57, per_call=4)
    assert list(j.iter_all()) == sorted(written.items())
    assert list(j.iter_all(chunk=3)) == sorted(written.items())
    assert list(j.iter_all(after=50, chunk=2)) == [(s, written[s]) for s in range(51, 58)]
    j.close()


def test_large_record_bigger_than_read_chunk(tmp_path):
    j = open_journal(tmp_path / "j")
    big = os.urandom(3 * 2**20)
    j.append([b"small", big, b"after"])
    assert j.read(0, 10) == [(1, b"small"), (2, big), (3, b"after")]
    assert j.read(1, 1) == [(2, big)]
    j.close()


def test_sparse_index_is_used_for_far_reads(tmp_path):
    j = open_journal(tmp_path / "j")
    bodies = [body(i) for i in range(2000)]
    j.append(bodies)
    seg = j.segments[0]
    assert seg.index_seqs[:4] == [1, 513, 1025, 1537]
    assert j.read(1500, 3) == [(1501, bodies[1500]), (1502, bodies[1501]), (1503, bodies[1502])]
    assert j.read(1536, 1) == [(1537, bodies[1536])]
    j.close()
    j2 = open_journal(tmp_path / "j")
    assert j2.segments[0].index_seqs[:4] == [1, 513, 1025, 1537]
    assert j2.read(1024, 2) == [(1025, bodies[1024]), (1026, bodies[1025])]
    j2.close()


# -- reopen and recovery -----------------------------------------------------------------
def test_reopen_recovers_last_seq_and_index(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=90)
    written = fill(j, 25, per_call=2)
    before = [(s.first, s.last, s.size, s.index_seqs, s.index_offsets) for s in j.segments]
    j.close()
    j2 = open_journal(d, segment_bytes=90)
    assert j2.last_seq == 25
    assert [(s.first, s.last, s.size, s.index_seqs, s.index_offsets) for s in j2.segments] == before
    assert j2.recovery.segments == len(before)
    assert j2.recovery.records == 25
    assert j2.recovery.truncated_bytes == 0
    assert j2.read(0, 100) == sorted(written.items())
    assert j2.append([b"next"]) == 26
    assert j2.read(25, 10) == [(26, b"next")]
    j2.close()
    j3 = open_journal(d, segment_bytes=90)
    assert j3.last_seq == 26
    j3.close()


def _last_file(d) -> str:
    return os.path.join(d, seg_files(d)[-1])


def test_torn_tail_is_truncated_and_appends_continue(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=100)
    written = fill(j, 20, per_call=2)
    last_seg = j.segments[-1]
    last_start = last_seg.first
    j.close()
    path = _last_file(d)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3)  # the last record loses its last 3 bytes
    j2 = open_journal(d, segment_bytes=100)
    rec = j2.recovery
    record_len = HEADER.size + len(written[20])
    assert rec.truncated_bytes == record_len - 3
    assert os.path.basename(path) in rec.truncated_at
    assert rec.truncated_at.strip() == f"{os.path.basename(path)}@{size - record_len}"
    assert j2.last_seq == 19
    assert os.path.getsize(path) == size - record_len
    assert [s for s, _ in j2.read(0, 100)] == list(range(1, 20))
    assert j2.segments[-1].first == last_start
    assert j2.append([b"again"]) == 20
    assert j2.read(18, 10) == [(19, written[19]), (20, b"again")]
    j2.close()
    j3 = open_journal(d, segment_bytes=100)
    assert j3.recovery.truncated_bytes == 0
    assert j3.read(19, 10) == [(20, b"again")]
    j3.close()


def test_torn_header_is_truncated(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    j.append([b"one", b"two"])
    j.close()
    path = _last_file(d)
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # shorter than a header
    j2 = open_journal(d)
    assert j2.recovery.truncated_bytes == 3
    assert j2.last_seq == 2
    assert j2.append([b"three"]) == 3
    assert j2.read(0, 10) == [(1, b"one"), (2, b"two"), (3, b"three")]
    j2.close()


def test_corrupt_byte_in_middle_of_last_segment(tmp_path):
    """Issue 10 #2: a damaged record followed by good ones is skipped, not truncated
    (this test asserted the old truncation before)."""
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [b"%03d-payload" % i for i in range(10)]
    j.append(bodies)
    j.close()
    path = _last_file(d)
    rec = HEADER.size + len(bodies[0])
    # flip one byte inside the body of the 5th record (seq 5)
    pos = 4 * rec + HEADER.size + 2
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    j2 = open_journal(d)
    assert j2.last_seq == 10
    assert j2.recovery.truncated_bytes == 0
    assert j2.recovery.records == 9
    assert os.path.getsize(path) == 10 * rec
    assert [dmg.describe() for dmg in j2.damage] == [
        {"segment": os.path.basename(path), "offset": 4 * rec, "bytes": rec, "first_seq": 5, "last_seq": 5}
    ]
    assert j2.read(0, 100) == [(i + 1, bodies[i]) for i in range(10) if i != 4]
    assert j2.read(4, 1) == [(6, bodies[5])]
    assert j2.append([b"new"]) == 11
    assert j2.read(10, 10) == [(11, b"new")]
    assert j2.info()["damaged_ranges"] == 1
    j2.close()


def test_corrupt_record_in_earlier_segment_keeps_later_segments(tmp_path):
    """Issue 10 #2: damage in a closed segment never removes later segments (this test
    asserted that they were removed before)."""
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=60)
    written = fill(j, 30)
    segs = [(s.path, s.first, s.last) for s in j.segments]
    assert len(segs) >= 4
    j.close()
    victim_path, victim_first, victim_last = segs[1]
    assert victim_last > victim_first  # at least two records in it
    # corrupt the seq field of the second record in segment #2
    rec = HEADER.size + len(written[victim_first])
    with open(victim_path, "r+b") as f:
        f.seek(rec + 8)
        f.write(b"\xff")
    j2 = open_journal(d, segment_bytes=60)
    assert seg_files(d) == [os.path.basename(p) for p, _, _ in segs]
    assert j2.last_seq == 30
    assert j2.recovery.truncated_bytes == 0
    assert [(x.first_seq, x.last_seq) for x in j2.damage] == [(victim_first + 1, victim_first + 1)]
    assert [s for s, _ in j2.read(0, 1000)] == [s for s in range(1, 31) if s != victim_first + 1]
    assert j2.append([b"cont"]) == 31
    j2.close()
    j3 = open_journal(d, segment_bytes=60)
    assert j3.last_seq == 31 and len(j3.damage) == 1
    j3.close()


def test_damaged_range_to_end_of_closed_segment_is_kept(tmp_path):
    """A closed segment whose tail is garbage (zeros, then random bytes) keeps its size;
    the damage reports the seqs up to the next segment's first."""
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=200)
    written = fill(j, 40)
    segs = [(s.path, s.first, s.last, s.size) for s in j.segments]
    j.close()
    path, first, last, size = segs[1]
    rec = HEADER.size + len(written[first])
    with open(path, "r+b") as f:
        f.seek(rec)
        f.write(bytes(20) + os.urandom(size - rec - 20))
    j2 = open_journal(d, segment_bytes=200)
    assert os.path.getsize(path) == size
    assert [(x.offset, x.bytes, x.first_seq, x.last_seq) for x in j2.damage] == [(rec, size - rec, first + 1, last)]
    assert [s for s, _ in j2.read(0, 1000)] == [s for s in range(1, 41) if not first < s <= last]
    assert all(body == written[s] for s, body in j2.read(0, 1000))
    j2.close()


def test_damage_found_while_reading_is_skipped_and_logged_once(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    written = fill(j, 20)
    rec = HEADER.size + len(written[1])
    with open(_last_file(d), "r+b") as f:  # damaged after open: found by read()
        f.seek(7 * rec + 3)
        f.write(b"\x00\x00\x00\x00")
    assert [s for s, _ in j.read(0, 100)] == [s for s in range(1, 21) if s != 8]
    assert [s for s, _ in j.read(5, 100)] == [s for s in range(6, 21) if s != 8]
    assert len(j.damage) == 1 and (j.damage[0].first_seq, j.damage[0].last_seq) == (8, 8)
    j.close()


def test_read_is_bounded_in_bytes_but_returns_at_least_one(tmp_path):
    j = open_journal(tmp_path / "j")
    j.append([b"x" * 1000 for _ in range(50)])
    assert len(j.read(0, 100, max_bytes=3500)) == 3
    assert len(j.read(0, 100, max_bytes=1)) == 1
    j.close()


def test_filtered_read_bounds_its_scan_and_says_where_it_stopped(tmp_path):
    j = open_journal(tmp_path / "j", segment_bytes=2000)
    written = fill(j, 100)
    even = lambda body: int(bytes(body).split(b":")[0][1:]) % 2 == 0
    got = j.read(0, 1000, want=even)
    assert [s for s, _ in got] == list(range(1, 101, 2)) and j.read_upto == 100
    assert all(written[s] == b for s, b in got)
    got = j.read(0, 1000, want=even, max_scan=(10, 1 << 30))
    assert [s for s, _ in got] == [1, 3, 5, 7, 9] and j.read_upto == 10
    got = j.read(10, 2, want=even)
    assert [s for s, _ in got] == [11, 13] and j.read_upto == 13
    j.close()


def test_verify_reports_damage_without_changing_files(tmp_path):
    from nexus.router.segments import verify

    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=100)
    written = fill(j, 30)
    j.close()
    files = seg_files(d)
    rec = HEADER.size + len(written[1])
    victim = str(d / files[1])
    with open(victim, "r+b") as f:
        f.seek(rec + 5)
        f.write(b"\xee")
    last = str(d / files[-1])
    with open(last, "ab") as f:
        f.write(b"\x01\x02\x03")  # a torn tail: reported, not cut
    sizes = {n: os.path.getsize(d / n) for n in files}
    found = verify(str(d))
    assert len(found["damaged"]) == 1 and found["damaged"][0]["segment"] == files[1]
    assert found["torn_tail"] == {"segment": files[-1], "offset": sizes[files[-1]] - 3, "bytes": 3}
    assert {n: os.path.getsize(d / n) for n in files} == sizes


def test_skip_to_moves_next_seq_past_cursors(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    fill(j, 5)
    j.skip_to(100)
    assert j.append([b"after"]) == 101
    assert [s for s, _ in j.read(0, 10)] == [1, 2, 3, 4, 5, 101]
    j.close()
    j2 = open_journal(d)
    assert j2.last_seq == 101 and j2.damage == []
    j2.skip_to(50)  # never backwards
    assert j2.append([b"x"]) == 102
    j2.close()
    empty = open_journal(tmp_path / "e")
    empty.skip_to(7)
    empty.close()
    again = open_journal(tmp_path / "e")
    assert again.last_seq == 7 and seg_files(tmp_path / "e") == [f"{8:020d}{SUFFIX}"]
    again.close()


def test_partial_write_is_undone(tmp_path):
    """A real short write (RLIMIT_FSIZE cuts the write() at the limit, then EFBIG): the
    batch raises StorageError, the file is cut back, and appends resume afterwards."""
    import resource
    import signal

    from nexus.router.journal import StorageError

    d = tmp_path / "j"
    j = open_journal(d)
    fill(j, 10)
    size = j.segments[-1].size
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, old_limit[1]))
        with pytest.raises(StorageError):
            j.append([b"y" * 60 for _ in range(5)])  # 380 bytes: 100 get written
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.path.getsize(_last_file(d)) == size
    assert j.last_seq == 10
    assert j.append([b"z"]) == 11
    assert [s for s, _ in j.read(0, 100)] == list(range(1, 12))
    j.close()
    j2 = open_journal(d)
    assert j2.last_seq == 11 and j2.damage == [] and j2.recovery.truncated_bytes == 0
    j2.close()


def test_torn_tail_in_its_own_segment_keeps_earlier_segments(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=30)
    j.append([b"a" * 40])
    j.append([b"b" * 40])
    assert len(j.segments) == 2
    j.close()
    path = _last_file(d)
    with open(path, "r+b") as f:
        f.truncate(10)
    j2 = open_journal(d, segment_bytes=30)
    assert j2.last_seq == 1
    assert j2.read(0, 10) == [(1, b"a" * 40)]
    assert j2.append([b"c"]) == 2
    assert j2.read(1, 10) == [(2, b"c")]
    j2.close()


# -- retention ------------------------------------------------------------------------------
def _retention_journal(d):
    j = open_journal(d, segment_bytes=40, retain=100.0)
    for i in range(12):
        j.append([b"%02d" % i + b"." * 30])  # one record per segment
    assert len(j.segments) == 12
    return j


def test_retention_removes_only_acked_and_old(tmp_path):
    d = tmp_path / "j"
    j = _retention_journal(d)
    now = 1_000_000.0
    for seg in j.segments:
        os.utime(seg.path, (now - 500, now - 500))
    # nothing acked: nothing removed even though everything is old
    assert j.enforce_retention(0, now=now) == 0
    # acked up to 5: segments holding seq 1..5 go
    assert j.enforce_retention(5, now=now) == 5
    assert [s.first for s in j.segments] == list(range(6, 13))
    assert j.first_seq() == 6
    assert j.read(0, 100)[0][0] == 6
    assert j.info()["first_seq"] == 6
    assert len(seg_files(d)) == 7
    j.close()


def test_retention_respects_age(tmp_path):
    d = tmp_path / "j"
    j = _retention_journal(d)
    now = 1_000_000.0
    ages = [500, 500, 50, 500] + [500] * 8  # the third segment is young
    for seg, age in zip(j.segments, ages, strict=False):
        os.utime(seg.path, (now - age, now - age))
    assert j.enforce_retention(12, now=now) == 2  # stops at the first young segment
    assert j.first_seq() == 3
    assert j.enforce_retention(12, now=now + 100) == 9  # all but the active segment
    assert [s.first for s in j.segments] == [12]
    assert j.first_seq() == 12
    assert j.read(0, 10) == [(12, b"11" + b"." * 30)]
    j.close()


def test_retention_segment_partially_acked_stays(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=100, retain=1.0)
    j.append([b"a" * 40, b"b" * 40, b"c" * 40])  # seq 1..3, one segment
    j.append([b"d"])  # seq 4, new segment
    for seg in j.segments:
        os.utime(seg.path, (10.0, 10.0))
    assert j.enforce_retention(2, now=1000.0) == 0
    assert j.enforce_retention(3, now=1000.0) == 1
    assert j.first_seq() == 4
    j.close()


def test_retention_then_reopen(tmp_path):
    d = tmp_path / "j"
    j = _retention_journal(d)
    for seg in j.segments:
        os.utime(seg.path, (1.0, 1.0))
    j.enforce_retention(8, now=1000.0)
    j.close()
    j2 = open_journal(d, segment_bytes=40)
    assert j2.last_seq == 12
    assert j2.first_seq() == 9
    assert [s for s, _ in j2.read(0, 100)] == [9, 10, 11, 12]
    assert j2.append([b"x"]) == 13
    j2.close()


# -- fsync policies ---------------------------------------------------------------------------
def test_fsync_always_syncs_each_append(tmp_path, fsyncs):
    j = Journal(str(tmp_path / "j"), fsync="always")
    j.open()
    fsyncs.clear()
    j.append([b"a"])
    assert len(fsyncs) == 1
    j.append([b"b", b"c"])
    assert len(fsyncs) == 2
    j.append([])
    assert len(fsyncs) == 2
    j.close()


# -- info, Entry -------------------------------------------------------------------------------
def test_info_fields(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=50)
    j.append([b"a" * 40])
    j.append([b"b" * 10, b"c" * 10])
    info = j.info()
    assert info["dir"] == str(d)
    assert info["last_seq"] == 3
    assert info["first_seq"] == 1
    assert info["fsync"] == "never"
    assert info["segments"] == [
        {"file": f"{1:020d}{SUFFIX}", "first": 1, "last": 1, "bytes": HEADER.size + 40},
        {"file": f"{2:020d}{SUFFIX}", "first": 2, "last": 3, "bytes": 2 * (HEADER.size + 10)},
    ]
    assert info["bytes"] == HEADER.size * 3 + 60
    assert info["bytes"] == sum(os.path.getsize(d / s["file"]) for s in info["segments"])
    j.close()


def test_entry_round_trip():
    raw = msgspec.msgpack.encode({"type": "a.b", "payload": [1, 2]})
    e = Entry("a.b", 12345, "prod-1", 7, msgspec.Raw(raw), 1700000000.25)
    data = entry_encoder.encode(e)
    assert isinstance(msgspec.msgpack.decode(data), list)  # array_like
    back = entry_decoder.decode(data)
    assert back.type == "a.b" and back.khash == 12345 and back.producer == "prod-1"
    assert back.pseq == 7 and back.time == 1700000000.25
    assert bytes(back.event) == raw
    # time has a default
    short = entry_decoder.decode(msgspec.msgpack.encode(["x.y", 1, "", 0, msgspec.Raw(raw)]))
    assert short.time == 0.0


def test_encode_entries_writes_exactly_what_an_entry_encodes_to():
    """encode_entries encodes rows as tuples (cheaper): byte for byte an Entry's encoding."""
    from nexus.router.journal import encode_entries

    raws = [msgspec.Raw(msgspec.msgpack.encode({"n": i})) for i in range(3)]
    got = encode_entries(["a.b", "a.c", "a.b"], [1, 2**31, 3], raws, 17.5, producer="k/p", pseqs=[5, 6, 2**40])
    want = [
        entry_encoder.encode(Entry(t, k, "k/p", s, r, 17.5, ""))
        for t, k, s, r in zip(["a.b", "a.c", "a.b"], [1, 2**31, 3], [5, 6, 2**40], raws, strict=True)
    ]
    assert got == want
    assert encode_entries(["a.b"], [1], raws[:1], 1.0, group="g") == [
        entry_encoder.encode(Entry("a.b", 1, "", 0, raws[0], 1.0, "g"))
    ]


def test_seq_at_time(tmp_path):
    j = open_journal(tmp_path / "j")
    raw = msgspec.Raw(msgspec.msgpack.encode({}))
    j.append([entry_encoder.encode(Entry("a.b", 0, "", 0, raw, t)) for t in (10.0, 20.0, 30.0)])
    assert j.seq_at_time(5.0) == 0
    assert j.seq_at_time(20.0) == 1
    assert j.seq_at_time(25.0) == 2
    assert j.seq_at_time(99.0) == 3
    j.close()


def test_open_close_fresh_journal_does_not_leak_fds(tmp_path):
    def count():
        return len(os.listdir("/proc/self/fd"))

    before = count()
    for i in range(5):
        j = Journal(str(tmp_path / f"j{i}"), fsync="never")
        j.open()
        j.close()
    assert count() == before


def test_reopen_close_does_not_leak_fds(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=30)
    fill(j, 5)
    j.read(0, 10)
    j.close()

    def count():
        return len(os.listdir("/proc/self/fd"))

    before = count()
    for _ in range(3):
        j = open_journal(d, segment_bytes=30)
        j.read(0, 10)
        j.close()
    assert count() == before


# -- property: random sizes and read positions ---------------------------------------------------
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(st.binary(min_size=0, max_size=120), min_size=1, max_size=6), min_size=1, max_size=12),
    segment_bytes=st.integers(min_value=1, max_value=400),
    reads=st.lists(
        st.tuples(st.integers(min_value=0, max_value=80), st.integers(min_value=0, max_value=30)), max_size=8
    ),
    reopen=st.booleans(),
    layouts=st.tuples(st.sampled_from([1, 2, 3, 512]), st.sampled_from([1, 2, 512])),
)
def test_property_append_read_round_trip(batches, segment_bytes, reads, reopen, layouts):
    """`layouts`: events per record before and after the reopen (one-event records, as
    written before batch records, and batches: both read back, also mixed in a segment)."""
    with tempfile.TemporaryDirectory() as d:
        j = open_journal(d, segment_bytes=segment_bytes, record_events=layouts[0])
        records = []
        for batch in batches:
            first = j.append(batch)
            assert first == len(records) + 1
            records.extend(batch)
        if reopen:
            j.close()
            j = open_journal(d, segment_bytes=segment_bytes, record_events=layouts[1])
            assert j.recovery.truncated_bytes == 0
            for batch in batches[:3]:  # appended in the other layout, after the first
                assert j.append(batch) == len(records) + 1
                records.extend(batch)
        expected = list(enumerate(records, start=1))
        assert j.last_seq == len(records)
        assert list(j.iter_all(chunk=5)) == expected
        for after, limit in reads:
            assert j.read(after, limit) == expected[after : after + limit]
        # every segment except the active one has reached segment_bytes
        assert all(s.size >= segment_bytes for s in j.segments[:-1])
        j.close()


@settings(max_examples=30, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=30),
    cut=st.integers(min_value=1, max_value=10_000),
)
def test_property_any_torn_tail_recovers_a_prefix(sizes, cut):
    with tempfile.TemporaryDirectory() as d:
        j = open_journal(d, segment_bytes=150)
        bodies = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
        for b in bodies:
            j.append([b])
        j.close()
        path = _last_file(d)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(max(0, size - (cut % (size + 1))))
        j2 = open_journal(d, segment_bytes=150)
        got = j2.read(0, 1000)
        n = j2.last_seq
        assert got == [(i + 1, bodies[i]) for i in range(n)]
        assert j2.append([b"tail"]) == n + 1
        assert j2.read(n, 5) == [(n + 1, b"tail")]
        j2.close()


def test_retention_removes_a_damaged_segment_once_acked(tmp_path):
    """A damaged segment does not block retention forever; its damage leaves status with it."""
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=40, retain=0.0)
    for i in range(6):
        j.append([b"%02d" % i + b"." * 30])  # one record per segment
    j.close()
    first = d / seg_files(d)[0]
    with open(first, "r+b") as f:
        f.seek(HEADER.size + 3)
        f.write(b"\xff\xff")
    j2 = open_journal(d, segment_bytes=40, retain=0.0)
    assert len(j2.damage) == 1
    assert j2.enforce_retention(3) == 3
    assert j2.damage == [] and j2.info()["damaged_ranges"] == 0
    j2.close()


def test_zero_filled_segment_is_resynced_quickly(tmp_path):
    """A closed segment zeroed over 4 MB: the scan skips zero runs at C speed."""
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=4 * 2**20)
    j.append([b"z" * 1000 for _ in range(4500)])
    j.append([b"after"])
    j.close()
    path = d / seg_files(d)[0]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(500)
        f.write(bytes(size - 500))
    j2 = open_journal(d, segment_bytes=4 * 2**20)
    assert [(x.first_seq, x.last_seq) for x in j2.damage] == [(1, 4500)]
    assert j2.read(0, 10) == [(4501, b"after")]
    j2.close()


def test_filtered_read_does_not_report_a_known_range_again(tmp_path):
    """Damage inside a record whose header is intact: a filtered read may walk into the
    known range from that header; it is skipped, not found and logged a second time."""
    d = tmp_path / "j"
    j = open_journal(d)
    written = fill(j, 30)
    j.close()
    rec = HEADER.size + len(written[1])
    with open(_last_file(d), "r+b") as f:
        f.seek(10 * rec + HEADER.size + 2)  # body of seq 11 and into seq 12
        f.write(os.urandom(rec))
    j2 = open_journal(d)
    assert len(j2.damage) == 1
    never = lambda body: False
    assert j2.read(0, 100, want=never) == [] and j2.read_upto == 30
    assert [s for s, _ in j2.read(0, 100, want=lambda body: True)] == [s for s in range(1, 31) if s not in (11, 12)]
    assert len(j2.damage) == 1
    j2.close()


def test_full_filesystem_write_is_undone_and_resumes(tmp_path):
    """A real ENOSPC (a 1 MB tmpfs the test mounts): the batch raises StorageError and
    leaves nothing; once space is freed appends continue, and recovery finds no damage."""
    import subprocess

    from nexus.router.journal import StorageError

    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        d = mnt / "j"
        j = open_journal(d, segment_bytes=256 * 1024)
        j.append([b"a" * 1000 for _ in range(100)])
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(StorageError) as info:
            for _ in range(50):  # past the slack of the file's last page
                j.append([b"b" * 1000 for _ in range(20)])
        assert "No space left" in str(info.value)
        # no partial batch stays behind: every file holds exactly its good records
        assert all(os.path.getsize(s.path) == s.size for s in j.segments)
        filler.unlink()
        first = j.append([b"c" * 1000 for _ in range(20)])
        assert first == j.last_seq - 19
        j.close()
        j2 = open_journal(d, segment_bytes=256 * 1024)
        assert j2.damage == [] and j2.recovery.truncated_bytes == 0 and j2.last_seq == first + 19
        j2.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("when", ["before_open", "after_open"])
def test_a_flipped_seq_bit_in_a_record_passed_over_does_not_skip_the_rest(tmp_path, when):
    """Review #2: a filtered read passes over other partitions' records on their header
    alone. One flipped high bit in such a record's seq made every later record look
    out of order (false damage to the segment's end) and read_upto huge: a fetch then
    answered an upto past the journal's end and the member acked it."""
    d = tmp_path / "j"
    j = open_journal(d)
    written = fill(j, 30)
    rec = HEADER.size + len(written[1])
    if when == "before_open":
        j.close()
    with open(_last_file(d), "r+b") as f:
        f.seek(9 * rec + 4 + 4 + 7)  # the top byte of seq 10's seq field
        f.write(b"\x40")
    if when == "before_open":
        j = open_journal(d)
    other = lambda b: not bytes(b).startswith(b"r9:")  # seq 10 is another partition's
    got = j.read(0, 100, want=other)
    assert [s for s, _ in got] == [s for s in range(1, 31) if s != 10]
    assert j.read_upto == 30
    assert [(x.first_seq, x.last_seq) for x in j.damage] == [(10, 10)]
    # the same from a position past the flipped record's neighbours (passed over as seq <= after)
    assert [s for s, _ in j.read(5, 100)] == [s for s in range(6, 31) if s != 10]
    assert j.read_upto == 30 and len(j.damage) == 1
    j.close()


def test_a_flipped_length_bit_in_a_record_passed_over_starts_the_damage_there(tmp_path):
    """A record passed over unchecked (seq <= after) whose length was flipped shorter: the
    header after it is garbage; the damage is that record, and the records after it
    are still served."""
    d = tmp_path / "j"
    j = open_journal(d)
    written = fill(j, 30)
    rec = HEADER.size + len(written[1])
    with open(_last_file(d), "r+b") as f:
        f.seek(9 * rec + 4)  # the length of seq 10
        f.write((len(written[10]) - 4).to_bytes(4, "little"))
    assert [s for s, _ in j.read(10, 100)] == list(range(11, 31))
    assert [(x.first_seq, x.last_seq) for x in j.damage] == [(10, 10)]
    j.close()


def _record(seq: int, body: bytes) -> bytes:
    import zlib

    lenseq = len(body).to_bytes(4, "little") + seq.to_bytes(8, "little")
    return zlib.crc32(body, zlib.crc32(lenseq)).to_bytes(4, "little") + lenseq + body


@pytest.mark.parametrize("forged_seq", [5, 7])
def test_a_record_embedded_in_a_payload_is_not_taken_after_damage(tmp_path, forged_seq):
    """Review #5: resync took any CRC-valid header with a plausible seq, also a record
    embedded byte for byte in an event's payload: it was served as an event, and a high
    forged seq made the real records after it look out of order, so in the last segment
    they were cut as a torn tail. A candidate now needs a good successor (or to end the file),
    and no range holding a CRC-valid record is cut."""
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [body(i, 40) for i in range(1, 5)]
    bodies.append(b"p" * 64 + _record(forged_seq, b"FORGED") + b"rest of the payload")  # seq 5
    bodies += [body(i, 40) for i in range(6, 21)]
    j.append(bodies)
    j.close()
    path = _last_file(d)
    size = os.path.getsize(path)
    at5 = sum(HEADER.size + len(b) for b in bodies[:4])
    with open(path, "r+b") as f:  # seq 5's own CRC no longer checks
        f.seek(at5)
        f.write(b"\xff\xff\xff\xff")
    j = open_journal(d)
    assert os.path.getsize(path) == size and j.recovery.truncated_bytes == 0
    got = j.read(0, 100)
    assert [s for s, _ in got] == [s for s in range(1, 21) if s != 5]
    assert all(b"FORGED" not in bytes(b) for _, b in got)
    assert [(x.first_seq, x.last_seq) for x in j.damage] == [(5, 5)]
    assert j.last_seq == 20
    j.close()


def test_a_bad_tail_that_holds_a_real_record_is_not_cut(tmp_path):
    """Seq 18 damaged, 19 good, 20 damaged to the end: 19 cannot be confirmed by its
    successor, but it checks: the range is kept (reported), never truncated."""
    d = tmp_path / "j"
    j = open_journal(d)
    written = fill(j, 20)
    j.close()
    rec = HEADER.size + len(written[1])
    path = _last_file(d)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for seq in (18, 20):
            f.seek((seq - 1) * rec)
            f.write(b"\xff\xff\xff\xff")
    j = open_journal(d)
    assert os.path.getsize(path) == size and j.recovery.truncated_bytes == 0
    assert len(j.damage) == 1 and j.damage[0].first_seq == 18
    assert [s for s, _ in j.read(0, 100)] == list(range(1, 18))
    first = j.append([b"next"])  # past any seq the kept range could hold: none reused
    assert first > 20 and [s for s, _ in j.read(17, 100)] == [first]
    j.close()
    j = open_journal(d)
    assert [s for s, _ in j.read(17, 100)] == [first] and j.last_seq == first
    j.close()


def test_a_failed_fsync_at_segment_rotation_is_raised_and_the_old_segment_kept(tmp_path):
    """Review #9: the old segment's fsync error at rotation was swallowed and its fd closed:
    nothing ever reported it. The write fd is made a pipe (a real fd whose fsync fails
    with EINVAL). Policy `never` (synced in the loop at rotation): the rotating append
    raises StorageError and nothing new is started. Policy `interval`: the flusher's sync
    raises it (the router then refuses batches) until an fsync of that fd succeeds."""
    from nexus.router.journal import StorageError

    for policy in ("never", "interval"):
        d = tmp_path / policy
        j = open_journal(d, fsync=policy, segment_bytes=200)
        fill(j, 8)  # past segment_bytes: the next append rotates
        files = seg_files(d)
        r, w = os.pipe()
        saved = os.dup(j._wfd)
        old = j._wfd
        try:
            os.dup2(w, old)  # the segment's fd now fails fsync
            j._dirty = True
            if policy == "never":
                with pytest.raises(StorageError, match="fsync failed at segment rotation"):
                    j.append([b"next"])
                assert j._wfd == old and seg_files(d) == files and j.last_seq == 8
            else:
                assert j.append([b"next"]) == 9 and len(seg_files(d)) == len(files) + 1
                for _ in range(2):  # reported on every sync until it succeeds
                    with pytest.raises(OSError):
                        j.sync()
        finally:
            os.dup2(saved, old)
            for fd in (r, w, saved):
                os.close(fd)
        j.sync()  # the real file's fsync succeeds: done
        if policy == "never":
            j._dirty = False
            assert j.append([b"next"]) == 9 and len(seg_files(d)) == len(files) + 1
        j.close()


def test_rotation_never_waits_for_the_flushers_lock(tmp_path):
    """Review #13: rotation took the fd lock the flusher holds across fsync: a stalled
    disk froze the router loop (and hang detection killed it). Holding the lock here as a
    stalled flusher would, a rotating append still completes; the flusher syncs and closes
    the old segment's fd later."""
    import threading

    j = open_journal(tmp_path / "j", fsync="interval", segment_bytes=200)
    fill(j, 8)
    done = threading.Event()
    with j._fd_lock:  # the flusher, stuck in fsync
        t = threading.Thread(target=lambda: (j.append([b"next"]), done.set()), daemon=True)
        t.start()
        finished = done.wait(10)
    t.join(10)
    assert finished, "the rotating append waited for the flusher's lock"
    assert len(j._retired) == 1
    j.sync()
    assert not j._retired and [s for s, _ in j.read(8, 10)] == [9]
    j.close()


def test_seq_at_time_searches_the_index_and_never_reads_the_whole_journal(tmp_path):
    """Review #16: seq_at_time scanned every record before `when` in the router loop (a
    big journal got the router killed as hung). It searches the sparse index now: a
    damaged record far before `when` is never even read (a full scan finds and logs it)."""
    d = tmp_path / "j"
    j = open_journal(d, segment_bytes=64 * 1024)
    raw = msgspec.Raw(msgspec.msgpack.encode({}))
    n = 6000
    for start in range(0, n, 500):
        j.append([entry_encoder.encode(Entry("a.b", 0, "", 0, raw, float(t))) for t in range(start, start + 500)])
    assert len(seg_files(d)) >= 3
    rec = os.path.join(d, seg_files(d)[0])
    with open(rec, "r+b") as f:  # a record early in the first segment
        f.seek(100 * (HEADER.size + len(entry_encoder.encode(Entry("a.b", 0, "", 0, raw, 1.0)))) + HEADER.size + 2)
        f.write(b"\xff\xff")
    # seq s was accepted at time s - 1
    assert j.seq_at_time(4000.5) == 4001 and j.seq_at_time(4000.0) == 4000
    assert j.damage == []
    assert j.seq_at_time(-1.0) == 0 and j.seq_at_time(1e9) == n
    for when in (0.0, 0.5, 511.0, 512.0, 513.0, 2047.5, 5999.0):
        linear = max((s for s, b in j.iter_all() if entry_decoder.decode(b).time < when), default=0)
        assert j.seq_at_time(when) == linear, when
    j.close()

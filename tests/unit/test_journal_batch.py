"""Batch records of the journal (nexus/router/segments.py): one header and CRC per run of
events. Damage, torn tails, resync, filtered reads, verify and recovery on this layout;
the one-event layout (what routers wrote before) is tested in test_journal.py."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.router.journal import HEADER, SUFFIX, Journal
from nexus.router.segments import BATCH, verify


def body(i: int, size: int = 20) -> bytes:
    return (f"r{i}:".encode() + b"x" * size)[:size]


def open_journal(path, **kw) -> Journal:
    j = Journal(str(path), **{"fsync": "never", "record_events": 4, **kw})
    j.open()
    return j


def last_file(d) -> str:
    return os.path.join(d, sorted(n for n in os.listdir(d) if n.endswith(SUFFIX))[-1])


def batch_size(bodies: list[bytes]) -> int:
    """Bytes of one batch record holding `bodies`."""
    return HEADER.size + 4 * (len(bodies) + 1) + sum(map(len, bodies))


def flip(path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_batch_is_one_record_with_one_header(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [body(i) for i in range(10)]  # records of 4, 4 and 2 events
    assert j.append(bodies) == 1
    assert os.path.getsize(last_file(d)) == batch_size(bodies[:4]) * 2 + batch_size(bodies[8:])
    assert j.read(0, 100) == list(enumerate(bodies, start=1))
    assert j.read(5, 2) == [(6, bodies[5]), (7, bodies[6])]  # from inside a record
    assert j.append([b"one"]) == 11  # a single event: a plain record
    j.close()
    with open(last_file(d), "rb") as f:
        data = f.read()
    _crc, field, seq = HEADER.unpack_from(data, 0)
    assert field & BATCH and seq == 1 and struct.unpack_from("<I", data, HEADER.size) == (4,)
    _crc, field, seq = HEADER.unpack_from(data, len(data) - HEADER.size - 3)
    assert field == 3 and seq == 11
    j2 = open_journal(d)
    assert j2.recovery.records == 11 and j2.last_seq == 11
    assert [s for s, _ in j2.read(0, 100)] == list(range(1, 12))
    j2.close()


def test_batch_records_are_bounded_in_bytes(tmp_path):
    """A run of big events is split so that one read chunk holds a record."""
    from nexus.router.journal import RECORD_BYTES

    d = tmp_path / "j"
    j = open_journal(d, record_events=512)
    big = [bytes([i]) * (RECORD_BYTES // 3) for i in range(7)]
    assert j.append(big) == 1
    # 3 fit in RECORD_BYTES? no: 3 * (RECORD_BYTES // 3) <= RECORD_BYTES, the 4th starts a new record
    assert os.path.getsize(last_file(d)) == batch_size(big[:3]) * 2 + HEADER.size + len(big[6])
    assert j.read(0, 100) == list(enumerate(big, start=1))
    j.close()


def test_a_torn_batch_at_the_tail_is_cut_whole(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [body(i) for i in range(12)]  # three records of 4
    j.append(bodies)
    j.close()
    path = last_file(d)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3)  # the last record loses its last 3 bytes
    j2 = open_journal(d)
    rec = batch_size(bodies[8:])
    assert j2.recovery.truncated_bytes == rec - 3
    assert j2.last_seq == 8 and os.path.getsize(path) == size - rec
    assert j2.append([b"again", b"and again"]) == 9
    assert j2.read(7, 10) == [(8, bodies[7]), (9, b"again"), (10, b"and again")]
    j2.close()


def test_a_damaged_batch_is_skipped_and_the_next_ones_served(tmp_path):
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [body(i) for i in range(12)]
    j.append(bodies)
    j.close()
    path = last_file(d)
    rec = batch_size(bodies[:4])
    flip(path, rec + HEADER.size + 30)  # inside the second record's entries (seqs 5-8)
    j2 = open_journal(d)
    assert j2.recovery.truncated_bytes == 0 and j2.last_seq == 12
    assert [x.describe() for x in j2.damage] == [
        {"segment": os.path.basename(path), "offset": rec, "bytes": rec, "first_seq": 5, "last_seq": 8}
    ]
    assert j2.read(0, 100) == [(i + 1, bodies[i]) for i in range(12) if not 4 <= i < 8]
    assert j2.read(5, 2) == [(9, bodies[8]), (10, bodies[9])]
    assert verify(str(d))["records"] == 8
    j2.close()


def test_a_batch_passed_over_with_a_bad_count_or_body_never_hides_later_events(tmp_path):
    """A batch whose seqs are all <= after is passed over with its CRC unchecked: a
    flipped byte in its entries costs nothing; a flipped count (the entry lengths then
    do not fill it) is damage found there, and every record after it is still served."""
    d = tmp_path / "j"
    j = open_journal(d)
    bodies = [body(i) for i in range(12)]
    j.append(bodies)
    path = last_file(d)
    flip(path, HEADER.size + 4 * 5 + 3)  # an entry of the first record (seqs 1-4)
    assert j.read(6, 100) == [(i + 1, bodies[i]) for i in range(6, 12)] and j.damage == []
    flip(path, HEADER.size)  # the first record's count: 4 -> 0xFB
    assert j.read(2, 100) == [(i + 1, bodies[i]) for i in range(4, 12)]
    assert [(x.offset, x.first_seq, x.last_seq) for x in j.damage] == [(0, 1, 4)]
    j.close()


def test_a_filtered_read_stops_inside_a_batch_and_goes_on_there(tmp_path):
    j = open_journal(tmp_path / "j", record_events=8)
    bodies = [body(i) for i in range(24)]
    j.append(bodies)

    def even(b):
        return int(bytes(b)[1:].split(b":")[0]) % 2 == 0

    got = j.read(0, 3, want=even)
    assert [s for s, _ in got] == [1, 3, 5] and j.read_upto == 5
    got = j.read(5, 100, want=even, max_scan=(4, 1 << 30))
    assert [s for s, _ in got] == [7, 9] and j.read_upto == 9
    got = j.read(9, 100, want=even)
    assert [s for s, _ in got] == list(range(11, 25, 2)) and j.read_upto == 24
    assert j.read(0, 100, max_bytes=50) == [(1, bodies[0]), (2, bodies[1])]
    j.close()


def _plain(seq: int, payload: bytes) -> bytes:
    lenseq = struct.pack("<IQ", len(payload), seq)
    return zlib.crc32(payload, zlib.crc32(lenseq)).to_bytes(4, "little") + lenseq + payload


def _batch(seq: int, payloads: list[bytes]) -> bytes:
    head = struct.pack(f"<{len(payloads) + 1}I", len(payloads), *map(len, payloads))
    rest = head + b"".join(payloads)
    lenseq = struct.pack("<IQ", BATCH | len(rest), seq)
    return zlib.crc32(rest, zlib.crc32(lenseq)).to_bytes(4, "little") + lenseq + rest


@pytest.mark.parametrize("forged", ["plain", "batch"])
def test_a_record_embedded_in_a_payload_is_not_taken_after_damage(tmp_path, forged):
    """Review #5 on batch records: a CRC-valid record inside an event's payload, after a
    damaged batch, is not resynced to (its successor does not check)."""
    d = tmp_path / "j"
    j = open_journal(d)
    inner = _plain(6, b"FORGED") if forged == "plain" else _batch(6, [b"FORGED", b"FORGED"])
    bodies = [body(i) for i in range(1, 5)]
    bodies += [b"p" * 8 + inner + b"rest", body(6), body(7), body(8)]  # seqs 5-8
    bodies += [body(i) for i in range(9, 21)]
    j.append(bodies)
    j.close()
    path = last_file(d)
    size = os.path.getsize(path)
    at = batch_size(bodies[:4])
    with open(path, "r+b") as f:  # the second record's CRC no longer checks
        f.seek(at)
        f.write(b"\xff\xff\xff\xff")
    j = open_journal(d)
    assert os.path.getsize(path) == size and j.recovery.truncated_bytes == 0
    got = j.read(0, 100)
    assert [s for s, _ in got] == [s for s in range(1, 21) if not 5 <= s <= 8]
    assert all(b"FORGED" not in bytes(b) for _, b in got)
    assert [(x.first_seq, x.last_seq) for x in j.damage] == [(5, 8)]
    assert j.last_seq == 20
    j.close()


def test_a_journal_of_one_event_records_opens_and_takes_batches_after_it(tmp_path):
    """The layout before batch records: a segment of one-event records (written byte for
    byte here) opens, reads, and gets batch records appended after them."""
    d = tmp_path / "j"
    os.makedirs(d)
    old = [f"old{i}".encode() for i in range(1, 6)]
    with open(d / f"{1:020d}{SUFFIX}", "wb") as f:
        f.write(b"".join(_plain(i, b) for i, b in enumerate(old, start=1)))
    j = open_journal(d)
    assert j.recovery.records == 5 and j.last_seq == 5
    assert j.append([b"new6", b"new7", b"new8"]) == 6
    j.close()
    j = open_journal(d)
    assert j.read(0, 100) == [*enumerate(old, start=1), (6, b"new6"), (7, b"new7"), (8, b"new8")]
    assert verify(str(d))["records"] == 8 and verify(str(d))["damaged"] == []
    j.close()


def test_a_batch_whose_lengths_do_not_fill_it_is_damage(tmp_path):
    """A CRC-valid batch record whose entry lengths do not add up (never written so) is
    a damaged range, not events of made-up sizes."""
    d = tmp_path / "j"
    os.makedirs(d)
    head = struct.pack("<3I", 2, 3, 9)  # 2 entries of 3 and 9 bytes, but 5 bytes follow
    rest = head + b"abcde"
    lenseq = struct.pack("<IQ", BATCH | len(rest), 1)
    bad = zlib.crc32(rest, zlib.crc32(lenseq)).to_bytes(4, "little") + lenseq + rest
    with open(d / f"{1:020d}{SUFFIX}", "wb") as f:
        f.write(bad + _batch(3, [b"three", b"four"]) + _plain(5, b"five") + _plain(6, b"six"))
    j = open_journal(d)
    assert j.read(0, 10) == [(3, b"three"), (4, b"four"), (5, b"five"), (6, b"six")]
    assert [(x.first_seq, x.last_seq) for x in j.damage] == [(1, 2)]
    j.close()


@settings(max_examples=30, deadline=None, database=None)
@given(
    batches=st.lists(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=9), min_size=1, max_size=8),
    cut=st.integers(min_value=1, max_value=10_000),
)
def test_property_any_torn_tail_of_batches_recovers_a_prefix(batches, cut):
    with tempfile.TemporaryDirectory() as d:
        j = open_journal(d, segment_bytes=300)
        bodies = []
        for sizes in batches:
            chunk = [bytes([(len(bodies) + i) % 256]) * n for i, n in enumerate(sizes)]
            j.append(chunk)
            bodies += chunk
        j.close()
        path = last_file(d)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(max(0, size - (cut % (size + 1))))
        j2 = open_journal(d, segment_bytes=300)
        n = j2.last_seq
        assert j2.read(0, 1000) == [(i + 1, bodies[i]) for i in range(n)]
        assert j2.damage == []
        assert j2.append([b"tail", b"tail2"]) == n + 1
        assert j2.read(n, 5) == [(n + 1, b"tail"), (n + 2, b"tail2")]
        j2.close()


def test_a_read_that_starts_at_a_few_stray_bytes_reports_them_as_damage(tmp_path):
    """A segment (not the last) ending in fewer bytes than a header, read from its
    start: the stray bytes are a damaged range, the next segment is still served."""
    d = tmp_path / "j"
    os.makedirs(d)
    with open(d / f"{1:020d}{SUFFIX}", "wb") as f:
        f.write(b"\x01\x02\x03")
    with open(d / f"{5:020d}{SUFFIX}", "wb") as f:
        f.write(_batch(5, [b"five", b"six"]))
    j = open_journal(d)
    assert j.read(0, 10) == [(5, b"five"), (6, b"six")]
    j.close()

"""Segment files of the journal, read without changing them: the record check, the
resync past a damaged range, and `verify` (safe while a router writes).

Record layout (little endian): crc32 u32 | body length u32 | seq u64 | body; the CRC
covers length, seq and body. A record holds one event (the body is the event's journal
entry), or, with BATCH set in the length field, a run of events with seqs seq, seq + 1,
...: body = count u32 | count x (entry length u32) | the entries one after another. One
header and one CRC per batch instead of per event (the router's append cost); a journal
of one-event records (all a router wrote before batch records) reads the same.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

HEADER = struct.Struct("<IIQ")  # crc, length, seq
COUNT = struct.Struct("<I")
BATCH = 0x8000_0000  # in the length field: a batch record (MAX_RECORD never reaches it)
MAX_RECORD = 256 * 2**20
MIN_EVENT = 4  # bytes an event takes at least (its length in a batch record): bounds the
# seqs a damaged range can hold
SUFFIX = ".seg"
CHUNK = 1 << 20  # bytes read at a time when scanning
NONZERO = re.compile(rb"[^\x00]")


@dataclass
class Damage:
    """A byte range of a segment that holds no readable record."""

    segment: str
    offset: int
    bytes: int
    first_seq: int  # the seqs that may have been in it (0: unknown)
    last_seq: int

    def describe(self) -> dict:
        return {
            "segment": self.segment,
            "offset": self.offset,
            "bytes": self.bytes,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }


@dataclass
class Segment:
    path: str
    first: int  # first seq that may be in it
    last: int = 0  # last seq in it, 0 if empty
    size: int = 0
    index_seqs: list[int] = field(default_factory=list)
    index_offsets: list[int] = field(default_factory=list)
    damaged: dict[int, int] = field(default_factory=dict)  # start offset -> end offset
    fd: int | None = None

    def read_fd(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def batch_lengths(buf, at: int, length: int) -> tuple[int, ...] | None:
    """The entry lengths of a batch record whose body (`length` bytes) starts at `at`,
    or None when they do not fill the body exactly (never written so: a bad record)."""
    if length < COUNT.size:
        return None
    (count,) = COUNT.unpack_from(buf, at)
    if count == 0 or COUNT.size * (count + 1) > length:
        return None
    lens = struct.unpack_from(f"<{count}I", buf, at + COUNT.size)
    return lens if sum(lens) == length - COUNT.size * (count + 1) else None


def split_length(field: int) -> tuple[int, bool]:
    """(body length, is a batch record) of a header's length field."""
    return (field & ~BATCH, True) if field & BATCH else (field, False)


class Scanner:
    """Checks records of one segment file through a bounded buffer (pread)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.buf = memoryview(b"")
        self.start = 0

    def view(self, off: int, n: int) -> tuple[memoryview, int]:
        """A buffer holding [off, off + n) (n clamped to the file), and off's index in it."""
        n = min(n, self.size - off)
        if off < self.start or off + n > self.start + len(self.buf):
            self.buf = memoryview(os.pread(self.fd, max(CHUNK, n), off))
            self.start = off
        return self.buf, off - self.start

    def check(self, off: int, prev_seq: int, hi: int = 0) -> tuple[int, int, int] | None:
        """(seq, end, last seq) if a good record starts at `off` with prev_seq < seq (<= hi)."""
        if off + HEADER.size > self.size:
            return None
        buf, rel = self.view(off, HEADER.size)
        want_crc, field, seq = HEADER.unpack_from(buf, rel)
        length, batch = split_length(field)
        end = off + HEADER.size + length
        if length > MAX_RECORD or end > self.size or seq <= prev_seq or (hi and seq > hi):
            return None
        if not self.crc_ok(off, end, want_crc):
            return None
        if not batch:
            return seq, end, seq
        buf, rel = self.view(off, end - off)
        lens = batch_lengths(buf, rel + HEADER.size, length)
        return None if lens is None else (seq, end, seq + len(lens) - 1)

    def events(self, off: int, end: int) -> Iterator[memoryview]:
        """The event bodies of the good record at [off, end) (one, or a batch's)."""
        buf, rel = self.view(off, end - off)
        length, batch = split_length(HEADER.unpack_from(buf, rel)[1])
        at = rel + HEADER.size
        if not batch:
            yield buf[at : at + length]
            return
        lens = batch_lengths(buf, at, length) or ()
        at += COUNT.size * (len(lens) + 1)
        for n in lens:
            yield buf[at : at + n]
            at += n

    def crc_ok(self, off: int, end: int, want: int | None = None) -> bool:
        buf, rel = self.view(off, end - off)
        if want is None:
            want = HEADER.unpack_from(buf, rel)[0]
        return zlib.crc32(buf[rel + 4 : rel + end - off]) == want

    def resync(self, bad: int, prev_seq: int, bounded: bool = True) -> tuple[int, int]:
        """After a bad record at `bad`: (offset, seq) of the next good record, or
        (size, 0). A candidate's seq must fit the bytes skipped: each lost event takes
        at least MIN_EVENT bytes, so seq <= prev_seq + 1 + skipped // MIN_EVENT; and the
        record after it must check too (its last seq + 1), unless it ends the file: a record
        embedded byte for byte in an event's payload is not taken for a real one.
        bounded=False: the first record whose CRC checks, whatever its seq or successor."""
        p = bad + 1
        unpack = HEADER.unpack_from
        while p + HEADER.size <= self.size:
            buf, rel = self.view(p, CHUNK)
            last = rel + min(len(buf) - rel, self.size - p) - HEADER.size
            q = rel
            jumped = False
            while q <= last:
                _crc, field, seq = unpack(buf, q)
                length = field & ~BATCH
                pos = self.start + q
                if seq == 0:
                    # zero-filled damage: no header fits before the next nonzero byte
                    m = NONZERO.search(buf, q + 8)
                    q = max(q + 1, (m.start() if m else len(buf)) - 15)
                    continue
                hi = prev_seq + 1 + (pos - bad) // MIN_EVENT if bounded else 0
                if (
                    (not bounded or prev_seq < seq <= hi)
                    and length <= MAX_RECORD
                    and pos + HEADER.size + length <= self.size
                ):
                    got = self.check(pos, prev_seq if bounded else 0, hi)
                    if got is not None and (
                        not bounded or got[1] == self.size or self.check(got[1], got[2], got[2] + 1) is not None
                    ):
                        return pos, seq
                    p, jumped = pos + 1, True  # check() may have moved the buffer
                    break
                q += 1
            if not jumped:
                p = self.start + q
        return self.size, 0


def torn_tail(fd: int, size: int, off: int, end: int) -> bool:
    """A bad range of the last segment is a torn tail (a write cut short: cut on open)
    only if it runs to the end of the file and no record whose CRC checks lies in it:
    real records are never cut because a forged or damaged one made them look out of order."""
    return end >= size and Scanner(fd, size).resync(off, 0, bounded=False)[1] == 0


def list_segments(directory: str) -> list[Segment]:
    segments = []
    for name in sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX)):
        try:
            first = int(name[: -len(SUFFIX)])
        except ValueError:
            continue
        segments.append(Segment(os.path.join(directory, name), first))
    return segments


def scan(
    fd: int, size: int, prev_seq: int, on_record: Callable[[int, memoryview], None] | None = None
) -> Iterator[tuple[str, int, int, int, int]]:
    """Walk a segment: ("record", offset, seq, end, last seq) per good record (each of its
    events handed to `on_record(seq, body)` first) and ("damaged", offset, end, next_seq, 0)
    per unreadable range (end == size, next_seq 0: to the end)."""
    sc = Scanner(fd, size)
    off = 0
    while off < size:
        got = sc.check(off, prev_seq)
        if got is not None:
            seq, end, last = got
            if on_record is not None:
                for n, body in enumerate(sc.events(off, end)):
                    on_record(seq + n, body)
            yield "record", off, seq, end, last
            prev_seq, off = last, end
            continue
        end, nseq = sc.resync(off, prev_seq)
        yield "damaged", off, end, nseq, 0
        off = end


PROGRESS_STEP = 4 * CHUNK  # bytes read between two progress reports


def _sizes(segments: list[Segment]) -> int:
    total = 0
    for seg in segments:
        try:
            total += os.stat(seg.path).st_size
        except FileNotFoundError:
            pass  # removed by retention meanwhile
    return total


def verify(
    directory: str,
    on_damage: Callable[[Damage], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Read every segment without changing anything (safe while a router writes):
    damaged ranges, records, and a torn tail of the last segment (which may be a
    write in progress; recovery would cut it). `on_progress(bytes_read, total_bytes)`
    is called every PROGRESS_STEP bytes and after each segment (the total is the
    segments' size at the start, raised if a live router's last segment grows)."""
    segments = list_segments(directory)
    total = _sizes(segments) if on_progress is not None else 0
    done = 0  # bytes of the segments finished
    damaged: list[Damage] = []
    records = 0
    torn = None
    last_seq = 0
    for i, seg in enumerate(segments):
        try:
            fd = os.open(seg.path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # removed by retention meanwhile
        try:
            size = os.fstat(fd).st_size
            prev = seg.first - 1
            nxt = segments[i + 1].first if i + 1 < len(segments) else 0
            reported = 0
            for kind, off, a, b, c in scan(fd, size, prev):
                if kind == "record":
                    records += c - a + 1  # events
                    prev = last_seq = c
                    if on_progress is not None and b - reported >= PROGRESS_STEP:
                        reported = b
                        on_progress(done + b, max(total, done + size))
                elif i == len(segments) - 1 and torn_tail(fd, size, off, a):
                    torn = {"segment": os.path.basename(seg.path), "offset": off, "bytes": a - off}
                else:
                    d = Damage(
                        os.path.basename(seg.path), off, a - off, prev + 1, b - 1 if b else (nxt - 1 if nxt else 0)
                    )
                    damaged.append(d)
                    if on_damage is not None:
                        on_damage(d)
            done += size
            if on_progress is not None:
                total = max(total, done)
                on_progress(done, total)
        finally:
            os.close(fd)
    if on_progress is not None:
        on_progress(done, done)  # what was read (a segment retention removed meanwhile is not)
    if segments:
        last_seq = max(last_seq, segments[-1].first - 1)
    return {
        "dir": directory,
        "segments": len(segments),
        "records": records,  # events (a batch record counts its events)
        "last_seq": last_seq,
        "damaged": [d.describe() for d in damaged],
        "torn_tail": torn,
    }

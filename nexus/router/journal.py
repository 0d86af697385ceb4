"""The journal: an append-only log of accepted events in segment files.

Record layout (little endian): crc32 u32 | body length u32 | seq u64 | body.
The CRC covers length, seq and body. A record holds one event, or a batch of up to
RECORD_EVENTS events with consecutive seqs (one header and CRC per batch: see
nexus/router/segments.py). On open each segment is scanned: a torn
tail of the LAST segment (no good record after it) is truncated; a damaged range
anywhere else is skipped, never deleted (the next good record is found by
scanning forward for a header whose CRC checks with a plausible seq), reported
in `damage` and logged once. Reads skip damaged ranges the same way.
"""

from __future__ import annotations

import bisect
import collections
import errno
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, overload

import msgspec
import structlog

from nexus.common import metricnames as names
from nexus.common import private
from nexus.common.metrics import DISK_BUCKETS, FAST_BUCKETS, Histogram
from nexus.router.segments import (
    BATCH,
    CHUNK,
    COUNT,
    HEADER,
    MAX_RECORD,
    MIN_EVENT,
    SUFFIX,
    Damage,
    Scanner,
    Segment,
    batch_lengths,
    list_segments,
    scan,
    torn_tail,
)

LENSEQ = struct.Struct("<IQ")
HEADER_SIZE = HEADER.size
SMALL_BODY = 4096  # read(want=...) hands bodies up to this size over as bytes
INDEX_EVERY = 512  # one sparse index point per this many events (at a record's start)
RECORD_EVENTS = 512  # events per batch record at most (a damaged byte loses that many)
RECORD_BYTES = CHUNK  # bytes of entries per batch record at most: one read chunk holds it
READ_BYTES = 8 * 2**20  # default byte bound of one read() batch

log = structlog.get_logger("nexus.journal")


class StorageError(OSError):
    """A journal write, segment creation or fsync failed (ENOSPC, EIO): nothing of the
    batch is in the journal; the caller answers with a retryable NACK."""


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """The body of a journal record."""

    type: str
    khash: int  # stable hash of the partition key
    producer: str
    pseq: int
    event: msgspec.Raw  # the event as msgpack, exactly as validated
    time: float = 0.0  # when the router accepted it
    group: str = ""  # set for a re-delivery meant for one group only (DLQ replay)


entry_encoder = msgspec.msgpack.Encoder()
entry_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entries(
    types: Sequence[str],
    khashes: Sequence[int],
    events: Sequence[msgspec.Raw],
    accepted_at: float,
    *,
    producer: str = "",
    pseqs: Iterable[int] | None = None,
    group: str = "",
) -> list[bytes]:
    """The journal record bodies of accepted events, in order: the one place an `Entry`
    is made (intake for producers' batches, admin for dead-letter replays). `pseqs` are
    the producer seqs (0 when not given); `group` limits a re-delivery to that group."""
    seqs = repeat(0) if pseqs is None else pseqs
    # a tuple encodes exactly as the array_like Entry does, and map/zip keep the per-event
    # step in C (about half the cost of an Entry and a comprehension step per event)
    rows = zip(types, khashes, repeat(producer), seqs, events, repeat(accepted_at), repeat(group), strict=False)
    return list(map(entry_encoder.encode, rows))


@dataclass
class Recovery:
    segments: int = 0
    records: int = 0
    truncated_bytes: int = 0
    truncated_at: str = ""
    damaged: list[Damage] = field(default_factory=list)


class Journal:
    def __init__(
        self,
        directory: str,
        *,
        fsync: str = "interval",
        fsync_interval: float = 0.05,
        segment_bytes: int = 64 * 2**20,
        retain: float = 7 * 86400,
        record_events: int = RECORD_EVENTS,
    ):
        self.dir = directory
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.retain = retain
        self.record_events = record_events  # 1: one record per event (the layout before batches)
        self.segments: list[Segment] = []
        self.last_seq = 0
        self.damage: list[Damage] = []  # every damaged range found (on open or while reading)
        self._wfd: int | None = None
        self._dirty = False
        self._undo_pending = False
        self.read_upto = 0  # see read()
        self._until_index = 0  # events to append before the next index point
        self._fd_lock = threading.Lock()  # sync() may run in another thread (nexus/router/flusher.py)
        self._retired: collections.deque[int] = collections.deque()  # fds sync() fsyncs and closes
        self.recovery = Recovery()
        self._kept_tail = 0  # highest seq a damaged, uncut tail could hold
        # metrics (the router's registry holds them); fsyncs are timed in any thread
        self.append_seconds = Histogram(names.JOURNAL_APPEND, FAST_BUCKETS)
        self.fsync_seconds = Histogram(names.JOURNAL_FSYNC, DISK_BUCKETS)
        self.fsync_seconds.cell()  # its one series exists before the flusher thread observes

    # -- open and recover ----------------------------------------------------
    def open(self, on_record: Callable[[int, memoryview], None] | None = None) -> Recovery:
        """Scan and index every segment; `on_record(seq, body)` sees each good record
        (the router rebuilds its state in the same pass: the journal is read once)."""
        private.makedirs(self.dir)
        self.segments = list_segments(self.dir)
        for i, seg in enumerate(self.segments):
            nxt = self.segments[i + 1].first if i + 1 < len(self.segments) else 0
            self._scan_segment(seg, last=(i == len(self.segments) - 1), next_first=nxt, on_record=on_record)
        self.recovery.segments = len(self.segments)
        if self.segments:
            self.last_seq = max(max(s.last for s in self.segments), self.segments[-1].first - 1)
        if self._kept_tail > self.last_seq:
            self.skip_to(self._kept_tail)
        if not self.segments:
            self._new_segment(1)
        if self._wfd is None:
            self._wfd = os.open(self.segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self.recovery.truncated_bytes:
            log.warning(
                "journal_tail_truncated",
                bytes=self.recovery.truncated_bytes,
                at=self.recovery.truncated_at.strip(),
                last_seq=self.last_seq,
            )
        return self.recovery

    def _scan_segment(
        self, seg: Segment, last: bool, next_first: int, on_record: Callable[[int, memoryview], None] | None = None
    ) -> None:
        """Index a segment. A bad record followed by good ones is a damaged range (kept,
        skipped); with no good record after it, in the last segment, a torn tail (cut)."""
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            until = 0
            for kind, off, a, b, c in scan(fd, size, seg.first - 1, on_record):
                if kind == "record":
                    if until <= 0:
                        seg.index_seqs.append(a)
                        seg.index_offsets.append(off)
                        until = INDEX_EVERY
                    until -= c - a + 1
                    self.recovery.records += c - a + 1
                    seg.last = c
                elif last and torn_tail(fd, size, off, a):
                    size = off  # a torn tail: nothing good after it
                    self.recovery.truncated_bytes += a - off
                    self.recovery.truncated_at += f" {os.path.basename(seg.path)}@{off}"
                    with open(seg.path, "r+b") as f:
                        f.truncate(off)
                        f.flush()
                        os.fsync(f.fileno())
                    break
                else:
                    first = seg.last + 1 if seg.last else seg.first
                    last_seq = b - 1 if b else (next_first - 1 if next_first else 0)
                    self._damaged(seg, off, a, first, last_seq)
                    if last and a >= size:
                        # kept, not cut (a record in it checks): new seqs start past any seq
                        # it could hold, so none is given twice (review #5)
                        self._kept_tail = first + (size - off) // MIN_EVENT
                    until = 0  # index the first good record after it
        finally:
            os.close(fd)
        self._until_index = until
        seg.size = size

    def _damaged(self, seg: Segment, start: int, end: int, first_seq: int, last_seq: int) -> None:
        seg.damaged[start] = end
        d = Damage(os.path.basename(seg.path), start, end - start, first_seq, last_seq)
        self.damage.append(d)
        self.recovery.damaged.append(d)
        # logged once: a range is recorded here only when first found
        log.error("journal_damaged", **d.describe())

    def _new_segment(self, first: int) -> None:
        """Start a segment file; on failure the current one stays the write target."""
        path = os.path.join(self.dir, f"{first:020d}{SUFFIX}")
        fd = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            dirfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise StorageError(exc.errno, f"cannot start journal segment {path}: {exc.strerror}") from None
        if self._wfd is not None and self.fsync_policy == "interval":
            # the flusher fsyncs and closes the old segment's fd (sync): the loop never waits
            # for its lock, held across a stalled fsync (review #13); an fsync error there
            # refuses batches until a retry succeeds (review #9)
            self._retired.append(self._wfd)
            self._wfd = fd
            self._dirty = False
            self.segments.append(Segment(path, first))
            self._until_index = 0
            return
        with self._fd_lock:  # uncontended: no flusher syncs on other policies
            if self._wfd is not None:
                if self._dirty:
                    try:
                        self._fsync(self._wfd)
                        self._dirty = False
                    except OSError as exc:
                        # the old segment is not durable: never hide it (review #9); it stays
                        # the write target, the batch is refused and retried like a full disk
                        os.close(fd)
                        os.unlink(path)
                        raise StorageError(
                            exc.errno or errno.EIO, f"journal fsync failed at segment rotation: {exc.strerror or exc}"
                        ) from None
                os.close(self._wfd)
            self._wfd = fd
        self.segments.append(Segment(path, first))
        self._until_index = 0

    def skip_to(self, seq: int) -> None:
        """Make the next seq `seq + 1` (cursors stand past the journal's end: events with
        seqs at or below a cursor would count as handled and never be delivered). A new
        segment named after it keeps seqs contiguous inside each segment."""
        if seq <= self.last_seq:
            return
        tail = self.segments[-1]
        self._new_segment(seq + 1)
        if tail.size == 0 and tail.last == 0:
            tail.close()
            os.unlink(tail.path)  # it held nothing
            self.segments.remove(tail)
        self.last_seq = seq

    # -- write -----------------------------------------------------------------
    def append(self, bodies: list[bytes]) -> int:
        """Append one event per body (batch records of up to `record_events`); returns the
        seq of the first. One write().
        On a storage error nothing of the batch stays (a partial write is cut back)
        and StorageError is raised."""
        if not bodies:
            return self.last_seq + 1
        started = time.perf_counter()
        seg = self.segments[-1]
        if self._undo_pending:
            self._undo(seg)
            if self._undo_pending:
                raise StorageError(errno.EIO, "journal write failed: a partial write could not be undone yet")
        if seg.size >= self.segment_bytes:
            self._new_segment(self.last_seq + 1)
            seg = self.segments[-1]
        first = self.last_seq + 1
        index_mark, until_mark = len(seg.index_seqs), self._until_index
        parts, offset, seq = self._records(bodies, seg, first)
        buf = b"".join(parts)
        wfd = self._write_fd()
        try:
            written = 0
            view = memoryview(buf)
            while written < len(buf):
                written += os.write(wfd, view[written:])
            if self.fsync_policy == "always":
                with self._fd_lock:
                    self._fsync(wfd)
        except OSError as exc:
            del seg.index_seqs[index_mark:], seg.index_offsets[index_mark:]
            self._until_index = until_mark
            self._undo(seg)
            raise StorageError(exc.errno or errno.EIO, f"journal write failed: {exc.strerror or exc}") from None
        seg.size = offset
        seg.last = seq - 1
        self.last_seq = seq - 1
        if self.fsync_policy != "always":
            self._dirty = True
        self.append_seconds.observe(time.perf_counter() - started)
        return first

    def _records(self, bodies: list[bytes], seg: Segment, first: int) -> tuple[list[bytes], int, int]:
        """The records of `bodies` (seqs from `first`) as parts of one write, with their
        sparse index points added to `seg`: (parts, segment size after, next seq). Runs of
        events become batch records: the per-event cost is a length in a packed array."""
        parts: list[bytes] = []
        offset, seq = seg.size, first
        pack_lenseq, crc32 = LENSEQ.pack, zlib.crc32
        until = self._until_index
        n, i = len(bodies), 0
        per = max(1, self.record_events)
        while i < n:
            j = min(n, i + per)
            lens = list(map(len, bodies[i:j]))
            entries = sum(lens)
            if entries > RECORD_BYTES and j - i > 1:
                total = 0
                for k, size in enumerate(lens):  # the run up to RECORD_BYTES (at least one)
                    total += size
                    if total > RECORD_BYTES and k:
                        j, lens, entries = i + k, lens[:k], total - size
                        break
            if until <= 0:
                seg.index_seqs.append(seq)
                seg.index_offsets.append(offset)
                until = INDEX_EVERY
            if j - i == 1:  # one event: a plain record
                body = bodies[i]
                lenseq = pack_lenseq(len(body), seq)
                parts += (crc32(body, crc32(lenseq)).to_bytes(4, "little"), lenseq, body)
                length = len(body)
            else:
                count = j - i
                head = struct.pack(f"<{count + 1}I", count, *lens)
                payload = b"".join(bodies[i:j])
                length = len(head) + entries
                lenseq = pack_lenseq(BATCH | length, seq)
                crc = crc32(payload, crc32(head, crc32(lenseq)))
                parts += (crc.to_bytes(4, "little"), lenseq, head, payload)
            until -= j - i
            offset += HEADER_SIZE + length
            seq += j - i
            i = j
        self._until_index = until
        return parts, offset, seq

    def _fsync(self, fd: int) -> None:
        """os.fsync, timed (nexus_journal_fsync_seconds)."""
        started = time.perf_counter()
        os.fsync(fd)
        self.fsync_seconds.observe(time.perf_counter() - started)

    def _write_fd(self) -> int:
        """The last segment's write fd (open() made it; close() is the end of writing)."""
        if self._wfd is None:
            raise StorageError(errno.EBADF, "journal is closed")
        return self._wfd

    def _undo(self, seg: Segment) -> None:
        """Cut a partial write back to the last good size (O_APPEND writes go to the end)."""
        try:
            os.ftruncate(self._write_fd(), seg.size)
            self._undo_pending = False
        except OSError as exc:
            self._undo_pending = True  # append refuses until a retry succeeds
            log.error("journal_undo_failed", segment=os.path.basename(seg.path), size=seg.size, error=str(exc))

    def sync(self) -> None:
        with self._fd_lock:
            while self._retired:  # old segments handed over at rotation
                self._fsync(self._retired[0])  # raises: kept and tried again
                os.close(self._retired.popleft())
            if self._dirty and self._wfd is not None:
                self._dirty = False  # before the fsync: an append meanwhile sets it again
                try:
                    self._fsync(self._wfd)
                except OSError:
                    self._dirty = True  # still not durable: the next sync tries again
                    raise

    def probe(self, nbytes: int = 64 * 1024) -> None:
        """Raise OSError unless `nbytes` can be written and synced in the journal's dir
        (the router's timer retry while storage is unavailable)."""
        if self._undo_pending:
            self._undo(self.segments[-1])
            if self._undo_pending:
                raise StorageError(errno.EIO, "a partial journal write could not be undone yet")
        path = os.path.join(self.dir, ".probe")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(nbytes))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    # -- read ------------------------------------------------------------------
    @overload
    def read(
        self,
        after: int,
        max_records: int,
        max_bytes: int = ...,
        want: None = None,
        max_scan: tuple[int, int] | None = None,
    ) -> list[tuple[int, bytes]]: ...

    @overload
    def read(
        self,
        after: int,
        max_records: int,
        max_bytes: int = ...,
        *,
        want: Callable[[bytes | memoryview], Any],
        max_scan: tuple[int, int] | None = None,
    ) -> list[tuple[int, Any]]: ...

    def read(
        self,
        after: int,
        max_records: int,
        max_bytes: int = READ_BYTES,
        want: Callable[[bytes | memoryview], Any] | None = None,
        max_scan: tuple[int, int] | None = None,
    ) -> list[tuple[int, Any]]:
        """Records with seq > after, in order: at most max_records, and at most max_bytes
        of bodies (or one record). Damaged ranges are skipped.

        `want(body)` filters: a falsy answer skips the record (neither copied nor CRC-checked:
        it is not served), True keeps the body, any other value is kept instead of the body
        (the caller's decoded form, no second decode). `max_scan` = (records, bytes) bounds
        the work of a filtered read.
        `read_upto` is then the last seq examined, where the next read may go on."""
        out: list[tuple[int, Any]] = []
        self.read_upto = after
        if after >= self.last_seq or not self.segments:
            return out
        total = 0
        scan_records, scan_bytes = max_scan or (1 << 62, 1 << 62)
        scanned = scanned_bytes = 0
        firsts = [s.first for s in self.segments]
        i = max(0, bisect.bisect_right(firsts, after + 1) - 1)
        full = False
        unpack, crc32 = HEADER.unpack_from, zlib.crc32
        while i < len(self.segments) and not full:
            seg = self.segments[i]
            i += 1
            if seg.last <= after or seg.size == 0:
                continue
            j = bisect.bisect_right(seg.index_seqs, after + 1) - 1
            if j >= 0:
                off, prev = seg.index_offsets[j], seg.index_seqs[j] - 1
            else:
                off, prev = 0, seg.first - 1
            fd, size = seg.read_fd(), seg.size
            buf, mv, bstart = b"", memoryview(b""), off  # a window of the file (inlined: hot)
            damaged = seg.damaged
            # Seqs are contiguous inside a segment: a header is trusted only with seq == prev + 1,
            # except the first one after a damaged range (then its CRC is checked first). A
            # record passed over unchecked (seq <= after, or not wanted) is checked if the
            # header after it is bad: a flipped bit in it must not make later records look bad.
            # A batch record is CRC-checked whenever any of its events is examined.
            loose = False
            unchecked = -1  # offset of the last record passed over unchecked
            unchecked_prev = 0
            while off < size:
                if (
                    len(out) >= max_records
                    or (out and total >= max_bytes)
                    or scanned >= scan_records
                    or scanned_bytes >= scan_bytes
                ):
                    full = True
                    break
                if damaged and off in damaged:  # known damage: its bytes are never parsed
                    off, loose, unchecked = damaged[off], True, -1
                    continue
                rel = off - bstart
                if rel < 0 or rel + HEADER_SIZE > len(buf):
                    buf = os.pread(fd, CHUNK, off)
                    mv, bstart, rel = memoryview(buf), off, 0
                good = batch = False
                if rel + HEADER_SIZE <= len(buf):
                    crc, length, seq = unpack(buf, rel)
                    if length & BATCH:
                        length, batch = length & ~BATCH, True
                    end = off + HEADER_SIZE + length
                    good = length <= MAX_RECORD and end <= size and (seq == prev + 1 or (loose and seq > prev))
                checked = False
                if good and (loose or batch):
                    if rel + HEADER_SIZE + length > len(buf):  # the whole record in the window
                        buf = os.pread(fd, max(CHUNK, HEADER_SIZE + length), off)
                        mv, bstart, rel = memoryview(buf), off, 0
                    if loose:
                        good = checked = crc32(mv[rel + 4 : rel + HEADER_SIZE + length]) == crc
                        loose = not good
                last = seq if good else 0  # (no header read yet: seq may be unbound)
                lens: tuple[int, ...] | None = None
                if good and batch:
                    # a batch's count is trusted like a header (unchecked) until it is served
                    lens = batch_lengths(buf, rel + HEADER_SIZE, length)
                    good = lens is not None
                    if lens is not None:
                        last = seq + len(lens) - 1
                if good:
                    if last <= after:
                        unchecked, unchecked_prev = off, prev
                        prev, off = last, end
                        continue
                    if lens is not None:
                        if not checked and crc32(mv[rel + 4 : rel + HEADER_SIZE + length]) != crc:
                            good = False
                        else:
                            at = rel + HEADER_SIZE + COUNT.size * (len(lens) + 1)
                            eseq = seq
                            for n in lens:
                                if eseq > after:
                                    if (
                                        len(out) >= max_records
                                        or (out and total >= max_bytes)
                                        or scanned >= scan_records
                                        or scanned_bytes >= scan_bytes
                                    ):
                                        full = True
                                        break
                                    if want is not None:
                                        scanned += 1
                                        scanned_bytes += n + MIN_EVENT
                                        try:
                                            keep = want(buf[at : at + n] if n <= SMALL_BODY else mv[at : at + n])
                                        except Exception:  # unreadable (its CRC checked): served as is
                                            keep = True
                                        if not keep:
                                            at, eseq, self.read_upto = at + n, eseq + 1, eseq
                                            continue
                                    else:
                                        keep = True
                                    if out and total + n > max_bytes:
                                        full = True
                                        break
                                    out.append((eseq, buf[at : at + n] if keep is True else keep))
                                    total += n
                                    self.read_upto = eseq
                                at += n
                                eseq += 1
                            if full:
                                break
                            prev, off, unchecked = last, end, -1
                            continue
                if good:
                    if rel + HEADER_SIZE + length > len(buf):
                        buf = os.pread(fd, max(CHUNK, HEADER_SIZE + length), off)
                        mv, bstart, rel = memoryview(buf), off, 0
                    body_at = rel + HEADER_SIZE
                    if want is not None:
                        scanned += 1
                        scanned_bytes += end - off
                        try:
                            # a small body as bytes (a copy is cheaper than a view), a large
                            # one as a view of the chunk (not copied just to be filtered)
                            keep = want(
                                buf[body_at : body_at + length]
                                if length <= SMALL_BODY
                                else mv[body_at : body_at + length]
                            )
                        except Exception:  # unreadable: the CRC check below decides
                            keep = True
                        if not keep:
                            unchecked, unchecked_prev = off, prev
                            prev, off, self.read_upto = seq, end, seq
                            continue
                    else:
                        keep = True
                    if checked or crc32(mv[rel + 4 : body_at + length]) == crc:
                        if out and total + length > max_bytes:
                            full = True
                            break
                        out.append((seq, buf[body_at : body_at + length] if keep is True else keep))
                        total += length
                        prev, off, self.read_upto = seq, end, seq
                        unchecked = -1
                        continue
                if unchecked >= 0:
                    # the record before was trusted on its header alone: if it is the bad one,
                    # the damage starts there (its successors are whole and still served)
                    if Scanner(fd, size).check(unchecked, unchecked_prev) is None:
                        off, prev = unchecked, unchecked_prev
                        self.read_upto = min(self.read_upto, max(prev, after))
                    unchecked = -1
                # a known range (found on open, or by an earlier read) that starts here or
                # that a plausible header led into: not found and logged again
                dmg_end = next((e for b, e in damaged.items() if b <= off < e), None)
                if dmg_end is None:
                    dmg_end, nseq = Scanner(fd, size).resync(off, prev)
                    self._damaged(
                        seg, off, dmg_end, prev + 1, nseq - 1 if nseq else (seg.last if seg.last > prev else 0)
                    )
                off, loose = dmg_end, True
            else:
                self.read_upto = max(self.read_upto, seg.last)  # the whole segment was examined
        return out

    def iter_all(self, after: int = 0, chunk: int = 10_000) -> Iterator[tuple[int, bytes]]:
        while True:
            records = self.read(after, chunk)
            if not records:
                return
            yield from records
            after = records[-1][0]

    def first_seq(self) -> int:
        for seg in self.segments:
            if seg.last:
                return seg.index_seqs[0] if seg.index_seqs else seg.first
        return self.last_seq + 1

    def seq_at_time(self, when: float) -> int:
        """The last seq accepted before `when` (unix seconds). Entry times rise with seqs:
        a binary search over the sparse index points, then a scan of about one index
        interval; never the whole journal (it runs in the router loop, review #16)."""
        points = [seq for seg in self.segments for seq in seg.index_seqs]

        def time_at(seq: int) -> float:
            got = self.read(seq - 1, 1)
            try:
                return entry_decoder.decode(got[0][1]).time if got else when
            except msgspec.DecodeError:
                return when  # unreadable: search before it

        lo, hi = 0, len(points)  # the first point accepted at or after `when`
        while lo < hi:
            mid = (lo + hi) // 2
            if time_at(points[mid]) < when:
                lo = mid + 1
            else:
                hi = mid
        start = points[lo - 1] - 1 if lo else 0
        before = start
        for seq, body in self.iter_all(start, chunk=INDEX_EVERY + 1):
            if entry_decoder.decode(body).time >= when:
                break
            before = seq
        return before

    # -- retention -------------------------------------------------------------
    def enforce_retention(self, acked_by_all: int, now: float | None = None) -> int:
        """Remove whole segments every group has acked and older than `retain`."""
        now = time.time() if now is None else now
        removed = 0
        while len(self.segments) > 1:
            seg = self.segments[0]
            if seg.last > acked_by_all:
                break
            try:
                age = now - os.stat(seg.path).st_mtime
            except FileNotFoundError:
                age = self.retain
            if age < self.retain:
                break
            seg.close()
            os.unlink(seg.path)
            self.segments.pop(0)
            removed += 1
            if seg.damaged:  # its damage is history now
                name = os.path.basename(seg.path)
                self.damage = [d for d in self.damage if d.segment != name]
        return removed

    def info(self) -> dict:
        return {
            "dir": self.dir,
            "segments": [
                {"file": os.path.basename(s.path), "first": s.first, "last": s.last, "bytes": s.size}
                for s in self.segments
            ],
            "first_seq": self.first_seq(),
            "last_seq": self.last_seq,
            "bytes": sum(s.size for s in self.segments),
            "fsync": self.fsync_policy,
            "damaged_ranges": len(self.damage),
            "damaged_bytes": sum(d.bytes for d in self.damage),
            "damaged": [d.describe() for d in self.damage[-20:]],
        }

    def close(self) -> None:
        if self._wfd is not None:
            try:
                self.sync()
            except OSError as exc:
                log.error("journal_sync_failed", error=str(exc))
            with self._fd_lock:
                os.close(self._wfd)
                self._wfd = None
                while self._retired:  # not synced (logged above): closed all the same
                    os.close(self._retired.popleft())
        for seg in self.segments:
            seg.close()

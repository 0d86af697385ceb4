"""The journal: an append-only log of accepted events in segment files.

Record layout (little endian): crc32 u32 | body length u32 | seq u64 | body.
The CRC covers length, seq and body, so a torn or corrupt tail is found on open
and truncated; everything before it is served as usual.
"""
from __future__ import annotations

import bisect
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import msgspec
import structlog

HEADER = struct.Struct("<IIQ")        # crc, length, seq
LENSEQ = struct.Struct("<IQ")
MAX_RECORD = 256 * 2**20
INDEX_EVERY = 512                     # one sparse index point per this many records
SUFFIX = ".seg"

log = structlog.get_logger("nexus.journal")


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """The body of a journal record."""

    type: str
    khash: int                        # stable hash of the partition key
    producer: str
    pseq: int
    event: msgspec.Raw                # the event as msgpack, exactly as validated
    time: float = 0.0                 # when the router accepted it
    group: str = ""                   # set for a re-delivery meant for one group only (DLQ replay)


entry_encoder = msgspec.msgpack.Encoder()
entry_decoder = msgspec.msgpack.Decoder(Entry)


@dataclass
class Segment:
    path: str
    first: int                        # first seq that may be in it
    last: int = 0                     # last seq in it, 0 if empty
    size: int = 0
    index_seqs: list[int] = field(default_factory=list)
    index_offsets: list[int] = field(default_factory=list)
    fd: int | None = None

    def read_fd(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Recovery:
    segments: int = 0
    records: int = 0
    truncated_bytes: int = 0
    truncated_at: str = ""


class Journal:
    def __init__(self, directory: str, *, fsync: str = "interval", fsync_interval: float = 0.05,
                 segment_bytes: int = 64 * 2**20, retain: float = 7 * 86400):
        self.dir = directory
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.retain = retain
        self.segments: list[Segment] = []
        self.last_seq = 0
        self._wfd: int | None = None
        self._dirty = False
        self._since_index = 0
        self._fd_lock = threading.Lock()   # sync() may run in another thread (nexus/flusher.py)
        self.recovery = Recovery()

    # -- open and recover ----------------------------------------------------
    def open(self) -> Recovery:
        os.makedirs(self.dir, exist_ok=True)
        names = sorted(n for n in os.listdir(self.dir) if n.endswith(SUFFIX))
        for name in names:
            try:
                first = int(name[: -len(SUFFIX)])
            except ValueError:
                continue
            self.segments.append(Segment(os.path.join(self.dir, name), first))
        for i, seg in enumerate(self.segments):
            ok = self._scan_segment(seg, last=(i == len(self.segments) - 1))
            if not ok:
                # corruption in the middle: keep what is before it, drop the rest
                for later in self.segments[i + 1:]:
                    os.unlink(later.path)
                    self.recovery.truncated_at += f" {os.path.basename(later.path)}(removed)"
                self.segments = self.segments[: i + 1]
                break
        self.recovery.segments = len(self.segments)
        if self.segments:
            self.last_seq = max((s.last for s in self.segments), default=0) or self.segments[-1].first - 1
        if not self.segments:
            self._new_segment(1)
        if self._wfd is None:
            self._wfd = os.open(self.segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.recovery.truncated_bytes:
            log.warning("journal_tail_truncated", bytes=self.recovery.truncated_bytes,
                        at=self.recovery.truncated_at.strip(), last_seq=self.last_seq)
        return self.recovery

    def _scan_segment(self, seg: Segment, last: bool) -> bool:
        """Index a segment; truncate it at the first bad record. False if truncated."""
        with open(seg.path, "rb") as f:
            data = f.read()
        off, n = 0, 0
        prev_seq = seg.first - 1
        good = True
        while off < len(data):
            if off + HEADER.size > len(data):
                good = False
                break
            crc, length, seq = HEADER.unpack_from(data, off)
            end = off + HEADER.size + length
            if length > MAX_RECORD or end > len(data) or seq <= prev_seq:
                good = False
                break
            if zlib.crc32(data[off + 4:end]) != crc:
                good = False
                break
            if n % INDEX_EVERY == 0:
                seg.index_seqs.append(seq)
                seg.index_offsets.append(off)
            n += 1
            prev_seq = seq
            seg.last = seq
            off = end
        self._since_index = n % INDEX_EVERY
        self.recovery.records += n
        seg.size = off
        if not good:
            self.recovery.truncated_bytes += len(data) - off
            self.recovery.truncated_at += f" {os.path.basename(seg.path)}@{off}"
            with open(seg.path, "r+b") as f:
                f.truncate(off)
                f.flush()
                os.fsync(f.fileno())
        return good

    def _new_segment(self, first: int) -> None:
        path = os.path.join(self.dir, f"{first:020d}{SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with self._fd_lock:
            if self._wfd is not None:
                if self._dirty:
                    os.fsync(self._wfd)
                    self._dirty = False
                os.close(self._wfd)
            self._wfd = fd
        self.segments.append(Segment(path, first))
        self._since_index = 0
        dirfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    # -- write -----------------------------------------------------------------
    def append(self, bodies: list[bytes]) -> int:
        """Append records, one per body; returns the seq of the first. One write()."""
        if not bodies:
            return self.last_seq + 1
        seg = self.segments[-1]
        if seg.size >= self.segment_bytes:
            self._new_segment(self.last_seq + 1)
            seg = self.segments[-1]
        first = self.last_seq + 1
        seq = first
        parts = []
        offset = seg.size
        pack_lenseq = LENSEQ.pack
        crc32 = zlib.crc32
        since = self._since_index
        for body in bodies:
            lenseq = pack_lenseq(len(body), seq)
            crc = crc32(body, crc32(lenseq))
            parts.append(crc.to_bytes(4, "little"))
            parts.append(lenseq)
            parts.append(body)
            if since % INDEX_EVERY == 0:
                seg.index_seqs.append(seq)
                seg.index_offsets.append(offset)
            since += 1
            offset += HEADER.size + len(body)
            seq += 1
        buf = b"".join(parts)
        written = 0
        view = memoryview(buf)
        while written < len(buf):
            written += os.write(self._wfd, view[written:])
        self._since_index = since
        seg.size = offset
        seg.last = seq - 1
        self.last_seq = seq - 1
        self._dirty = True
        if self.fsync_policy == "always":
            self.sync()
        return first

    def sync(self) -> None:
        with self._fd_lock:
            if self._dirty and self._wfd is not None:
                self._dirty = False       # before the fsync: an append meanwhile sets it again
                os.fsync(self._wfd)

    # -- read ------------------------------------------------------------------
    def read(self, after: int, max_records: int) -> list[tuple[int, bytes]]:
        """Records with seq > after, in order, at most max_records."""
        out: list[tuple[int, bytes]] = []
        if after >= self.last_seq or not self.segments:
            return out
        firsts = [s.first for s in self.segments]
        i = max(0, bisect.bisect_right(firsts, after + 1) - 1)
        while i < len(self.segments) and len(out) < max_records:
            seg = self.segments[i]
            i += 1
            if seg.last <= after or seg.size == 0:
                continue
            j = max(0, bisect.bisect_right(seg.index_seqs, after + 1) - 1)
            off = seg.index_offsets[j] if seg.index_seqs else 0
            fd = seg.read_fd()
            chunk_size = 1 << 20
            buf = b""
            buf_start = off
            while off < seg.size and len(out) < max_records:
                rel = off - buf_start
                if rel + HEADER.size > len(buf):
                    buf = os.pread(fd, max(chunk_size, HEADER.size), off)
                    buf_start, rel = off, 0
                _crc, length, seq = HEADER.unpack_from(buf, rel)
                end = rel + HEADER.size + length
                if end > len(buf):
                    buf = os.pread(fd, max(chunk_size, HEADER.size + length), off)
                    buf_start, rel = off, 0
                    end = HEADER.size + length
                if seq > after:
                    out.append((seq, buf[rel + HEADER.size:end]))
                off += HEADER.size + length
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
        """The last seq accepted before `when` (unix seconds), by scanning entries."""
        before = 0
        for seq, body in self.iter_all():
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
        return removed

    def info(self) -> dict:
        return {
            "dir": self.dir,
            "segments": [{"file": os.path.basename(s.path), "first": s.first,
                          "last": s.last, "bytes": s.size} for s in self.segments],
            "first_seq": self.first_seq(),
            "last_seq": self.last_seq,
            "bytes": sum(s.size for s in self.segments),
            "fsync": self.fsync_policy,
        }

    def close(self) -> None:
        if self._wfd is not None:
            self.sync()
            with self._fd_lock:
                os.close(self._wfd)
                self._wfd = None
        for seg in self.segments:
            seg.close()

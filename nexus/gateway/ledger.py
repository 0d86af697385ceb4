"""The gateway's ledger: what it sent the router, kept across a gateway restart, so a
client's retry of an event id is never journaled twice.

The router deduplicates by (producer id, producer seq), not by event id; an HTTP client
that lost its reply retries with the same event ids, possibly to a gateway that was
SIGKILLed and started again. So the gateway keeps one producer id for good (in this
file) and records, before a batch goes to the router, each event's seq, id and bytes
("sent"), and after the router's reply which seqs were journaled ("settled").

- An id already journaled (the last DEDUP_WINDOW accepted ids) is answered `accepted`
  (duplicate) without sending it again.
- Events sent but not settled when the gateway died are sent again at start with the
  same producer id, seqs and bytes: the router drops those it journaled already
  (duplicates, ACKed) and journals the rest; a client's retry waits for that answer.

Known limit: the router remembers NACKs in memory only (docs/PROTOCOL.md section 8). An
event the router NACKed just before both it and the gateway died, the NACK lost with the
gateway, is resent at start and then ACKed as a duplicate seq: answered `accepted` though
it was never journaled. It needs both processes killed within one reply's time.

Records are appended with one write() per batch or reply (no fsync: a killed process
loses nothing the kernel has; the router's own journal is fsynced on an interval, so a
host crash can lose the end of both alike). At start the file is read, a torn tail is
dropped, and it is written again compacted (tmp + rename): the producer id, the next
seq, the window of accepted ids and the unsettled events.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from nexus.common import private

DEDUP_WINDOW = 100_000  # accepted event ids remembered (oldest forgotten first)
COMPACT_BYTES = 64 * 2**20  # rewrite the file once it grew past this
_LEN = struct.Struct(">I")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


@dataclass
class Unsettled:
    pseq: int
    event_id: str
    data: bytes


class Ledger:
    def __init__(self, folder: str):
        private.makedirs(folder)
        self.path = os.path.join(folder, "ledger")
        self.producer_id = ""
        self.next_pseq = 1
        self.accepted: OrderedDict[str, None] = OrderedDict()
        self.unsettled: dict[int, Unsettled] = {}  # pseq -> event, in pseq order
        self._fd = -1
        self._size = 0
        self._load()
        if not self.producer_id:
            self.producer_id = "gateway-" + uuid.uuid4().hex
        self._rewrite()

    # -- reading ------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        at = 0
        while at + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, at)
            if at + 4 + n > len(data):
                break  # torn tail: the write the process died in
            try:
                rec = _decode(data[at + 4 : at + 4 + n])
            except msgspec.DecodeError:
                break
            at += 4 + n
            self._apply(rec)

    def _apply(self, rec: list) -> None:
        kind = rec[0]
        if kind == "p":  # producer id, next seq
            self.producer_id, self.next_pseq = rec[1], max(self.next_pseq, rec[2])
        elif kind == "k":  # accepted ids (compacted)
            for event_id in rec[1]:
                self._remember(event_id)
        elif kind == "s":  # sent: [(pseq, id, bytes), ...]
            for pseq, event_id, data in rec[1]:
                self.unsettled[pseq] = Unsettled(pseq, event_id, data)
                self.next_pseq = max(self.next_pseq, pseq + 1)
        elif kind == "a":  # settled up to rec[1]; rec[2]: seqs of those not journaled
            not_journaled = set(rec[2])
            for pseq in [p for p in self.unsettled if p <= rec[1]]:
                u = self.unsettled.pop(pseq)
                if pseq not in not_journaled:
                    self._remember(u.event_id)
        elif kind == "x":  # dropped without an answer (renumbered, or failed whole)
            for pseq in rec[1]:
                self.unsettled.pop(pseq, None)

    def _remember(self, event_id: str) -> None:
        self.accepted[event_id] = None
        self.accepted.move_to_end(event_id)
        if len(self.accepted) > DEDUP_WINDOW:
            self.accepted.popitem(last=False)

    # -- writing ------------------------------------------------------------------------
    def _rewrite(self) -> None:
        """The compacted file under the real name at once (tmp + rename)."""
        records: list[list] = [["p", self.producer_id, self.next_pseq], ["k", list(self.accepted)]]
        if self.unsettled:
            records.append(["s", [(u.pseq, u.event_id, u.data) for u in self.unsettled.values()]])
        blob = b"".join(_frame(r) for r in records)
        tmp = self.path + ".tmp"
        fd = private.create(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._size = len(blob)

    def _append(self, rec: list) -> None:
        """One record, whole or not at all: a short or failed write (a full disk) is cut
        off again, so the records after it still read, and OSError is raised."""
        blob = _frame(rec)
        try:
            if os.write(self._fd, blob) != len(blob):
                raise OSError(errno.ENOSPC, "short write to the gateway ledger")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(blob)

    def sent(self, events: list[Unsettled]) -> None:
        """Before the batch goes to the router; OSError: nothing recorded, not to be sent."""
        self._append(["s", [(u.pseq, u.event_id, u.data) for u in events]])
        for u in events:
            self.unsettled[u.pseq] = u

    def settled(self, ack: int, not_journaled: list[int]) -> list[Unsettled]:
        """After a reply: every seq <= ack is settled; returns those events, in order."""
        done = [self.unsettled.pop(p) for p in [p for p in self.unsettled if p <= ack]]
        if not done:
            return done
        skip = set(not_journaled)
        for u in done:
            if u.pseq not in skip:
                self._remember(u.event_id)
        self._append(["a", ack, not_journaled])
        if self._size > COMPACT_BYTES:
            self._rewrite()
        return done

    def dropped(self, pseqs: list[int]) -> None:
        for p in pseqs:
            self.unsettled.pop(p, None)
        self._append(["x", pseqs])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _frame(rec: list) -> bytes:
    body = _encode(rec)
    return _LEN.pack(len(body)) + body

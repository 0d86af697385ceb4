"""Lag without scanning the journal: per group and partition, the seqs of the events
routed to it that may not be acked yet, kept as the router journals them.

`nexus status` (and the launcher's readiness probe, a status request) runs in the
router loop; scanning the journal there took seconds with a large backlog in bytes.
Here lag is one bisect per partition. The newest EXACT_MAX seqs of a partition are kept
one by one (8 bytes each); older ones only as one checkpoint per EVERY seqs (review #19:
a full list cost 8 MiB per partition per group), so a cursor among those reads ">=N"
(N exact to within EVERY). Beyond TRACK_MAX checkpoints the oldest are forgotten.
"""

from __future__ import annotations

import bisect
from array import array

EXACT_MAX = 1 << 16  # newest seqs kept one by one per partition (512 KiB)
EVERY = 256  # older seqs: one checkpoint (the block's last seq) per this many
TRACK_MAX = 1 << 16  # checkpoints kept per partition (16 M seqs in 512 KiB)


class StreamBacklog:
    __slots__ = ("seqs", "marks", "gone_upto")

    def __init__(self, cursor: int) -> None:
        self.seqs = array("Q")  # the newest seqs, ascending
        self.marks = array("Q")  # older: the last seq of each block of EVERY seqs before `seqs`
        self.gone_upto = cursor  # no seq <= this is tracked (acked or forgotten)

    def add(self, seqs) -> None:
        self.seqs.extend(seqs)
        if len(self.seqs) > EXACT_MAX:
            self._compact()

    def add_one(self, seq: int) -> None:
        self.seqs.append(seq)
        if len(self.seqs) > EXACT_MAX:
            self._compact()

    def _compact(self) -> None:
        """Fold the oldest whole blocks of `seqs` into checkpoints."""
        seqs = self.seqs
        n = (len(seqs) - EXACT_MAX // 2) // EVERY * EVERY
        self.marks.extend(seqs[EVERY - 1 : n : EVERY])
        del seqs[:n]
        marks = self.marks
        if len(marks) > TRACK_MAX:
            drop = len(marks) - TRACK_MAX // 2
            self.gone_upto = max(self.gone_upto, marks[drop - 1])
            del marks[:drop]

    def after(self, cursor: int) -> tuple[int, bool]:
        """(events after cursor, exact?)"""
        exact = cursor >= self.gone_upto
        older = 0
        marks = self.marks
        if marks:
            i = bisect.bisect_right(marks, cursor)
            if i == len(marks):  # every checkpointed block is acked
                self.gone_upto = max(self.gone_upto, marks[-1])
                del marks[:]
            else:
                if i > 64 and i * 2 > len(marks):  # acked blocks: trim, amortized
                    self.gone_upto = max(self.gone_upto, marks[i - 1])
                    del marks[:i]
                    i = 0
                # blocks after i are wholly after the cursor; block i is wholly after it only
                # when the cursor is its lower bound, else at least its last seq is
                older = (len(marks) - i) * EVERY
                if cursor != (marks[i - 1] if i else self.gone_upto):
                    older -= EVERY - 1
                    exact = False
                return older + len(self.seqs), exact
        seqs = self.seqs
        i = bisect.bisect_right(seqs, cursor)
        if i > 4096 and i * 2 > len(seqs):  # acked prefix: trim, amortized
            self.gone_upto = max(self.gone_upto, seqs[i - 1])
            del seqs[:i]
            i = 0
        return len(seqs) - i, exact


class Backlog:
    def __init__(self) -> None:
        self.streams: dict[str, list[StreamBacklog]] = {}

    def add_group(self, group: str, cursors: list[int]) -> None:
        """Track a group whose partitions stand at `cursors`; add only seqs above them."""
        self.streams[group] = [StreamBacklog(c) for c in cursors]

    def lag(self, group: str, cursors: list[int]) -> int | str:
        streams = self.streams.get(group)
        if streams is None:
            return 0
        total, exact = 0, True
        for st, cursor in zip(streams, cursors, strict=False):
            n, ok = st.after(cursor)
            total += n
            exact = exact and ok
        return total if exact else f">={total}"

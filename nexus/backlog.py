"""Lag without scanning the journal: per group and partition, the seqs of the events
routed to it that may not be acked yet, kept as the router journals them.

`nexus status` (and the launcher's readiness probe, a status request) runs in the
router loop; scanning the journal there took seconds with a large backlog in bytes.
Here lag is one bisect per partition. Memory is 8 bytes per unacked event per group,
bounded by TRACK_MAX per partition: beyond it the oldest seqs are forgotten and lag
reads ">=N" until the cursor passes them.
"""
from __future__ import annotations

import bisect
from array import array

TRACK_MAX = 1 << 20            # seqs kept per partition (8 MiB)


class StreamBacklog:
    __slots__ = ("seqs", "gone_upto")

    def __init__(self, cursor: int) -> None:
        self.seqs = array("Q")
        self.gone_upto = cursor     # no seq <= this is in `seqs` (acked or forgotten)

    def add(self, seqs) -> None:
        self.seqs.extend(seqs)
        if len(self.seqs) > TRACK_MAX:
            drop = len(self.seqs) - TRACK_MAX // 2
            self.gone_upto = max(self.gone_upto, self.seqs[drop - 1])
            del self.seqs[:drop]

    def after(self, cursor: int) -> tuple[int, bool]:
        """(events after cursor, exact?)"""
        seqs = self.seqs
        i = bisect.bisect_right(seqs, cursor)
        if i > 4096 and i * 2 > len(seqs):      # acked prefix: trim, amortized
            self.gone_upto = max(self.gone_upto, seqs[i - 1])
            del seqs[:i]
            i = 0
        return len(seqs) - i, cursor >= self.gone_upto


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
        for st, cursor in zip(streams, cursors):
            n, ok = st.after(cursor)
            total += n
            exact = exact and ok
        return total if exact else f">={total}"

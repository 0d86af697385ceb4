"""One partition stream as a member sees it (no sockets).

`watermark` means: every event of this stream with seq <= watermark has been seen
(queued or handled). Live deliveries carry `prev`; when prev > watermark something
was missed on PUB/SUB and the member fetches the range from the journal, buffering
live deliveries meanwhile (the Clone pattern). The journal is the truth.
"""
from __future__ import annotations

import collections
from typing import Any

BUFFER_LIMIT = 256          # live deliveries kept while a fetch is outstanding


class RecentIds:
    """A bounded set of event ids, oldest forgotten first.

    A set plus a FIFO deque: O(1) add and evict. (Evicting from a plain dict with
    `del d[next(iter(d))]` is O(deleted slots at the front): it makes every add cost
    tens of microseconds once the window is full.)
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: set[str] = set()
        self._order: collections.deque[str] = collections.deque()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        if event_id in self._ids:
            return
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())

    def clear(self) -> None:
        self._ids.clear()
        self._order.clear()

    def __len__(self) -> int:
        return len(self._ids)


class PartitionStream:
    __slots__ = ("partition", "watermark", "queue", "busy", "waiting", "attempt", "fetching",
                 "fetch_after", "buffered", "overflow", "behind", "revoked", "redelivered_upto",
                 "acked", "first_failed")

    def __init__(self, partition: int, cursor: int, redelivered_upto: int = 0):
        self.partition = partition
        self.watermark = cursor
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()   # (seq, WireEvent)
        self.busy = False          # head event is being handled
        self.waiting = False       # head event waits for its retry backoff
        self.attempt = 1
        self.fetching = False
        self.fetch_after = -1
        self.buffered: list[Any] = []
        self.overflow = False
        self.behind = False        # live events dropped for lack of room: fetch later
        self.revoked = False
        self.redelivered_upto = redelivered_upto
        self.acked = cursor
        self.first_failed = 0.0    # when the head event first failed

    def handled_upto(self) -> int:
        """Every event <= this has been handled: what the member may ack."""
        return self.queue[0][0] - 1 if self.queue else self.watermark

    def drop_queued(self) -> int:
        """Forget queued events but the one being handled; the watermark goes back
        so they are fetched again. Returns how many were dropped."""
        handled = self.handled_upto()         # before the queue is gone
        keep = [self.queue[0]] if self.busy and self.queue else []
        dropped = len(self.queue) - len(keep)
        self.queue.clear()
        self.queue.extend(keep)
        self.watermark = keep[0][0] if keep else handled
        self.waiting = False
        self.buffered.clear()
        return dropped

    def needs_fetch(self, prev: int) -> bool:
        return prev > self.watermark

    def take(self, seqs: list[int], events: list[Any], upto: int) -> int:
        """Queue events newer than the watermark; returns how many were queued."""
        w = self.watermark
        n = 0
        if seqs and seqs[-1] > w:
            q = self.queue
            for s, e in zip(seqs, events):
                if s > w:
                    q.append((s, e))
                    n += 1
        if upto > w:
            self.watermark = upto
        return n

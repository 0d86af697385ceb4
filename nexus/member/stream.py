"""One partition stream as a member sees it (no sockets).

`watermark` means: every event of this stream with seq <= watermark has been seen
(queued or handled). Live deliveries carry `prev`; when prev > watermark something
was missed on PUB/SUB and the member fetches the range from the journal, buffering
live deliveries meanwhile (the Clone pattern). The journal is the truth.

The queue holds decoded events only from the head's delivery: a delivery or fetch reply
that arrives while the queue is not empty is `held` whole, as the bytes it came in, and
decoded once it reaches the head (`unhold`). A backlog costs its wire size in memory
(about 130 bytes for a small event, against about 600 decoded), and the decode CPU is
the same, spent later. Invariant: `held` is empty whenever `queue` is.
"""

from __future__ import annotations

import asyncio
import collections
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any, NamedTuple

BUFFER_LIMIT = 256  # live deliveries kept while a fetch is outstanding
GENERATIONS = 4  # RecentIds forgets a quarter of its window at a time


class Held(NamedTuple):
    """A delivery or fetch reply queued whole, not yet decoded."""

    first: int  # the first seq to queue from it (the ones before were seen already)
    n: int  # events it adds to the queue (counted in Partitions.queued)
    frame: Any  # what `decode` reads: the bytes as received
    # -> (seqs, WireEvents), or None when it does not decode (the stream rewinds: see unhold)
    decode: Callable[[Any], tuple[list[int], list[Any]] | None]


class RecentIds(set):
    """The ids of the events handled lately: at least the last `capacity`, at most a
    quarter more.

    The object is the set of remembered ids, so `event_id in recent` is a plain set lookup
    (no Python call per event). For forgetting, ids are also listed in generations of a
    quarter of `capacity`: once a fifth one is full, the oldest one's ids leave the set in
    one call, instead of a Python-level pop and discard per add (a FIFO deque). The set
    stays about `capacity` big: with a full window most of the cost is its memory.
    """

    __slots__ = ("_generation", "_young", "_old")

    def __init__(self, capacity: int):
        super().__init__()
        self._generation = max(1, -(-capacity // GENERATIONS))  # ids per generation
        self._young: list[str] = []
        self._old: collections.deque[list[str]] = collections.deque()  # full ones, oldest first

    def add(self, event_id: str) -> None:
        # (an id added twice, by async handlers running the same id at once, is forgotten
        # with its first generation)
        set.add(self, event_id)
        young = self._young
        young.append(event_id)
        if len(young) >= self._generation:
            self._old.append(young)
            self._young = []
            if len(self._old) > GENERATIONS:
                self.difference_update(self._old.popleft())

    def clear(self) -> None:
        set.clear(self)
        self._young, self._old = [], collections.deque()


class PartitionStream:
    __slots__ = (
        "partition",
        "watermark",
        "queue",
        "held",
        "busy",
        "waiting",
        "attempt",
        "fetching",
        "fetch_after",
        "buffered",
        "overflow",
        "behind",
        "muted",
        "revoked",
        "redelivered_upto",
        "first_failed",
        "skip",
        "dead_letter",
        "task",
        "started",
        "timed_out",
        "solo",
    )

    def __init__(self, partition: int, cursor: int, redelivered_upto: int = 0):
        self.partition = partition
        self.watermark = cursor
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()  # (seq, WireEvent)
        self.held: collections.deque[Held] = collections.deque()  # after the queue, undecoded
        self.busy = False  # head event is being handled
        self.waiting = False  # head event waits for its retry backoff
        self.attempt = 1
        self.fetching = False
        self.fetch_after = -1
        self.buffered: list[Any] = []
        self.overflow = False
        self.behind = False  # live events dropped for lack of room: fetch later
        self.muted = False  # unsubscribed from its live deliveries while behind (Fetcher)
        self.revoked = False
        self.redelivered_upto = redelivered_upto
        self.first_failed = 0.0  # when the head event first failed
        self.skip: set[int] | None = None  # seqs to pass over: dead-lettered poison (Assign.skip)
        # the head's DeadLetter message and when it was sent, until the router confirms it
        # stored it (the head stays `busy` meanwhile, so nothing past it is acked)
        self.dead_letter: tuple[bytes, float] | None = None
        self.task: asyncio.Task[None] | None = None  # the asyncio task running an async handler on the head
        self.started = 0.0  # loop stamp when that call began (handler_timeout)
        self.timed_out = False  # that task was cancelled for running past handler_timeout
        self.solo: set[int] | None = None  # seqs to run with no other call in flight (Assign.solo)

    def handled_upto(self) -> int:
        """Every event <= this has been handled: what the member may ack."""
        return self.queue[0][0] - 1 if self.queue else self.watermark

    def drop_queued(self) -> int:
        """Forget queued events but the one being handled; the watermark goes back
        so they are fetched again. Returns how many were dropped."""
        handled = self.handled_upto()  # before the queue is gone
        keep = [self.queue[0]] if self.busy and self.queue else []
        dropped = len(self.queue) - len(keep) + sum(h.n for h in self.held)
        self.held.clear()
        self.queue.clear()
        self.queue.extend(keep)
        self.watermark = keep[0][0] if keep else handled
        self.waiting = False
        if not keep:
            self.dead_letter = None
        self.buffered.clear()
        return dropped

    def buffer(self, frame: bytes) -> None:
        """Keep a live delivery for after the outstanding fetch; past BUFFER_LIMIT, drop
        it and mark the stream so the fetch reply is followed by another fetch."""
        if len(self.buffered) < BUFFER_LIMIT:
            self.buffered.append(frame)
        else:
            self.overflow = True

    def needs_fetch(self, prev: int) -> bool:
        return prev > self.watermark

    def take(self, seqs: list[int], events: list[Any], upto: int) -> int:
        """Queue events newer than the watermark; returns how many were queued."""
        if self.skip:
            seqs, events = self._without_skipped(self.skip, seqs, events)
        w = self.watermark
        n = 0
        if seqs and seqs[0] > w:
            # seqs increase, so all are new: the common case, without a loop in Python
            self.queue.extend(zip(seqs, events, strict=False))
            n = min(len(seqs), len(events))
        elif seqs and seqs[-1] > w:
            q = self.queue
            for s, e in zip(seqs, events, strict=False):
                if s > w:
                    q.append((s, e))
                    n += 1
        if upto > w:
            self.watermark = upto
        return n

    def hold(self, seqs: list[int], frame: Any, decode: Callable, upto: int) -> int:
        """Queue a delivery's events newer than the watermark without decoding them (the
        queue is not empty: they wait behind it); returns how many were queued."""
        w = self.watermark
        n = 0
        if seqs and seqs[-1] > w:
            i = bisect_right(seqs, w)
            n = len(seqs) - i
            if self.skip:
                skip = self.skip
                n -= sum(1 for s in seqs[i:] if s in skip)
            if n:
                self.held.append(Held(seqs[i], n, frame, decode))
        if upto > w:
            self.watermark = upto
        return n

    def unhold(self) -> int:
        """The queue ran empty: decode held deliveries into it until it has an event.
        Returns the count of events that left the queue undecoded (for Partitions.queued).

        A held delivery that does not decode (its head did, when it came) is dropped with
        every one after it, and the stream goes back to before it and fetches from the
        journal (`behind`); an outstanding fetch reply is ignored then (`fetch_after`)."""
        lost = 0
        queue = self.queue
        while not queue and self.held:
            h = self.held.popleft()
            got = h.decode(h.frame)
            if got is None:
                lost += h.n + sum(x.n for x in self.held)
                self.held.clear()
                self.buffered.clear()
                self.watermark = h.first - 1
                self.fetching, self.fetch_after, self.overflow, self.behind = False, -1, False, True
                break
            seqs, events = got
            if self.skip:
                seqs, events = self._without_skipped(self.skip, seqs, events)
            i = bisect_left(seqs, h.first)
            queue.extend(zip(seqs[i:], events[i:], strict=False))
            lost += h.n - (min(len(seqs), len(events)) - i)
        return lost

    def _unhold_all(self) -> int:
        """Decode every held delivery into the queue; returns unhold's count."""
        lost = 0
        queued, self.queue = self.queue, collections.deque()
        try:
            while self.held:
                lost += self.unhold()
                queued.extend(self.queue)
                self.queue.clear()
        finally:
            self.queue = queued
        return lost

    @staticmethod
    def _without_skipped(skip: set[int], seqs: list[int], events: list[Any]) -> tuple[list[int], list[Any]]:
        """Pass over dead-lettered poison seqs: they count as seen (the watermark moves past
        them, so they are acked) but are never handled here."""
        if not any(s in skip for s in seqs):
            return seqs, events
        kept = [(s, e) for s, e in zip(seqs, events, strict=False) if s not in skip]
        return [s for s, _ in kept], [e for _, e in kept]

    def add_skip(self, seqs) -> int:
        """More seqs to pass over; the ones already queued (not the head being handled)
        leave the queue. Returns how many left it."""
        if self.skip is None:
            self.skip = set()
        self.skip.update(seqs)
        lost = self._unhold_all()  # (rare: a dead-lettered poison) to look at their seqs
        keep_head = 1 if self.busy and self.queue else 0
        head = [self.queue.popleft()] if keep_head else []
        before = len(self.queue)
        rest = [item for item in self.queue if item[0] not in self.skip]
        if not head and rest[:1] != list(self.queue)[:1]:
            self.attempt, self.first_failed = 1, 0.0  # the head waiting for a retry left
        self.queue.clear()
        self.queue.extend(head + rest)
        return before - len(rest) + lost

    def forget_skips_upto(self, seq: int) -> None:
        if self.skip:
            self.skip = {s for s in self.skip if s > seq} or None

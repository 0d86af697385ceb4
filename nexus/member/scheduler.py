"""Which event runs next, and running its handler call (no sockets).

Events of one partition run one at a time, in journal order; across partitions the lowest
priority number goes first; an async handler has up to `concurrency` calls in flight.
Ready partitions wait in a heap ordered by (priority, seq) of their head event. With a
sync handler the partition taken from the heap keeps the turn (`run`): for as long as no
other ready partition has a better priority, and for up to TURN_MAX events while one of
the same priority has an older head; then it goes back on the heap. So a busy partition
costs no heap push and pop per event, priority across partitions and order within a
partition are as with the heap alone, and among equal priorities the oldest head still
comes first, TURN_MAX events later at most.

A call that did not simply succeed (an error, follow-ups emitted, the breaker not closed)
is handed back as its outcome, `(error, context)`, with its head still busy: the runtime
applies it (nexus/member/outcomes.py) and calls `done` or `pop` when the head is finished.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from bisect import bisect_left
from typing import Any

from nexus.common import metricnames as names
from nexus.common.blackbox import SLOT0_PARTITION, SLOT0_SEQ, BlackBox
from nexus.common.metrics import HANDLER_BUCKETS, LATENCY_BUCKETS, Histogram
from nexus.member.context import Context
from nexus.member.handlers import Handler
from nexus.member.partitions import Partitions
from nexus.member.stream import PartitionStream, RecentIds
from nexus.protocol.events import WireEvent

SLICE = 0.005  # seconds of sync handlers before the loop gets a turn (sockets, timers)
TURN_MAX = 32  # events a partition runs on while another's head of equal priority is older
CANCEL_GRACE = 2.0  # seconds a cancelled async call gets to end before the member ends itself
SOLO = 1 << 30  # added to `active` while a suspect waits to run alone or runs alone

Outcome = tuple[BaseException | None, Context | None]  # a call's error (None: it succeeded), its context


class Scheduler:
    def __init__(
        self,
        partitions: Partitions,
        handler: Handler,
        *,
        concurrency: int,
        dedup_window: int,
        handler_timeout: float,
        box: BlackBox | None,
        log: Any,
    ):
        self.partitions = partitions
        self.handler = handler
        self.concurrency = concurrency if handler.is_async else 1
        self.handler_timeout = handler_timeout
        self.box = box  # None without a launcher: no box writes
        self.log = log
        self.heap: list[tuple[int, int, int]] = []  # (priority, seq, partition) of ready heads
        self.work = asyncio.Event()  # set when something may start: the runtime's dispatcher wakes
        # while `quiet`, ready() notes (`noted`) instead of setting `work`: the runtime's SUB
        # callback runs what its deliveries made ready itself, without waking the dispatcher
        self.quiet = False
        self.noted = False
        self.active = 0  # async calls in flight (+ SOLO)
        self.recent = RecentIds(dedup_window)  # ids handled lately: drop repeats
        self.handled = 0
        self.duplicates_dropped = 0
        self.timeouts = 0  # async calls cancelled at handler_timeout
        # the sync call running now, and a count of them: the watchdog's clock
        self.call_stream: PartitionStream | None = None
        self.calls = 0
        # metrics (the member's registry holds them): per call, observed inline (a bisect
        # and two adds each) on the two clock reads of the call
        self.duration = Histogram(names.HANDLER_DURATION, HANDLER_BUCKETS)
        self.latency = Histogram(names.EVENT_LATENCY, LATENCY_BUCKETS)

    def ready(self, st: PartitionStream) -> None:
        """`st` may have a head to run: on the heap with it, if it is free to run."""
        if st.queue and not st.busy and not st.waiting and not st.revoked:
            seq, ev = st.queue[0]
            heapq.heappush(self.heap, (ev.priority, seq, st.partition))
            if self.quiet:
                self.noted = True
            else:
                self.work.set()

    def next(self) -> PartitionStream | None:
        """The stream whose head runs next (off the heap), or None: nothing is ready, or
        `concurrency` calls are in flight."""
        heap, streams = self.heap, self.partitions.streams
        while heap and self.active < self.concurrency:
            _, seq, p = heapq.heappop(heap)
            st = streams.get(p)
            if st is None or st.busy or st.waiting or st.revoked or not st.queue or st.queue[0][0] != seq:
                continue  # stale: its head moved on, or it is not free to run
            return st
        return None

    def put_back(self, st: PartitionStream) -> None:
        """Taken but not run (the breaker is open): back on the heap, without a wakeup."""
        seq, ev = st.queue[0]
        heapq.heappush(self.heap, (ev.priority, seq, st.partition))

    # -- sync handlers ----------------------------------------------------------------------
    def run(self, st: PartitionStream, deadline: float, every_outcome: bool = False) -> Outcome | None:
        """Sync handlers: handle `st`'s head event, then its next ones while it keeps the turn
        (see the module doc) and the clock is before `deadline`. Returns the outcome of a call
        that did not simply succeed (all of them with `every_outcome`, while the breaker is not
        closed), else None once the turn is over (`st` is back on the heap if it has more)."""
        queue, heap, recent, clock = st.queue, self.heap, self.recent, time.perf_counter
        handle, prepare = self.handler.handle, self.handler.prepare
        # metrics, inline: one clock read per call (the one the slice deadline needs anyway)
        # ends a call and starts the next, so a call's time includes the few steps between
        # two calls (dedup check, pop): well under its first bucket's bound
        d_cell, d_bounds = self.duration.cell(), self.duration.bounds
        d_first = d_bounds[0]
        l_cell, l_bounds = self.latency.cell(), self.latency.bounds
        l_edges = (0.0, *l_bounds, float("inf"))  # bucket i holds (l_edges[i], l_edges[i + 1]]
        l_i, l_lo, l_hi = 0, 0.0, 0.0  # the last event's latency bucket: the next one's, mostly
        now = clock()
        wall = time.time() - now  # perf_counter -> unix time, for the event latency
        # the black box's slot 0 (sync calls run one at a time): the partition is written
        # once per run (no call is marked then: seq word 0), the seq word per call
        words = self.box.words if self.box is not None else None
        if words is not None:
            words[SLOT0_PARTITION] = st.partition
        turn = popped = 0
        try:
            while True:
                turn += 1
                seq, w = queue[0]
                if w.id in recent:
                    self._drop_duplicate(seq, w)
                    now = clock()
                else:
                    st.busy = True
                    ctx: Context | None = None
                    if words is not None:
                        words[SLOT0_SEQ] = seq  # a crash from here on names this event
                    self.call_stream = st  # the watchdog times this call
                    self.calls += 1
                    error: BaseException | None
                    started = now
                    try:
                        event, ctx = prepare(st, seq, w)
                        handle(event, ctx)
                        error = None
                    except Exception as exc:
                        error = exc
                    now = clock()
                    self.call_stream = None
                    took = now - started
                    d_cell[0 if took <= d_first else bisect_left(d_bounds, took)] += 1  # (most: the first)
                    d_cell[-1] += took
                    late = started + wall - w.time
                    if not l_lo < late <= l_hi:  # (consecutive events mostly waited alike)
                        late = late if late > 0.0 else 0.0  # (a producer's clock ahead of ours)
                        l_i = bisect_left(l_bounds, late)
                        l_lo, l_hi = l_edges[l_i], l_edges[l_i + 1]
                    l_cell[l_i] += 1
                    l_cell[-1] += late
                    if words is not None:
                        words[SLOT0_SEQ] = 0
                    if error is not None or every_outcome or (ctx is not None and ctx.emitted):
                        return error, ctx  # retries, breaker, dead letters, emits: the runtime's
                    st.busy = False
                    self.handled += 1
                    recent.add(w.id)
                queue.popleft()
                st.attempt = 1
                popped += 1
                if not queue and st.held:
                    self.partitions.unhold(st)
                if not queue or st.revoked:
                    if not st.revoked:
                        self.ready(st)
                    return None
                if now > deadline:
                    self.ready(st)
                    return None
                if heap:
                    top = heap[0]  # (priority, seq, partition) of the best other head
                    seq, w = queue[0]
                    if top[0] < w.priority or (top[0] == w.priority and top[1] < seq and turn >= TURN_MAX):
                        self.ready(st)  # another partition's event comes first
                        return None
        finally:
            self.partitions.popped(popped)  # once per turn, not per event

    # -- async handlers ---------------------------------------------------------------------
    def start(self, st: PartitionStream, now: float) -> bool:
        """Async handlers: True when a call on `st`'s head starts now (`call` it); False when
        the head is a duplicate (dropped) or a suspect that waits to run alone. `now`: the
        loop stamp, the call's start for handler_timeout."""
        seq, w = st.queue[0]
        if w.id in self.recent:
            self._drop_duplicate(seq, w)
            self.pop(st)
            return False
        if st.solo is not None and not self._solo(st, st.solo, seq, w):
            return False
        st.busy = True
        st.timed_out = False
        st.started = now
        self.active += 1
        return True

    async def call(self, st: PartitionStream) -> Outcome:
        """Run the async call started on `st`'s head; its outcome (the head stays busy)."""
        box = self.box
        seq, w = st.queue[0]
        slot = box.begin(st.partition, seq) if box is not None else -1
        ctx: Context | None = None
        error: BaseException | None
        self.latency.observe(max(time.time() - w.time, 0.0))
        started = time.perf_counter()
        try:
            event, ctx = self.handler.prepare(st, seq, w)
            await self.handler.handle(event, ctx)
            error = None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not st.timed_out or task is None:
                raise  # the member is stopping
            task.uncancel()
            error = TimeoutError(f"handler ran past handler_timeout ({self.handler_timeout:g}s)")
            self.timeouts += 1
            self.log.error(
                "handler_timed_out", event_id=w.id, seq=seq, partition=st.partition, timeout=self.handler_timeout
            )
        except Exception as exc:
            error = exc
        finally:
            st.task = None
            if box is not None:
                box.end(slot)
            self.duration.observe(time.perf_counter() - started)
        self.active -= 1
        if self.active == SOLO:
            self.active = 0  # a suspect's wait or its lone run is over
        return error, ctx

    def _solo(self, st: PartitionStream, solo: set[int], seq: int, w: WireEvent) -> bool:
        """An event in flight with others when a member crashed (Assign.solo) runs with no
        other call in flight, so a crash on it names it alone and only the culprit is charged
        as poison (crashes.py). `SOLO` added to `active` keeps anything else from starting
        meanwhile. True: start it now."""
        if seq not in solo:
            return True
        if self.active:
            self.active += SOLO  # hold: let the running calls end first
            heapq.heappush(self.heap, (w.priority, seq, st.partition))
            return False
        self.active = SOLO  # run alone
        solo.discard(seq)
        if not solo:
            st.solo = None
        self.log.info("suspect_running_alone", seq=seq, partition=st.partition)
        return True

    def cancel_overdue(self, now: float) -> list[tuple[PartitionStream, float]]:
        """Async handlers: cancel calls running past handler_timeout (from the loop's tick: a
        call costs two stores, not a timer). Returns the calls that ignore their cancellation
        (still running CANCEL_GRACE later), with how long they ran: the member must end, as
        for a stuck sync call (exit 7, counted against the event; its partitions move on)."""
        stuck: list[tuple[PartitionStream, float]] = []
        limit = now - self.handler_timeout
        for st in self.partitions.streams.values():
            if st.task is None or st.started >= limit:
                continue
            if not st.timed_out:
                st.timed_out = True
                st.task.cancel()
            elif st.started < limit - CANCEL_GRACE:
                stuck.append((st, now - st.started))
        return stuck

    # -- a head is finished -----------------------------------------------------------------
    def done(self, st: PartitionStream) -> None:
        """`st`'s head was handled: count it, remember its id, on to the next."""
        self.handled += 1
        self.recent.add(st.queue[0][1].id)
        self.pop(st)

    def pop(self, st: PartitionStream) -> None:
        """`st`'s head is finished (handled, dead-lettered or a duplicate): on to the next.
        A revoked `st` is not run again: the runtime releases it."""
        st.queue.popleft()
        st.attempt = 1
        self.partitions.popped(1)
        if not st.queue and st.held:
            self.partitions.unhold(st)
        if not st.revoked:
            self.ready(st)

    def forget_handled(self) -> None:
        """A journal replay: what was handled comes again, to be handled again."""
        self.recent.clear()

    def _drop_duplicate(self, seq: int, w: WireEvent) -> None:
        # already handled here (a redelivery, or an id used again): skip it, it stays acked
        self.duplicates_dropped += 1
        self.log.debug("duplicate_dropped", event_id=w.id, seq=seq)

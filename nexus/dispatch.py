"""Running handlers for a member: priority across partitions, one event at a time
per partition, retries with backoff, the circuit breaker, dead letters.

A mixin of `Member` (nexus/worker.py), which owns the streams and the sockets.
"""
from __future__ import annotations

import asyncio
import heapq
import random
import time
import traceback

import msgspec

from .breaker import CLOSED
from .context import Context
from .errors import DependencyError, PermanentError
from .events import Event, encode
from .stream import PartitionStream
from .wire import DeadLetter, encoder


class Dispatch:
    def _ready(self, st: PartitionStream) -> None:
        if st.queue and not st.busy and not st.waiting and not st.revoked:
            seq, ev = st.queue[0]
            heapq.heappush(self.ready, (ev.priority, seq, st.partition))
            self._work.set()

    # -- dispatch -------------------------------------------------------------------
    async def _dispatcher(self) -> None:
        concurrency = self.spec.concurrency if self.is_async else 1
        while True:
            await self._work.wait()
            self._work.clear()
            slice_start = time.perf_counter()
            while self.ready and self.active < concurrency:
                if self.breaker.state != CLOSED and not self._breaker_allows():
                    break
                _, seq, p = heapq.heappop(self.ready)
                st = self.streams.get(p)
                if st is None or st.busy or st.waiting or st.revoked or not st.queue or st.queue[0][0] != seq:
                    continue
                w = st.queue[0][1]
                if w.id in self.recent:
                    # already handled here (a redelivery): skip it, it stays acked
                    self.duplicates_dropped += 1
                    self.log.debug("duplicate_dropped", event_id=w.id, seq=seq)
                    self._pop(st)
                    continue
                st.busy = True
                if self.is_async:
                    self.active += 1
                    asyncio.ensure_future(self._run_async(st))
                else:
                    self._finish(st, self._run_sync(st))
                    if time.perf_counter() - slice_start > 0.005:
                        # let the sockets and timers run between sync handlers
                        self._work.set()
                        await asyncio.sleep(0)
                        slice_start = time.perf_counter()
            self._refill()

    def _breaker_allows(self) -> bool:
        before = self.breaker.state
        allowed = self.breaker.allow(time.monotonic())
        if self.breaker.state != before:
            self.log.warning("breaker_half_open", probe_in=0)
        if not allowed:
            # nothing is taken while open: events wait here and in the journal
            self.loop.call_later(max(self.breaker.retry_in(time.monotonic()), 0.05), self._work.set)
        return allowed

    def _breaker_outcome(self, error: BaseException | None) -> None:
        if error is None and self.breaker.state == CLOSED:
            return                                   # the common case, per event: nothing to do
        now = time.monotonic()
        if isinstance(error, DependencyError):
            changed = self.breaker.failure(now)
        else:
            changed = self.breaker.success(now)     # the dependency answered
        if changed == "open":
            self.log.error("breaker_opened", reset_in=self.breaker.reset,
                           error=f"{type(error).__name__}: {error}")
        elif changed == "closed":
            self.log.warning("breaker_closed")

    def _event_and_ctx(self, st: PartitionStream) -> tuple[Event, Context]:
        seq, w = st.queue[0]
        payload = self.contracts.decode_payload(w.type, w.v, w.payload)
        event = Event(type=w.type, source=w.source, payload=payload, id=w.id, time=w.time, key=w.key,
                      priority=w.priority, correlation_id=w.correlation_id, v=w.v)
        ctx = Context(self.group, self.name, st.attempt, st.attempt > 1 or seq <= st.redelivered_upto,
                      seq, st.partition, self.spec.options, self.log, self._emit, w.id, w.correlation_id)
        return event, ctx

    def _run_sync(self, st: PartitionStream) -> BaseException | None:
        try:
            event, ctx = self._event_and_ctx(st)
            self.handle(event, ctx)
            return None
        except Exception as exc:
            return exc

    async def _run_async(self, st: PartitionStream) -> None:
        try:
            event, ctx = self._event_and_ctx(st)
            await self.handle(event, ctx)
            error = None
        except Exception as exc:
            error = exc
        self.active -= 1
        self._finish(st, error)
        self._work.set()

    def _finish(self, st: PartitionStream, error: BaseException | None) -> None:
        st.busy = False
        self._breaker_outcome(error)
        if error is None:
            self.handled += 1
            self.recent.add(st.queue[0][1].id)
            self._pop(st)
            return
        seq, w = st.queue[0]
        retry = self.spec.retry
        self.failed += 1
        if st.attempt == 1:
            st.first_failed = time.time()
        dependency = isinstance(error, DependencyError)
        if not dependency and (st.attempt >= retry.attempts or isinstance(error, PermanentError)):
            self._dead_letter(st, error)
            return
        delay = retry.backoff[min(st.attempt - 1, len(retry.backoff) - 1)] if retry.backoff else 1.0
        delay = min(delay, retry.max_backoff) * (1 + random.uniform(-retry.jitter, retry.jitter))
        self.log.warning("handler_failed", event_id=w.id, type=w.type, seq=seq, attempt=st.attempt,
                         retry_in=round(delay, 3), error=f"{type(error).__name__}: {error}")
        st.attempt += 1
        st.waiting = True
        self.loop.call_later(delay, self._retry_due, st)

    def _dead_letter(self, st: PartitionStream, error: BaseException) -> None:
        """Hand the event to the router's dead-letter store, then move on. The
        message goes out before any later ack on the same socket, so a crash in
        between redelivers the event instead of losing it."""
        seq, w = st.queue[0]
        self.dead_lettered += 1
        summary = "".join(traceback.format_exception(error)[-12:])
        self.coord.send(encoder.encode(DeadLetter(
            group=self.group, member=self.name, seq=seq, partition=st.partition, event=msgspec.Raw(encode(w)),
            error_type=type(error).__name__, error=str(error), traceback=summary, attempts=st.attempt,
            first_failed=st.first_failed or time.time())))
        self.log.error("event_dead_lettered", event_id=w.id, type=w.type, seq=seq,
                       attempts=st.attempt, error=f"{type(error).__name__}: {error}")
        self._pop(st)

    def _retry_due(self, st: PartitionStream) -> None:
        st.waiting = False
        self._ready(st)
        self._maybe_release(st)

    def _pop(self, st: PartitionStream) -> None:
        st.queue.popleft()
        st.attempt = 1
        self.queued -= 1
        if st.revoked:
            self._maybe_release(st)
        else:
            self._ready(st)

"""Running handlers for a member: priority across partitions, one event at a time
per partition, retries with backoff, the circuit breaker, dead letters.

A mixin of `Member` (nexus/member/runtime.py), which owns the streams and the sockets.

Ready partitions wait in a heap ordered by (priority, seq) of their head event. With a
sync handler the partition taken from the heap keeps the turn (`_run_stream`): for as
long as no other ready partition has a better priority, and for up to TURN_MAX events
while one of the same priority has an older head; then it goes back on the heap. So a
busy partition costs no heap push and pop per event, priority across partitions and
order within a partition are as with the heap alone, and among equal priorities the
oldest head still comes first, TURN_MAX events later at most.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from nexus.common.blackbox import SLOT0_PARTITION, SLOT0_SEQ
from nexus.errors import DependencyError, NexusError, PermanentError
from nexus.member.breaker import CLOSED
from nexus.member.context import Context
from nexus.member.stream import PartitionStream
from nexus.protocol.events import DECODE_ERRORS, Event, WireEvent, encode
from nexus.protocol.wire import DeadLetter, encoder

SLICE = 0.005  # seconds of sync handlers before the loop gets a turn (sockets, timers)
TURN_MAX = 32  # events a partition runs on while another's head of equal priority is older
MAX_PAYLOAD_DECODERS = 10_000  # (type, v) pairs whose payload decoder is cached
DEAD_LETTER_RESEND = 3.0  # seconds without the router's confirmation: send the dead letter again
CANCEL_GRACE = 2.0  # seconds a cancelled async call gets to end before the member ends itself
SOLO = 1 << 30  # added to `active` while a suspect waits to run alone or runs alone


class Dispatch:
    def _ready(self, st: PartitionStream) -> None:
        if st.queue and not st.busy and not st.waiting and not st.revoked:
            seq, ev = st.queue[0]
            heapq.heappush(self.ready, (ev.priority, seq, st.partition))
            self._work.set()

    # -- dispatch -------------------------------------------------------------------
    async def _dispatcher(self) -> None:
        concurrency = self.spec.concurrency if self.is_async else 1
        ready = self.ready
        clock = time.perf_counter
        while True:
            await self._work.wait()
            self._work.clear()
            deadline = clock() + SLICE
            while ready and self.active < concurrency:
                if self.breaker.state != CLOSED and not self._breaker_allows():
                    break
                _, seq, p = heapq.heappop(ready)
                st = self.streams.get(p)
                if st is None or st.busy or st.waiting or st.revoked or not st.queue or st.queue[0][0] != seq:
                    continue
                if not self.is_async:
                    if self._run_stream(st, deadline):
                        # let the sockets and timers run between sync handlers
                        self._work.set()
                        await asyncio.sleep(0)
                        deadline = clock() + SLICE
                    continue
                w = st.queue[0][1]
                if w.id in self.recent:
                    self._drop_duplicate(st, seq, w)
                    self._pop(st)
                    continue
                if st.solo is not None and not self._solo(st, seq, w):
                    continue
                st.busy = True
                st.timed_out = False
                st.started = self.loop_stamp
                self.active += 1
                st.task = asyncio.ensure_future(self._run_async(st))
            self._refill()

    def _run_stream(self, st: PartitionStream, deadline: float) -> bool:
        """Sync handlers: handle `st`'s head event, then its next ones while it keeps the
        turn (see the module doc). Returns True when the slice is used up (`st` is back
        on the heap then)."""
        queue, ready, recent, clock = st.queue, self.ready, self.recent, time.perf_counter
        # the black box's slot 0 (sync calls run one at a time): the partition is written
        # once per run (no call is marked then: seq word 0), the seq word per call
        words = self.box.words if self.box is not None else None
        if words is not None:
            words[SLOT0_PARTITION] = st.partition
        turn = 0
        while True:
            turn += 1
            seq, w = queue[0]
            if w.id in recent:
                self._drop_duplicate(st, seq, w)
            else:
                st.busy = True
                ctx = None
                if words is not None:
                    words[SLOT0_SEQ] = seq  # a crash from here on names this event
                self.call_stream = st  # the watchdog times this call
                self.calls += 1
                try:
                    event, ctx = self._event_and_ctx(st, seq, w)
                    self.handle(event, ctx)
                    error = None
                except Exception as exc:
                    error = exc
                self.call_stream = None
                if words is not None:
                    words[SLOT0_SEQ] = 0
                if error is not None or self.breaker.state != CLOSED or (ctx is not None and ctx.emitted):
                    self._outcome(st, error, ctx)  # retries, breaker, dead letters, emits: the general path
                    return clock() > deadline
                st.busy = False
                self.handled += 1
                if self.handled >= self.recycle_check_at:
                    self._check_recycle()  # (a plain compare per event; see Member._check_recycle)
                recent.add(w.id)
            queue.popleft()
            st.attempt = 1
            self.queued -= 1
            if not queue or st.revoked:
                self._after_pop(st)
                return clock() > deadline
            if clock() > deadline:
                self._ready(st)
                return True
            if ready:
                top = ready[0]  # (priority, seq, partition) of the best other head
                seq, w = queue[0]
                if top[0] < w.priority or (top[0] == w.priority and top[1] < seq and turn >= TURN_MAX):
                    self._ready(st)  # another partition's event comes first
                    return False

    def _drop_duplicate(self, st: PartitionStream, seq: int, w: WireEvent) -> None:
        # already handled here (a redelivery, or an id used again): skip it, it stays acked
        self.duplicates_dropped += 1
        self.log.debug("duplicate_dropped", event_id=w.id, seq=seq)

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
            return  # the common case, per event: nothing to do
        now = time.monotonic()
        if isinstance(error, DependencyError):
            changed = self.breaker.failure(now)
        else:
            changed = self.breaker.success(now)  # the dependency answered
        if changed == "open":
            self.log.error("breaker_opened", reset_in=self.breaker.reset, error=f"{type(error).__name__}: {error}")
        elif changed == "closed":
            self.log.warning("breaker_closed")

    # -- the event and context a handler gets ------------------------------------------
    def _payload_decoder(self, type_: str, v: int) -> Callable[[bytes], Any]:
        """The payload decoder of (type, v), cached in `_payload_decoders`: the contract's
        typed decoder, generic msgpack for an allowed untyped type, else one that raises
        the EventError (as `Contracts.decode_payload` does, without its lookups per event)."""
        cls = self.contracts.struct_for(type_, v)
        if cls is not None:
            decode = msgspec.msgpack.Decoder(cls).decode
        elif self.contracts.is_untyped_allowed(type_):
            decode = msgspec.msgpack.decode
        else:

            def decode(raw: bytes) -> Any:
                return self.contracts.decode_payload(type_, v, raw)  # raises EventError

        if len(self._payload_decoders) < MAX_PAYLOAD_DECODERS:
            self._payload_decoders[(type_, v)] = decode
        return decode

    def _event_and_ctx(self, st: PartitionStream, seq: int, w: WireEvent) -> tuple[Event, Context]:
        try:
            decode = self._payload_decoders.get((w.type, w.v)) or self._payload_decoder(w.type, w.v)
            payload = decode(w.payload)
        except DECODE_ERRORS:
            # the same decode again, for the EventError with its reason (handled as a failure)
            payload = self.contracts.decode_payload(w.type, w.v, w.payload)
        event = Event(w.type, w.source, payload, w.id, w.time, w.key, w.priority, w.correlation_id, w.v)
        ctx = Context(
            self.group,
            self.name,
            st.attempt,
            st.attempt > 1 or seq <= st.redelivered_upto,
            seq,
            st.partition,
            self.spec.options,
            self.log,
            self._emit,
            w.id,
            w.correlation_id,
        )
        return event, ctx

    async def _run_async(self, st: PartitionStream) -> None:
        box = self.box
        seq, w = st.queue[0]
        slot = box.begin(st.partition, seq) if box is not None else -1
        ctx = None
        try:
            event, ctx = self._event_and_ctx(st, seq, w)
            await self.handle(event, ctx)
            error = None
        except asyncio.CancelledError:
            if not st.timed_out:
                raise  # the member is stopping
            asyncio.current_task().uncancel()
            error = TimeoutError(f"handler ran past handler_timeout ({self.spec.handler_timeout:g}s)")
            self.timeouts += 1
            self.log.error(
                "handler_timed_out", event_id=w.id, seq=seq, partition=st.partition, timeout=self.spec.handler_timeout
            )
        except Exception as exc:
            error = exc
        finally:
            st.task = None
            if box is not None:
                box.end(slot)
        self.active -= 1
        if self.active == SOLO:
            self.active = 0  # a suspect's wait or its lone run is over
        self._outcome(st, error, ctx)
        self._work.set()

    def _solo(self, st: PartitionStream, seq: int, w: WireEvent) -> bool:
        """Async handlers: an event in flight with others when a member crashed (Assign.solo)
        runs with no other call in flight, so a crash on it names it alone and only the
        culprit is charged as poison (crashes.py). `SOLO` added to `active` keeps the
        dispatcher from starting anything else meanwhile. True: start it now."""
        if seq not in st.solo:
            return True
        if self.active:
            self.active += SOLO  # hold: let the running calls end first
            heapq.heappush(self.ready, (w.priority, seq, st.partition))
            return False
        self.active = SOLO  # run alone
        st.solo.discard(seq)
        if not st.solo:
            st.solo = None
        self.log.info("suspect_running_alone", seq=seq, partition=st.partition)
        return True

    def _cancel_overdue(self, now: float) -> None:
        """Async handlers: cancel calls running past handler_timeout (from the loop's tick:
        a handler call costs two stores, not a timer)."""
        limit = now - self.spec.handler_timeout
        for st in self.streams.values():
            if st.task is None or st.started >= limit:
                continue
            if not st.timed_out:
                st.timed_out = True
                st.task.cancel()
            elif st.started < limit - CANCEL_GRACE:
                # it ignores the cancellation: end the member as for a stuck sync call (exit 7,
                # counted against the event; its partitions move on)
                self.watchdog._timed_out(st, now - st.started, stopping=bool(self.stop_requested_at))

    # -- follow-up events: settled before their cause counts as handled -----------------
    def _outcome(self, st: PartitionStream, error: BaseException | None, ctx) -> None:
        if error is None and ctx is not None and ctx.emitted:
            # the head stays busy (nothing past it is acked) until the router answered for
            # every follow-up; settlement is batched per turn across partitions (_settler)
            self.settling.append((st, st.queue[0][0], ctx.emitted))
            self._settle_due.set()
            return
        self._finish(st, error)

    async def _settler(self) -> None:
        """Wait for the router's answer to the follow-ups emitted so far (one producer
        flush for everything emitted meanwhile); a NACKed follow-up fails its cause's
        handler call with the router's reason (retry, then dead letter)."""
        while True:
            await self._settle_due.wait()
            self._settle_due.clear()
            batch, self.settling = self.settling, []
            while True:
                try:
                    done, errors = await asyncio.to_thread(self._producer.settle, 5.0)
                except NexusError as exc:  # the producer's I/O failed: nothing is acked meanwhile
                    self.log.error("follow_ups_unconfirmed", causes=len(batch), error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for e in errors:
                    if len(self._emit_errors) < 100_000:
                        self._emit_errors[e.event_id] = e
                if done:
                    break
                self.log.warning("follow_ups_unconfirmed", causes=len(batch), waiting_s=5.0)
            for st, seq, ids in batch:
                if not st.busy or not st.queue or st.queue[0][0] != seq:
                    continue  # dropped meanwhile (revoked, replay): comes again
                error = next((self._emit_errors.pop(i) for i in ids if i in self._emit_errors), None)
                for i in ids:
                    self._emit_errors.pop(i, None)
                if error is not None:
                    self.emits_rejected += 1
                self._finish(st, error)
            self._work.set()

    # -- outcomes ---------------------------------------------------------------------
    def _finish(self, st: PartitionStream, error: BaseException | None) -> None:
        st.busy = False
        self._breaker_outcome(error)
        if error is None:
            self.handled += 1
            if self.handled >= self.recycle_check_at:
                self._check_recycle()
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
        self.log.warning(
            "handler_failed",
            event_id=w.id,
            type=w.type,
            seq=seq,
            attempt=st.attempt,
            retry_in=round(delay, 3),
            error=f"{type(error).__name__}: {error}",
        )
        st.attempt += 1
        st.waiting = True
        self.loop.call_later(delay, self._retry_due, st)

    def _dead_letter(self, st: PartitionStream, error: BaseException) -> None:
        """Hand the event to the router's dead-letter store. The head stays busy (so it
        is not acked and the partition keeps it) until the router confirms it stored it
        (`_on_dead_letter_stored`); the message is sent again on a timeout (`_resend_dead_letters`)."""
        seq, w = st.queue[0]
        summary = "".join(traceback.format_exception(error)[-12:])
        message = encoder.encode(
            DeadLetter(
                group=self.group,
                member=self.name,
                seq=seq,
                partition=st.partition,
                event=msgspec.Raw(encode(w)),
                error_type=type(error).__name__,
                error=str(error),
                traceback=summary,
                attempts=st.attempt,
                first_failed=st.first_failed or time.time(),
            )
        )
        st.busy = True
        st.dead_letter = (message, time.monotonic())
        self.coord.send(message)
        self.log.error(
            "event_dead_lettered",
            event_id=w.id,
            type=w.type,
            seq=seq,
            attempts=st.attempt,
            error=f"{type(error).__name__}: {error}",
        )

    def _on_dead_letter_stored(self, partition: int, seq: int) -> None:
        st = self.streams.get(partition)
        if st is None or st.dead_letter is None or not st.queue or st.queue[0][0] != seq:
            return  # a resend's second answer, or the stream was dropped
        st.dead_letter = None
        st.busy = False
        self.dead_lettered += 1
        self._pop(st)
        self._work.set()

    def _resend_dead_letters(self, now: float) -> None:
        for st in self.streams.values():
            if st.dead_letter is not None and now - st.dead_letter[1] > DEAD_LETTER_RESEND:
                st.dead_letter = (st.dead_letter[0], now)
                self.dead_letter_resends += 1
                asyncio.ensure_future(self.coord.send(st.dead_letter[0]))

    def _retry_due(self, st: PartitionStream) -> None:
        st.waiting = False
        self._ready(st)
        self._maybe_release(st)

    def _pop(self, st: PartitionStream) -> None:
        """The head event is done (handled, dead-lettered or a duplicate): on to the next."""
        st.queue.popleft()
        st.attempt = 1
        self.queued -= 1
        self._after_pop(st)

    def _after_pop(self, st: PartitionStream) -> None:
        if st.revoked:
            self._maybe_release(st)
        else:
            self._ready(st)

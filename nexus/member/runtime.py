"""The member runtime: join a group, run the handler on assigned partitions, ack.

One asyncio loop owns the coord DEALER and the SUB socket and runs the member's tasks
(coord reader, dispatcher, acker, joiner, ticker, settler). The SUB socket is read by a
loop callback on its FD, which with a sync handler also runs the events it made ready: a
live delivery reaches the handler in the loop turn it arrives in. The work is done by
parts without sockets, which the runtime wires together: it hands them what arrives,
sends what they return, and runs their timers.

    partitions  Partitions     the assigned streams, the queued count, acks, releases
    fetcher     Fetcher        live deliveries and fetch replies in; what to fetch next
    scheduler   Scheduler      which event runs next (priority, order, concurrency); the calls
    outcomes    OutcomePolicy  breaker, retries with backoff, dead letters
    followups   FollowUps      causes waiting for the router's answer to their follow-ups
    limits      RecycleLimits  max_events / max_rss
    client      GroupClient    the coord messages, encoded and decoded
    handler     Handler        the group's handler and the Event and Context of a call

Heartbeats come from a small thread with its own socket (heartbeat.py), so a long
synchronous handler does not make the router think the member died; a watchdog thread
bounds synchronous handler calls (watchdog.py).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog
import zmq
import zmq.asyncio

from nexus.common import blackbox
from nexus.config import Config, WorkerGroupConfig
from nexus.errors import ConfigError, NexusError
from nexus.member.breaker import CircuitBreaker
from nexus.member.context import Context
from nexus.member.fetcher import Fetcher, FetchRequest
from nexus.member.followups import FollowUps
from nexus.member.group import GroupClient, RecordsHead
from nexus.member.handlers import Handler, load_handler
from nexus.member.heartbeat import HeartbeatThread
from nexus.member.limits import RecycleLimits, peak_rss_bytes, rss_bytes
from nexus.member.outcomes import OutcomePolicy
from nexus.member.partitions import Partitions
from nexus.member.scheduler import SLICE, Scheduler
from nexus.member.stream import PartitionStream
from nexus.member.telemetry import MemberTelemetry
from nexus.member.watchdog import Liveness, Watchdog
from nexus.producer.client import Producer
from nexus.protocol import transport
from nexus.protocol.curve import client_keys
from nexus.protocol.events import Contracts
from nexus.protocol.wire import Assign, Coord, DeadLetterStored, Error, Pulse, Records

ACK_EVERY = 0.05
TICK = 0.1  # the loop's own timer: loop stamp, async timeouts, dead-letter resends
RECYCLE_CHECK_EVERY = TICK  # seconds between max_rss / max_events checks from the tick
DRAIN_MAX = 64  # deliveries read per SUB callback before the loop gets a turn

log = structlog.get_logger("nexus.worker")


LEAVE_TIMEOUT = 2.0  # seconds the final Leave may wait for a connection


def dispatch_parts(
    config: Config, group: str, handler: Handler, box: Any, log: Any
) -> tuple[Partitions, Scheduler, Fetcher]:
    """The socket-free path of an event through a member of `group`: its partitions, the
    scheduler that runs the handler, the fetcher that fills them (unit tests build the
    same parts, without sockets)."""
    spec = config.workers[group]
    partitions = Partitions()
    scheduler = Scheduler(
        partitions,
        handler,
        concurrency=spec.concurrency,
        dedup_window=spec.dedup_window,
        handler_timeout=spec.handler_timeout,
        box=box,
        log=log,
    )
    fetcher = Fetcher(
        partitions,
        scheduler,
        group=group,
        max_in_flight=spec.max_in_flight,
        max_in_flight_bytes=spec.max_in_flight_bytes,
        fetch_limit=config.router.fetch_limit,
        log=log,
    )
    return partitions, scheduler, fetcher


class Member:
    """Member `name` of worker group `group`. `handle`: run this function instead of the
    group's configured handler (tests and benchmarks)."""

    loop: asyncio.AbstractEventLoop
    ctx: zmq.asyncio.Context
    coord: zmq.asyncio.Socket
    sub: zmq.Socket  # a plain socket: read from a loop reader callback on its FD (_on_sub_ready)
    heartbeat: HeartbeatThread
    watchdog: Watchdog

    def __init__(self, config: Config, group: str, name: str, handle: Callable | None = None):
        if group not in config.workers:
            raise ConfigError(f"unknown worker group {group!r} (configured: {', '.join(config.workers) or 'none'})")
        self.config = config
        self.group = group
        self.name = name
        self.curve = client_keys(config)  # CURVE to a tcp:// router (security.curve or environment)
        self.spec: WorkerGroupConfig = config.workers[group]
        spec = self.spec
        self.log = log.bind(group=group, member=name)
        contracts = Contracts.from_modules(config.contracts, config.contracts_untyped)
        close = None
        if handle is None:
            handle, close = load_handler(spec.handler, dict(spec.options))
        self.handler = Handler(
            handle,
            close=close,
            contracts=contracts,
            group=group,
            member=name,
            options=spec.options,
            log=self.log,
            emit=self._emit,
        )
        self.sync = not self.handler.is_async  # sync handlers run from the SUB callback too
        self.box = blackbox.current()  # None without a launcher: no box writes
        self.client = GroupClient(group, name)
        self.partitions, self.scheduler, self.fetcher = dispatch_parts(
            config, group, self.handler, box=self.box, log=self.log
        )
        b = spec.breaker
        self.breaker = CircuitBreaker(b.failures, b.window, b.reset)
        self.outcomes = OutcomePolicy(spec.retry, self.breaker, self.client, self.log)
        self.followups = FollowUps()
        self.telemetry = MemberTelemetry(self.scheduler, self.outcomes, self.fetcher, self.handler, self.breaker)
        self.limits = RecycleLimits(spec.max_events, spec.max_rss, self.log)
        # misbehaving handlers (see docs/failure-modes-member.md)
        self.live = Liveness(stop_grace=max(config.shutdown_timeout - 2.0, config.shutdown_timeout * 0.5))
        self.producer: Producer | None = None  # sends the follow-ups (ctx.emit); made on the first
        self.stop_event = asyncio.Event()
        self.joined = asyncio.Event()
        self._rejoin_needed = asyncio.Event()
        self._settle_due = asyncio.Event()
        self._sub_fd: int | None = None  # the SUB socket's FD while the loop reads it
        self._sub_due = False  # a SUB read is scheduled with call_soon (_sub_recheck)
        self._slice_over = False  # the dispatcher task ran out of its slice and goes on next turn

    def stats(self) -> dict:
        """Counters for `nexus status` (read from the heartbeat thread)."""
        return {
            "handled": self.scheduler.handled,
            "failed": self.outcomes.failed,
            "dead_lettered": self.outcomes.dead_lettered,
            "duplicates_dropped": self.scheduler.duplicates_dropped,
            "bad_events": self.fetcher.bad_events,
            "bad_deliveries": self.fetcher.bad_deliveries,
            "queued": self.partitions.queued,
            "breaker": self.breaker.state,
            "timeouts": self.scheduler.timeouts,
            "rss": rss_bytes(),
            "rss_peak": peak_rss_bytes(),  # what max_rss is checked against
            "emits_rejected": self.followups.rejected,
        }

    # -- lifecycle -------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.asyncio.Context()
        self.coord = transport.connect(
            self.ctx, zmq.DEALER, self.config.coord, identity=self.client.identity(), curve=self.curve
        )
        # a plain socket on the same context: nothing awaits it (no future per message); the
        # loop calls _on_sub_ready when its FD signals
        self.sub = transport.subscriber(zmq.Context.shadow(self.ctx.underlying), self.config.publish, curve=self.curve)
        self.heartbeat = HeartbeatThread(
            self.config.coord,
            self.client,
            self.config.router.heartbeat_interval,
            self._on_pulse_threadsafe,
            stats=self.stats,
            curve=self.curve,
            metrics=self.telemetry.snapshot,
        )
        self.watchdog = Watchdog(
            self.scheduler,
            self.partitions,
            self.client,
            self.live,
            endpoint=self.config.coord,
            handler_timeout=self.spec.handler_timeout,
            sync=self.sync,
            box=self.box,
            log=self.log,
            curve=self.curve,
        )
        self.watchdog.start()
        # what starting made (imports, config, the handler and its modules) lives as long as
        # the member: out of the collector's reach, so a full collection during the run scans
        # only what the run made (it took ~28 ms over 36,000 objects, a stall of every event)
        gc.freeze()
        tasks = [
            asyncio.ensure_future(c)
            for c in (
                self._coord_reader(),
                self._dispatcher(),
                self._acker(),
                self._joiner(),
                self._ticker(),
                self._settler(),
            )
        ]
        self._start_intake()
        try:
            await self.stop_event.wait()
            await self._drain()
        finally:
            self._stop_intake()
            self.watchdog.stop()
            self.heartbeat.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.producer is not None:
                try:
                    await asyncio.to_thread(self.producer.close, 5.0)
                except Exception as exc:
                    self.log.error("emit_flush_failed", error=str(exc))
            if self.handler.close is not None:
                result = self.handler.close()
                if inspect.isawaitable(result):
                    await result
            self.coord.close(linger=500)
            self.ctx.term()
            self.log.info("member_stopped", handled=self.scheduler.handled, failed=self.outcomes.failed)

    async def _joiner(self) -> None:
        """Join, and join again whenever the router forgot us (router restart)."""
        while True:
            if not self.joined.is_set():
                await self._send(self.client.join(self.partitions.holding()))
            try:
                async with asyncio.timeout(1.0):
                    await self.joined.wait()
            except TimeoutError:
                continue  # no answer: join again
            await self._rejoin_needed.wait()
            self._rejoin_needed.clear()
            self.joined.clear()

    async def _drain(self) -> None:
        """Graceful stop: take nothing new, finish in-flight events, ack, leave."""
        self._stop_intake()
        self.partitions.revoke_all()
        # leave before the launcher's shutdown_timeout runs out: a stuck call is left unacked
        deadline = (self.live.stop_requested_at or time.monotonic()) + self.live.stop_grace
        while self.partitions.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        acks = self.partitions.final_acks()
        busy = self.partitions.busy()  # unacked, maybe half done
        if busy:
            self.log.warning("drain_deadline_passed", busy=busy)
        try:  # bounded: with no connection (a revoked key) the send would wait forever
            async with asyncio.timeout(LEAVE_TIMEOUT):
                await self._send(self.client.leave(acks, busy))
        except TimeoutError:
            self.log.warning("leave_not_sent", reason="no connection to the router")

    async def _send(self, data: bytes) -> None:
        await self.coord.send(data)

    def _post(self, data: bytes) -> None:
        """Send from code on the loop that does not wait (the socket keeps the order)."""
        self.coord.send(data)

    def _post_fetches(self, requests: Sequence[FetchRequest]) -> None:
        for r in requests:
            self._post(self.client.fetch(r.partition, r.after, r.limit))
        if self.fetcher.sub_changes:
            self._apply_sub_changes()

    def _apply_sub_changes(self) -> None:
        """Streams muted while behind, or live again (Fetcher.sub_changes)."""
        changes, self.fetcher.sub_changes = self.fetcher.sub_changes, []
        for p, on in changes:  # (none come after _drain closed the socket: every stream is revoked)
            self.sub.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, self.client.topic(p))
        self._sub_recheck()

    # -- coord -------------------------------------------------------------------
    async def _coord_reader(self) -> None:
        while True:
            raw = await self.coord.recv()
            msg = self.client.read(raw)
            if msg is None:
                self.log.error("bad_coord_message")
            elif isinstance(msg, Assign):
                self._on_assign(msg)
            elif isinstance(msg, RecordsHead):
                self._on_records(msg, len(raw), raw)  # (its events are read from raw later)
            elif isinstance(msg, Records):
                self._on_records(msg, len(raw))
            elif isinstance(msg, Error):
                self._on_error(msg)
            elif isinstance(msg, DeadLetterStored):
                self._on_dead_letter_stored(msg.partition, msg.seq)

    def _on_error(self, msg: Error) -> None:
        if msg.code == "unknown_member":
            if self.joined.is_set():
                self.log.warning("rejoining", reason=msg.reason)
                self._rejoin_needed.set()
        elif msg.code == "unknown_group":
            self.log.error("group_unknown_to_router", reason=msg.reason)
            self.stop_event.set()
        else:
            self.log.error("router_error", reason=msg.reason, code=msg.code)

    def _on_pulse_threadsafe(self, msg: Coord) -> None:
        self.loop.call_soon_threadsafe(self._on_pulse, msg)

    def _on_pulse(self, msg: Coord) -> None:
        if isinstance(msg, Error):
            self._on_error(msg)
        elif isinstance(msg, Pulse):
            self._post_fetches(self.fetcher.on_heads(msg.heads))

    def _on_assign(self, msg: Assign) -> None:
        if not self.joined.is_set():
            self.joined.set()
            if not self.heartbeat.started:
                self.heartbeat.start()  # only now: a beat before the join would be refused
        if msg.skip:
            self.log.warning("poison_skipped", skip={p: sorted(s) for p, s in msg.skip.items()})
        change = self.partitions.assign(msg)
        for p in change.unsubscribe:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, self.client.topic(p))
        if not self.stop_event.is_set():
            for p, upto in change.released.items():
                self._post(self.client.released({p: upto}))
        if change.replay:
            self.scheduler.forget_handled()
        for p in change.subscribe:
            self.sub.setsockopt(zmq.SUBSCRIBE, self.client.topic(p))
        if change.subscribe or change.unsubscribe:
            self._sub_recheck()
        for st in change.fetch:
            self._post_fetches(self.fetcher.fetch(st))
        for st in change.skipped:
            self.scheduler.ready(st)
        self.log.info("partitions_assigned", partitions=sorted(set(msg.partitions)), granted=sorted(msg.grants))

    def _release(self, st: PartitionStream) -> None:
        """A revoked stream whose head is finished: Released, with its final ack."""
        upto = self.partitions.release(st)
        if upto is not None and not self.stop_event.is_set():
            self._post(self.client.released({st.partition: upto}))

    # -- intake ------------------------------------------------------------------
    def _start_intake(self) -> None:
        """Read the SUB socket from a loop callback on its FD: a delivery reaches a sync
        handler in the loop turn it arrives in, not after a future, the reader task and the
        dispatcher task each took a turn."""
        self._sub_fd = self.sub.FD
        self.loop.add_reader(self._sub_fd, self._on_sub_ready)
        self._sub_recheck()  # (messages may have arrived before the reader was added)

    def _stop_intake(self) -> None:
        """Take nothing more from the SUB socket (before it closes: its FD goes with it)."""
        if self._sub_fd is not None:
            self.loop.remove_reader(self._sub_fd)
            self._sub_fd = None
        self.sub.close(0)

    def _sub_recheck(self) -> None:
        """Read the SUB socket at the loop's next turn. ZMQ_FD is edge triggered and any call
        on the socket (a setsockopt, an EVENTS read) may take the edge, so whoever touched
        the socket outside _on_sub_ready asks for this."""
        if not self._sub_due:
            self._sub_due = True
            self.loop.call_soon(self._on_sub_ready)

    def _on_sub_ready(self) -> None:
        """The SUB FD signalled (or a recheck is due): read what is queued, until EVENTS
        shows nothing more, which re-arms the edge. At most DRAIN_MAX deliveries per call
        (the rest on the next turn, after the loop's other callbacks: acks, fetch replies,
        async handlers, timers); then, with a sync handler, run the ready events now."""
        self._sub_due = False
        if self._sub_fd is None:
            return  # not reading (yet, or any more)
        sub = self.sub
        sched = self.scheduler
        inline = self.sync and not self._slice_over  # (else the dispatcher task goes on next turn)
        sched.quiet, sched.noted = inline, False
        more = inline  # (should this raise: the dispatcher task takes what is ready)
        try:
            self._read_sub(sub)
            if inline:
                more = (sched.noted or sched.work.is_set()) and self._dispatch()
        finally:
            sched.quiet = False
            if more:
                sched.work.set()  # the slice ran out: the dispatcher task goes on after a turn

    def _read_sub(self, sub: zmq.Socket) -> None:
        on_delivery = self._on_delivery
        try:
            for _ in range(DRAIN_MAX):
                if not cast(int, sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    return  # (this EVENTS read re-armed the edge)
                on_delivery(sub.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:  # (POLLIN, then nothing: the recheck's EVENTS read re-arms the edge)
            pass
        self._sub_recheck()  # more may be queued and the edge is not re-armed: next turn

    def _on_records(self, msg: Records | RecordsHead, nbytes: int | None = None, raw: bytes | None = None) -> None:
        self._post_fetches(self.fetcher.on_records(msg, nbytes, raw))

    def _on_delivery(self, frames: list[bytes]) -> None:
        wanted = self.fetcher.on_delivery(frames)
        if wanted or self.fetcher.sub_changes:
            self._post_fetches(wanted)

    # -- dispatch ----------------------------------------------------------------
    async def _dispatcher(self) -> None:
        """Runs _dispatch when the scheduler has work: for async handlers, and for sync ones
        whatever becomes ready outside the SUB callback (fetch replies, retries, settled
        follow-ups), and the rest of a pass that ran out of its slice."""
        work = self.scheduler.work
        while True:
            await work.wait()
            work.clear()
            try:
                while self._dispatch():
                    # let the sockets and timers run between sync handlers; the SUB callback
                    # leaves the ready events to this task meanwhile
                    self._slice_over = True
                    await asyncio.sleep(0)
            finally:
                self._slice_over = False

    def _dispatch(self) -> bool:
        """One pass: start what is ready, up to SLICE seconds of sync handlers. True when the
        slice ran out with more ready (the caller goes on after a loop turn). Called from
        the dispatcher task and, with a sync handler, from the SUB callback."""
        sched, outcomes, limits, live = self.scheduler, self.outcomes, self.limits, self.live
        sync = self.sync
        clock = time.perf_counter
        deadline = clock() + SLICE
        while (st := sched.next()) is not None:
            closed = outcomes.closed
            if not closed and (wait := outcomes.admit(time.monotonic())):
                sched.put_back(st)  # nothing is taken while open
                self.loop.call_later(wait, sched.work.set)
                break
            if not sync:
                if sched.start(st, live.loop_stamp):
                    st.task = asyncio.ensure_future(self._call(st))
                continue
            outcome = sched.run(st, deadline, every_outcome=not closed)
            if outcome is not None:
                self._outcome(st, *outcome)
            elif st.revoked:
                self._release(st)
            if sched.handled >= limits.check_at:
                self._check_recycle()  # (a plain compare per turn)
            if clock() > deadline:
                return True
        if sync:
            # nothing is ready now (or the breaker's timer sets `work` again): the dispatcher
            # task need not wake for the ready() calls this pass served
            sched.work.clear()
        self._post_fetches(self.fetcher.refill())
        return False

    async def _call(self, st: PartitionStream) -> None:
        self._outcome(st, *await self.scheduler.call(st))
        self.scheduler.work.set()

    def _outcome(self, st: PartitionStream, error: BaseException | None, ctx: Context | None) -> None:
        if error is None and ctx is not None and ctx.emitted:
            # the head stays busy (nothing past it is acked) until the router answered for
            # every follow-up (_settler)
            self.followups.add(st, ctx.emitted)
            self._settle_due.set()
            return
        self._finish(st, error)

    def _finish(self, st: PartitionStream, error: BaseException | None) -> None:
        verdict = self.outcomes.judge(st, error)
        if verdict.action == "done":
            self.scheduler.done(st)
            if self.scheduler.handled >= self.limits.check_at:
                self._check_recycle()
            if st.revoked:
                self._release(st)
        elif verdict.action == "retry":
            self.loop.call_later(verdict.delay, self._retry_due, st)
        elif error is not None:
            self._post(self.outcomes.dead_letter(st, error))

    def _retry_due(self, st: PartitionStream) -> None:
        st.waiting = False
        self.scheduler.ready(st)
        self._release(st)

    def _on_dead_letter_stored(self, partition: int, seq: int) -> None:
        st = self.partitions.streams.get(partition)
        if st is not None and self.outcomes.stored(st, seq):
            self.scheduler.pop(st)
            if st.revoked:
                self._release(st)
            self.scheduler.work.set()

    async def _settler(self) -> None:
        """Wait for the router's answer to the follow-ups emitted so far (one producer
        flush for everything emitted meanwhile); a NACKed follow-up fails its cause's
        handler call with the router's reason (retry, then dead letter)."""
        while True:
            await self._settle_due.wait()
            self._settle_due.clear()
            batch = self.followups.take()
            producer = self.producer
            assert producer is not None  # (made by the emits that put causes in the batch)
            while True:
                try:
                    done, errors = await asyncio.to_thread(producer.settle, 5.0)
                except NexusError as exc:  # the producer's I/O failed: nothing is acked meanwhile
                    self.log.error("follow_ups_unconfirmed", causes=len(batch), error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                self.followups.rejections(errors)
                if done:
                    break
                self.log.warning("follow_ups_unconfirmed", causes=len(batch), waiting_s=5.0)
            for st, error in self.followups.outcomes(batch):
                self._finish(st, error)
            self.scheduler.work.set()

    def _emit(self, type_: str, payload: Any, **kw: Any) -> str:
        if self.producer is None:
            self.producer = Producer(
                self.config.confirm,
                source=f"worker:{self.group}",
                max_event_bytes=self.config.router.max_event_bytes,
                curve=self.curve,
            )
        return self.producer.send(type_, payload, **kw)

    # -- timers --------------------------------------------------------------------
    async def _acker(self) -> None:
        while True:
            await asyncio.sleep(ACK_EVERY)
            acks = self.partitions.due_acks()
            if not acks:
                continue
            # (follow-ups need no flush here: a cause that emitted stays the busy head of its
            # stream, so it is not acked, until the router answered for them; see _settler)
            await self._send(self.client.ack(acks))
            self.partitions.acks_sent(acks)

    async def _ticker(self) -> None:
        """The loop's own heartbeat: stamp it for the watchdog thread (which beats the black
        box), cancel overdue async handlers, resend unconfirmed dead letters, and check the
        recycle limits now and then."""
        next_check = time.monotonic() + RECYCLE_CHECK_EVERY
        while True:
            await asyncio.sleep(TICK)
            now = self.live.loop_stamp = time.monotonic()
            if self.handler.is_async:
                self._cancel_overdue(now)
            for message in self.outcomes.resends(self.partitions.streams.values(), now):
                self._post(message)
            if now >= next_check:
                next_check = now + RECYCLE_CHECK_EVERY
                self._check_recycle()

    def _cancel_overdue(self, now: float) -> None:
        for st, running in self.scheduler.cancel_overdue(now):
            # it ignores its cancellation: end the member as for a stuck sync call
            self.watchdog.timed_out(st, running, stopping=bool(self.live.stop_requested_at))

    def _check_recycle(self) -> None:
        if self.limits.check(self.scheduler.handled, stopping=self.stop_event.is_set()):
            # graceful: take nothing new, finish and ack what is in flight, leave, exit RECYCLE
            self.log.warning("member_recycling", reason=self.limits.recycling, handled=self.scheduler.handled)
            self.stop_event.set()


def main(config: Config, group: str, name: str) -> None:
    run_member(lambda: Member(config, group, name))


def run_member(make: Callable[[], Any]) -> None:
    """Run the member `make()` builds (either engine's: it has live, stop_event, limits
    and run()) until it stops; SIGTERM and SIGINT ask it to drain. Exits with the
    recycling code when it recycled."""
    import signal
    import sys

    members: list[Any] = []

    async def runner() -> None:
        member = make()
        members.append(member)
        loop = asyncio.get_running_loop()

        def on_signal(signum, frame) -> None:  # noqa: ARG001
            # a plain handler, not loop.add_signal_handler: it runs even while a sync
            # handler blocks the loop, so the watchdog sees the stop and bounds that call
            if not member.live.stop_requested_at:
                member.live.stop_requested_at = time.monotonic()
            loop.call_soon_threadsafe(member.stop_event.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        await member.run()

    asyncio.run(runner())
    if members and members[0].limits.recycling:
        sys.exit(int(members[0].limits.exit_code))

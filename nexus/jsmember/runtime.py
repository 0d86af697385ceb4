"""The member runtime under `engine: nats`: own partitions through the group bucket, read
them through JetStream consumers, run the handler, ack.

One asyncio loop runs the member's tasks: the bucket watch, the balancer (takes and lets
go of partitions), a fetch loop per owned partition, the dispatcher, the acker, the ticker
and the settler. The heartbeat record is written from its own thread (heartbeat.py), the
watchdog thread bounds synchronous calls (nexus/member/watchdog.py). The event path is the
embedded member's, without sockets:

    partitions  Partitions     the owned streams, fed (stream seq, WireEvent); acks due
    scheduler   Scheduler      which event runs next (priority, order, concurrency); the calls
    outcomes    OutcomePolicy  breaker, retries with backoff; dead letters go to JetStream
    followups   FollowUps      causes waiting for the ingest process's answer to their emits
    limits      RecycleLimits  max_events / max_rss
    handler     Handler        the group's handler and the Event and Context of a call
    leases      Leases         the bucket: our heartbeat, owner records, the roster
    intake      Intake         validation of whatever a NATS client published

Fencing: a member owns its partitions as long as its heartbeat record keeps changing. It
stops handling (drops every partition, acks nothing) once its own heartbeat writes failed
for longer than most of the dead-member timeout, so a paused member that resumes does not
race the new owner; the owner's new consumer generation fences its late acks anyway.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from nexus.common import blackbox
from nexus.config import Config, WorkerGroupConfig
from nexus.errors import ConfigError, NexusError
from nexus.jetstream import setup
from nexus.jetstream.connect import connect
from nexus.jetstream.names import Names
from nexus.jetstream.records import MemberRecord, OwnerRecord
from nexus.jsmember import deadletters, ownership, reader
from nexus.jsmember.heartbeat import HeartbeatThread
from nexus.jsmember.intake import Intake, Rejected
from nexus.jsmember.leases import Leases, Roster
from nexus.jsmember.reader import Owned
from nexus.member.breaker import CircuitBreaker
from nexus.member.context import Context
from nexus.member.followups import FollowUps
from nexus.member.group import GroupClient
from nexus.member.handlers import Handler, load_handler
from nexus.member.limits import RecycleLimits, peak_rss_bytes, rss_bytes
from nexus.member.outcomes import OutcomePolicy
from nexus.member.runtime import dispatch_parts, run_member
from nexus.member.scheduler import SLICE
from nexus.member.stream import PartitionStream
from nexus.member.telemetry import MemberTelemetry
from nexus.member.watchdog import Liveness, Watchdog
from nexus.producer.client import Producer
from nexus.protocol.events import Contracts

ACK_EVERY = 0.05
TICK = 0.1
FENCE_SHARE = 0.75  # of the dead-member timeout: past it without a beat of ours, stop handling
FIRST_BEAT_WAIT = 30.0  # seconds to wait for our first heartbeat write before going on (fenced)
RELEASE_WAIT = 10.0  # seconds a release waits for the head's call before giving up on acking it

log = structlog.get_logger("nexus.worker")
T = TypeVar("T")


class JsWatchdog(Watchdog):
    """The embedded watchdog (sync call bound, black box beats); a stuck call ends the
    member without final acks: what it handled since its last ack comes to the next owner
    again, flagged redelivered (its consumer's delivered seq)."""

    def _final_acks(self) -> None:
        pass


class JsMember:
    def __init__(self, config: Config, group: str, name: str, handle: Callable | None = None):
        if group not in config.workers:
            raise ConfigError(f"unknown worker group {group!r} (configured: {', '.join(config.workers) or 'none'})")
        self.config, self.group, self.name = config, group, name
        self.member = ownership.member_id(name, socket.gethostname(), os.getpid())
        self.spec: WorkerGroupConfig = config.workers[group]
        spec = self.spec
        self.names = Names.of(config)
        self.log = log.bind(group=group, member=self.member)
        contracts = Contracts.from_modules(config.contracts, config.contracts_untyped)
        self.intake = Intake(contracts, spec.subscribe)
        close = None
        if handle is None:
            handle, close = load_handler(spec.handler, dict(spec.options))
        self.handler = Handler(
            handle,
            close=close,
            contracts=contracts,
            group=group,
            member=self.member,
            options=spec.options,
            log=self.log,
            emit=self._emit,
        )
        self.sync = not self.handler.is_async
        self.box = blackbox.current()
        self.client = GroupClient(group, self.member)  # (the watchdog's and outcomes' signature)
        self.partitions, self.scheduler, fetcher = dispatch_parts(config, group, self.handler, self.box, self.log)
        b = spec.breaker
        self.breaker = CircuitBreaker(b.failures, b.window, b.reset)
        self.outcomes = OutcomePolicy(spec.retry, self.breaker, self.client, self.log)
        self.followups = FollowUps()
        self.telemetry = MemberTelemetry(self.scheduler, self.outcomes, fetcher, self.handler, self.breaker)
        self.limits = RecycleLimits(spec.max_events, spec.max_rss, self.log)
        self.live = Liveness(stop_grace=max(config.shutdown_timeout - 2.0, config.shutdown_timeout * 0.5))
        self.producer: Producer | None = None
        interval = config.router.heartbeat_interval
        self.interval = interval
        self.dead_after = interval * config.router.heartbeat_misses
        # (with heartbeat_misses 1 the lease is one interval: fencing cannot be tighter than
        # the beats' own jitter, so it waits 1.5 intervals)
        self.fence_after = max(self.dead_after * FENCE_SHARE, interval * 1.5)
        self.lapses_seen = 0  # heartbeat lapses acted on (fenced)
        self.roster = Roster(self.dead_after)
        self.owned: dict[int, Owned] = {}
        self.taking: set[int] = set()
        self.stop_event = asyncio.Event()
        self._settle_due = asyncio.Event()
        self._rebalance = asyncio.Event()
        self.started = time.time()
        self.rejected = 0
        self.passed = 0  # events of types the group does not subscribe to
        self.fenced_count = 0
        self.lost_count = 0
        self.tasks: list[asyncio.Task] = []

    def stats(self) -> dict:
        return {
            "handled": self.scheduler.handled,
            "failed": self.outcomes.failed,
            "dead_lettered": self.outcomes.dead_lettered,
            "duplicates_dropped": self.scheduler.duplicates_dropped,
            "bad_events": self.rejected,
            "queued": self.partitions.queued,
            "breaker": self.breaker.state,
            "timeouts": self.scheduler.timeouts,
            "rss": rss_bytes(),
            "rss_peak": peak_rss_bytes(),
            "emits_rejected": self.followups.rejected,
            "partitions_lost": self.lost_count,
            "fenced": self.fenced_count,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.watchdog = JsWatchdog(
            self.scheduler,
            self.partitions,
            self.client,
            self.live,
            endpoint=self.config.coord,
            handler_timeout=self.spec.handler_timeout,
            sync=self.sync,
            box=self.box,
            log=self.log,
        )
        self.watchdog.start()  # (it beats the black box from now on, while we wait for the cluster)
        self.nc: Client = await connect(self.config, f"nexus-worker-{self.member}")
        self.js: JetStreamContext = self.nc.jetstream()
        try:
            # a stop while the cluster cannot answer yet (forming, unreachable) ends the wait
            joining = asyncio.ensure_future(self._join())
            stopping = asyncio.ensure_future(self.stop_event.wait())
            await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not joining.done():
                joining.cancel()
                await asyncio.gather(joining, return_exceptions=True)
                return
            joining.result()  # (its error, if any)
            gc.freeze()
            self.balancer = asyncio.ensure_future(self._balancer())
            self.tasks.append(self.balancer)
            for c in (self._dispatcher(), self._acker(), self._ticker(), self._settler()):
                self.tasks.append(asyncio.ensure_future(c))
            self.log.info("member_started", group_start=self.group_start)
            await self.stop_event.wait()
            await self._drain()
        finally:
            await self._close()

    async def _join(self) -> None:
        """The streams and bucket, the group's start, our first beat, the bucket's watch."""
        await setup.ensure(self.js, self.config, log=self.log)
        kv = await self._until_ready("bucket", lambda: self.js.key_value(self.names.bucket))
        self.leases = Leases(self.js, kv, self.names, self.group, self.member, self.roster)
        self.group_start = await self._until_ready("group", lambda: self.leases.group_start(self.spec.start))
        self.heart = HeartbeatThread(
            self.config, self.group, self.member, self._record, self.interval, self.fence_after, self.log
        )
        self.heart.start()
        deadline = time.monotonic() + FIRST_BEAT_WAIT
        while not self.heart.first.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self.heart.first.is_set():
            self.log.warning("heartbeat_not_written", waited_s=FIRST_BEAT_WAIT)  # (fenced: takes nothing)
        await self._until_ready("watch", self.leases.watch)

    async def _until_ready(self, step: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, again while the cluster cannot answer yet (a forming cluster elects the
        new streams' leaders after they were created)."""
        while True:
            try:
                return await call()
            except setup.NOT_READY as exc:
                self.log.info("jetstream_not_ready", step=step, error=repr(exc))
                await asyncio.sleep(0.5)

    async def _close(self) -> None:
        if hasattr(self, "watchdog"):
            self.watchdog.stop()
        if hasattr(self, "heart"):
            await asyncio.to_thread(self.heart.stop, False)  # (after a drain: stopped already)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for own in list(self.owned.values()):
            self._stop_reader(own)
        if self.producer is not None:
            try:
                await asyncio.to_thread(self.producer.close, 5.0)
            except Exception as exc:
                self.log.error("emit_flush_failed", error=str(exc))
        if self.handler.close is not None:
            result = self.handler.close()
            if inspect.isawaitable(result):
                await result
        if hasattr(self, "leases"):
            await self.leases.stop()
        await self.nc.close()
        self.log.info("member_stopped", handled=self.scheduler.handled, failed=self.outcomes.failed)

    async def _drain(self) -> None:
        """Graceful stop: let go of every partition (finish the head, ack, mark released),
        then delete our member record."""
        self.balancer.cancel()  # take nothing new (the heartbeat goes on meanwhile: our lease)
        await asyncio.gather(*(self._release(own) for own in list(self.owned.values())), return_exceptions=True)
        await asyncio.to_thread(self.heart.stop, True)

    # -- heartbeat and fencing ---------------------------------------------------------------
    def _record(self, beat: int) -> MemberRecord:
        """Our heartbeat record (built on the heartbeat thread: reads counts the loop writes)."""
        return MemberRecord(
            group=self.group,
            member=self.member,
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self.started,
            beat=beat,
            time=time.time(),
            partitions=sorted(list(self.owned)),
            stats=self.stats(),
            metrics=self.telemetry.snapshot(),
        )

    def fenced(self) -> bool:
        """Our lease may have run out: no beat for a while, or a gap between two beats."""
        heart = self.heart
        return time.monotonic() - heart.ok_at > self.fence_after or heart.lapses != self.lapses_seen

    def _fence(self) -> None:
        if time.monotonic() - self.heart.ok_at <= self.fence_after:
            self.lapses_seen = self.heart.lapses  # (beating again: what we take from now on is ours)
        if self.owned:
            self.fenced_count += 1
            self.log.warning("fenced", reason="own heartbeat stale", partitions=sorted(self.owned))
            for own in list(self.owned.values()):
                self._lose(own, "fenced")

    # -- ownership ---------------------------------------------------------------------------
    async def _balancer(self) -> None:
        """Every half interval (or when the bucket changed): lose what changed under us,
        let go of what the target gives others, take what it gives us and is free."""
        await asyncio.sleep(self.interval)  # see the members that started with us first
        while True:
            try:
                await self._balance()
            except (NatsError, TimeoutError) as exc:
                self.log.warning("rebalance_failed", error=repr(exc))
            except Exception as exc:  # (a bug must not end rebalancing for good: log it, go on)
                self.log.error("rebalance_failed", error=repr(exc), exc_info=True)
            try:
                async with asyncio.timeout(self.interval / 2):
                    await self.leases.owner_changed.wait()
            except TimeoutError:
                pass
            self.leases.owner_changed.clear()

    async def _balance(self) -> None:
        owners = self.leases.owners
        for p, own in list(self.owned.items()):
            seen = owners.get(p)
            if seen is not None and seen[0] > own.revision and not own.releasing:
                if msgspec.structs.replace(seen[1], skip=own.record.skip) == own.record:
                    self._skip(own, *seen)  # only `skip` changed: poison to pass over, still ours
                else:
                    self._lose(own, "owner record changed")
        if self.fenced():
            self._fence()
            return
        alive = await self.leases.alive(rec.member for _, rec in owners.values()) | {self.member}
        live_owner = {p: rec.member for p, (_, rec) in owners.items() if rec.member in alive}
        live_owner.update(dict.fromkeys(self.owned, self.member))
        for p in [p for p, m in live_owner.items() if m == self.member and p not in self.owned]:
            del live_owner[p]  # a record naming us that we do not hold (a failed take): free
        wanted = ownership.target(sorted(alive), self.spec.partitions, live_owner)
        for p, own in list(self.owned.items()):
            if wanted.get(p) != self.member and not own.releasing:
                asyncio.ensure_future(self._release(own))
        for p, (_, rec) in sorted(owners.items()):
            if rec.member == self.member and p not in self.owned and wanted.get(p) != self.member:
                await self._disown(p)
        for p, m in sorted(wanted.items()):
            if m == self.member and p not in self.owned and p not in live_owner and not self.stop_event.is_set():
                await self._take(p, alive)

    async def _disown(self, p: int) -> None:
        """A record names us for a partition we do not hold and the target gives to another
        (a take that failed after its compare-and-set, or a partition we were fenced from):
        the others wait for a live owner to let go, so free it. Not `released`: the next
        owner flags what the record's consumer delivered, as after a crash."""
        rev, rec = await self.leases.owner(p)
        if rec is None or rec.member != self.member or p in self.owned:
            return
        if await self.leases.swap(p, msgspec.structs.replace(rec, member=""), rev) is not None:
            self.log.info("partition_disowned", partition=p, generation=rec.generation)

    async def _take(self, p: int, alive: set[str]) -> None:
        rev, rec = await self.leases.owner(p)
        if rec is not None and rec.member and rec.member != self.member:
            # (the record read now may name a member newer than the watch's view: one that
            # took it a moment ago, its first beat not seen yet; it is read, not presumed dead)
            if rec.member in alive or rec.member in await self.leases.alive([rec.member]):
                return  # its owner lives: it lets go first
        stream = self.names.stream
        state = await reader.consumer_state(self.js, stream, rec.consumer) if rec and rec.consumer else None
        new = ownership.take_plan(self.group, p, self.member, rec, state, self.group_start)
        revision = await self.leases.swap(p, new, rev)
        if revision is None:
            return  # changed meanwhile: next round
        config = reader.consumer_config(
            new.consumer,
            self.names.partition_subjects(self.group, p, self.spec.partitions),
            new.start_seq,
            ack_wait=self.spec.handler_timeout * 2 + 30,
            replicas=self.config.nats.replicas,
        )
        psub = await reader.open_consumer(self.js, stream, config)
        if rec is not None and rec.consumer and rec.consumer != new.consumer:
            await reader.delete_consumer(self.js, stream, rec.consumer)
        if rec is not None and rec.reset_to:
            self.scheduler.forget_handled()  # a replay: what was handled comes again, to be handled again
        st = PartitionStream(p, new.start_seq - 1, new.redeliver_upto)
        if new.skip:
            st.add_skip(new.skip)  # dead-lettered poison: passed over (acked past, never handled)
        own = Owned(p, revision, new, st, psub)
        self.partitions.acked.pop(p, None)
        self.partitions.streams[p] = st
        self.owned[p] = own
        own.task = asyncio.ensure_future(self._read(own))
        self.log.info(
            "partition_taken",
            partition=p,
            generation=new.generation,
            start_seq=new.start_seq,
            redeliver_upto=new.redeliver_upto,
            from_member=rec.member if rec else "",
        )

    def _skip(self, own: Owned, revision: int, record: OwnerRecord) -> None:
        """The ingest's admin added seqs to the record's `skip` (poison that killed members,
        now dead-lettered): pass over them from now on; queued copies leave the queue."""
        added = set(record.skip) - set(own.record.skip)
        own.revision, own.record = revision, record
        if added:
            self.partitions.popped(own.stream.add_skip(added))
            self.scheduler.ready(own.stream)
            self.log.warning("poison_skipped", partition=own.partition, seqs=sorted(added))

    def _stop_reader(self, own: Owned) -> None:
        if own.task is not None and own.task is not asyncio.current_task():
            own.task.cancel()
        if own.psub is not None:
            asyncio.ensure_future(self._unsubscribe(own.psub))
            own.psub = None

    @staticmethod
    async def _unsubscribe(psub: Any) -> None:
        try:
            await psub.unsubscribe()
        except Exception:  # (the connection may be closing)
            pass

    def _lose(self, own: Owned, why: str) -> None:
        """The partition is not ours any more: stop at once, ack nothing (a call running on
        its head finishes, its outcome goes nowhere)."""
        own.lost.set()
        self._stop_reader(own)
        st = own.stream
        st.revoked = True
        self.partitions.drop_queued(st)
        if self.partitions.streams.get(own.partition) is st:
            del self.partitions.streams[own.partition]
        self.partitions.acked.pop(own.partition, None)
        self.owned.pop(own.partition, None)
        self.lost_count += 1
        self.log.warning("partition_lost", partition=own.partition, reason=why)

    async def _release(self, own: Owned) -> None:
        """Let go cleanly: stop fetching, finish the head, ack it, mark the record released."""
        if own.releasing or own.lost.is_set():
            return
        own.releasing = True
        self._stop_reader(own)
        st = own.stream
        st.revoked = True
        self.partitions.drop_queued(st)
        # (a drain: within the launcher's shutdown_timeout, as the embedded member's)
        wait = self.live.stop_grace if self.stop_event.is_set() else RELEASE_WAIT
        deadline = time.monotonic() + wait
        while st.busy and not own.lost.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if own.lost.is_set():
            return
        if st.busy:  # (a stuck call: the watchdog ends us; leave it to the next owner, flagged)
            self._lose(own, "release: head still running")
            return
        if self.fenced():  # (our lease may be gone: no ack, no "released" claim)
            self._lose(own, "release: own heartbeat stale")
            return
        upto = st.handled_upto()
        try:
            msg = own.take_acks(upto)
            if msg is not None:
                await msg.ack_sync(timeout=5.0)
            revision = await self.leases.swap(own.partition, ownership.released(own.record, upto), own.revision)
        except (NatsError, TimeoutError) as exc:
            revision = None
            self.log.warning("release_failed", partition=own.partition, error=repr(exc))
        if self.partitions.streams.get(own.partition) is st:
            del self.partitions.streams[own.partition]
        self.partitions.acked.pop(own.partition, None)
        self.owned.pop(own.partition, None)
        self.log.info("partition_released", partition=own.partition, acked_upto=upto, clean=revision is not None)

    # -- intake ------------------------------------------------------------------------------
    async def _read(self, own: Owned) -> None:
        """The partition's fetch loop; should it fail, the partition is dropped unacked
        (the balancer takes it again, from the ack floor) rather than left unread."""
        try:
            await self._fetch_loop(own)
        except Exception as exc:
            self.log.error("reader_failed", partition=own.partition, error=repr(exc), exc_info=True)
            if not own.lost.is_set() and not own.releasing:
                self._lose(own, "reader failed")

    async def _fetch_loop(self, own: Owned) -> None:
        st = own.stream
        failures = 0
        while not own.lost.is_set() and not own.releasing:
            if len(st.queue) >= reader.QUEUE_HIGH:
                await asyncio.sleep(ACK_EVERY)
                continue
            try:
                msgs = await reader.fetch(own.psub)
                failures = 0
            except NatsError as exc:
                failures += 1
                self.log.warning("fetch_failed", partition=own.partition, error=repr(exc))
                name = own.record.consumer
                if failures >= 3 and not await reader.consumer_state(self.js, self.names.stream, name):
                    self._lose(own, "consumer gone")
                    return
                await asyncio.sleep(0.5)
                continue
            if msgs:
                await self._on_messages(own, msgs)

    async def _on_messages(self, own: Owned, msgs: list[Msg]) -> None:
        st = own.stream
        for msg in msgs:
            if own.lost.is_set() or own.releasing:
                return
            md = msg.metadata
            seq = md.sequence.stream
            # The consumer numbers its deliveries 1, 2, 3...: a jump means deliveries that
            # never reached us (sent by a consumer leader that died, dropped on a route).
            # JetStream redelivers them only after ack_wait, and our next AckAll would ack
            # them unhandled: drop the partition unacked instead; it is taken again from
            # the ack floor, what was delivered flagged ctx.redelivered.
            cseq = md.sequence.consumer
            if own.consumer_seq and cseq > own.consumer_seq + 1:
                self._lose(own, f"delivery gap: consumer seq {own.consumer_seq} then {cseq}")
                return
            own.consumer_seq = cseq
            if seq <= st.watermark:
                continue  # a redelivery of what we have
            got = self.intake.check(msg.data)
            if isinstance(got, Rejected):
                headers = deadletters.rejected_headers(self.group, seq, got.reason)
                stored = await deadletters.publish_stored(
                    self.js, self.names.rejected_subject, msg.data, headers, self.log, own.lost
                )
                if not stored or own.releasing:
                    return
                self.rejected += 1
                self.log.warning("event_rejected", partition=own.partition, seq=seq, reason=got.reason)
                got = None
            own.delivered.append((seq, msg))
            if got is None:
                self.passed += 1
                self.partitions.take(st, [], [], seq)  # seen: acked past, never handled
                continue
            if md.num_delivered > 1 and seq > st.redelivered_upto:
                st.redelivered_upto = seq
            self.partitions.take(st, [seq], [got], seq)
        self.scheduler.ready(st)

    # -- dispatch ----------------------------------------------------------------------------
    async def _dispatcher(self) -> None:
        work = self.scheduler.work
        while True:
            await work.wait()
            work.clear()
            while self._dispatch():
                await asyncio.sleep(0)

    def _dispatch(self) -> bool:
        """One pass: start what is ready, up to SLICE seconds of sync handlers. True when
        the slice ran out with more ready."""
        if self.fenced():
            self._fence()
            return False
        sched, outcomes, limits, live = self.scheduler, self.outcomes, self.limits, self.live
        deadline = time.perf_counter() + SLICE
        while (st := sched.next()) is not None:
            closed = outcomes.closed
            if not closed and (wait := outcomes.admit(time.monotonic())):
                sched.put_back(st)
                self.loop.call_later(wait, sched.work.set)
                break
            if not self.sync:
                if sched.start(st, live.loop_stamp):
                    st.task = asyncio.ensure_future(self._call(st))
                continue
            outcome = sched.run(st, deadline, every_outcome=not closed)
            if outcome is not None:
                self._outcome(st, *outcome)
            if sched.handled >= limits.check_at:
                self._check_recycle()
            if time.perf_counter() > deadline:
                return True
            if self.fenced():  # (a call may have run past our lease: SIGSTOP, a long call)
                self._fence()
                return False
        if self.sync:
            sched.work.clear()
        return False

    async def _call(self, st: PartitionStream) -> None:
        self._outcome(st, *await self.scheduler.call(st))
        self.scheduler.work.set()

    def _outcome(self, st: PartitionStream, error: BaseException | None, ctx: Context | None) -> None:
        if error is None and ctx is not None and ctx.emitted:
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
        elif verdict.action == "retry":
            self.loop.call_later(verdict.delay, self._retry_due, st)
        elif error is not None:
            st.busy = True  # (until stored: not run again, nothing past it acked)
            st.dead_letter = (b"", time.monotonic())
            asyncio.ensure_future(self._dead_letter(st, error))

    def _retry_due(self, st: PartitionStream) -> None:
        st.waiting = False
        self.scheduler.ready(st)

    async def _dead_letter(self, st: PartitionStream, error: BaseException) -> None:
        """Store the head in the DLQ stream; only after its PubAck does the stream move past
        it (the head stays busy meanwhile, so nothing past it is acked)."""
        seq, w = st.queue[0]
        own = self.owned.get(st.partition)
        if own is None or own.stream is not st:
            return
        self.log.error(
            "event_dead_lettered", event_id=w.id, seq=seq, attempts=st.attempt, error=f"{type(error).__name__}: {error}"
        )
        data = self._wire_bytes(own, seq)
        headers = deadletters.dead_letter_headers(self.group, st.partition, seq, error, st.attempt)
        if await deadletters.publish_stored(
            self.js, self.names.dlq_subject(self.group), data, headers, self.log, own.lost
        ) and self.outcomes.stored(st, seq):
            self.scheduler.pop(st)
            self.scheduler.work.set()

    @staticmethod
    def _wire_bytes(own: Owned, seq: int) -> bytes:
        for s, msg in own.delivered:
            if s == seq:
                return msg.data
        raise LookupError(f"seq {seq} not delivered")  # (cannot happen: unacked heads stay)

    async def _settler(self) -> None:
        """As the embedded member's: wait for the answer to the follow-ups emitted so far."""
        while True:
            await self._settle_due.wait()
            self._settle_due.clear()
            batch = self.followups.take()
            producer = self.producer
            assert producer is not None
            while True:
                try:
                    done, errors = await asyncio.to_thread(producer.settle, 5.0)
                except NexusError as exc:
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
                self.config.confirm, source=f"worker:{self.group}", max_event_bytes=self.config.router.max_event_bytes
            )
        return self.producer.send(type_, payload, **kw)

    # -- timers ------------------------------------------------------------------------------
    async def _acker(self) -> None:
        """AckAll, per partition, on the message of the seq handled up to."""
        while True:
            await asyncio.sleep(ACK_EVERY)
            if self.fenced():
                self._fence()
                continue
            acks = self.partitions.due_acks()
            for p, upto in acks.items():
                own = self.owned.get(p)
                msg = own.take_acks(upto) if own is not None and not own.lost.is_set() else None
                if msg is not None:
                    try:
                        await msg.ack()
                    except NatsError as exc:  # (the connection is down: the next owner redelivers)
                        self.log.warning("ack_failed", partition=p, error=repr(exc))
            self.partitions.acks_sent(acks)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = self.live.loop_stamp = time.monotonic()
            if self.handler.is_async:
                for st, running in self.scheduler.cancel_overdue(now):
                    self.watchdog.timed_out(st, running, stopping=bool(self.live.stop_requested_at))
            self._check_recycle()

    def _check_recycle(self) -> None:
        if self.limits.check(self.scheduler.handled, stopping=self.stop_event.is_set()):
            self.log.warning("member_recycling", reason=self.limits.recycling, handled=self.scheduler.handled)
            self.stop_event.set()


def main(config: Config, group: str, name: str) -> None:
    run_member(lambda: JsMember(config, group, name))  # (signals and exit code as the embedded member's)

"""The member runtime: join a group, run the handler on assigned partitions, ack.

One asyncio loop owns the coord DEALER and the SUB socket. Heartbeats come from a
small thread with its own socket, so a long synchronous handler does not make the
router think the member died. Events of one partition are handled one at a time,
in journal order; across partitions the lowest priority number goes first.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket as _socket
import time
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from nexus.common import blackbox
from nexus.config import Config, WorkerGroupConfig
from nexus.errors import ConfigError, ExitCode
from nexus.member.breaker import CircuitBreaker
from nexus.member.dispatch import Dispatch
from nexus.member.handlers import load_handler
from nexus.member.heartbeat import HeartbeatThread
from nexus.member.stream import PartitionStream, RecentIds
from nexus.member.watchdog import Watchdog, peak_rss_bytes, rss_bytes
from nexus.producer.client import Producer
from nexus.protocol import transport
from nexus.protocol.events import DECODE_ERRORS, Contracts, WireEvent, decode_wire_event
from nexus.protocol.wire import (
    Ack,
    Assign,
    DeadLetterStored,
    Delivery,
    Error,
    Fetch,
    Join,
    Leave,
    Pulse,
    Records,
    Released,
    coord_decoder,
    encoder,
    topic,
)

ACK_EVERY = 0.05
TICK = 0.1  # the loop's own timer: loop stamp, async timeouts, dead-letter resends
RECYCLE_CHECK_EVERY = TICK  # seconds between max_rss / max_events checks from the tick
RSS_CHECK_EVENTS = 64  # with max_rss, also look at the peak RSS every this many handled events
DRAIN_MAX = 64  # deliveries read per wakeup of the SUB reader before the loop gets a turn

log = structlog.get_logger("nexus.worker")


# -- what the member reads -------------------------------------------------------------
# Deliveries and fetch replies are decoded with their events in one msgspec call (the
# envelope typed, the payload kept raw until the handler needs it) instead of a call per
# event. A live delivery that does not decode so is taken from the journal instead
# (`_bad_delivery`); a fetch reply is decoded again event by event (`_decode_each`).


class ReceivedDelivery(Delivery, frozen=True, array_like=True):
    events: list[WireEvent]


class DeliveryHead(msgspec.Struct, frozen=True, array_like=True):
    """The first two fields of a Delivery (msgspec skips the rest of the array)."""

    prev: int
    seqs: list[int]


class ReceivedRecords(Records, tag="records"):
    events: list[WireEvent]


received_delivery_decoder = msgspec.msgpack.Decoder(ReceivedDelivery)
delivery_head_decoder = msgspec.msgpack.Decoder(DeliveryHead)
received_coord_decoder = msgspec.msgpack.Decoder(Assign | ReceivedRecords | Error | DeadLetterStored)


class Member(Dispatch):
    def __init__(self, config: Config, group: str, name: str):
        if group not in config.workers:
            raise ConfigError(f"unknown worker group {group!r} (configured: {', '.join(config.workers) or 'none'})")
        self.config = config
        self.group = group
        self.name = name
        self.spec: WorkerGroupConfig = config.workers[group]
        self.contracts = Contracts.from_modules(config.contracts, config.contracts_untyped)
        self.handle, self.close_handler = load_handler(self.spec.handler, dict(self.spec.options))
        self.is_async = inspect.iscoroutinefunction(self.handle)
        self.streams: dict[int, PartitionStream] = {}
        self.ready: list[tuple[int, int, int]] = []  # (priority, seq, partition)
        self.queued = 0
        self.active = 0
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0
        self.stop_event = asyncio.Event()
        self.joined = asyncio.Event()
        self.log = log.bind(group=group, member=name)
        self._work = asyncio.Event()
        self._rejoin_needed = asyncio.Event()
        self._producer: Producer | None = None
        self._last_acks: dict[int, int] = {}
        self.recent = RecentIds(self.spec.dedup_window)  # ids handled lately: drop repeats
        self._payload_decoders: dict = {}  # (type, v) -> decoder, see Dispatch
        self.duplicates_dropped = 0
        self.bad_deliveries = 0  # live deliveries that did not decode (fetched instead)
        self.bad_events = 0  # undecodable journal events skipped (never from a sound router)
        self.event_bytes = 0.0  # average bytes per event lately: the byte budget's unit
        b = self.spec.breaker
        self.breaker = CircuitBreaker(b.failures, b.window, b.reset)
        # misbehaving handlers (see docs/failure-modes-member.md)
        self.box = blackbox.current()  # None without a launcher: no box writes
        self.loop_stamp = time.monotonic()  # stamped by the loop's tick; the watchdog reads it
        self.calls = 0  # sync handler calls started (the watchdog's clock)
        self.call_stream: PartitionStream | None = None  # the sync call running now
        self.stop_requested_at = 0.0  # monotonic, set from the signal handler
        self.stop_grace = max(config.shutdown_timeout - 2.0, config.shutdown_timeout * 0.5)
        self.timeouts = 0
        self.recycling = ""  # why this member drains and ends with RECYCLE
        self.recycle_check_at = self._next_recycle_check()  # handled count of the next check
        self.recycle_exit = ExitCode.RECYCLE  # FAILURE when max_rss is below our size at start
        self.rss_at_start = peak_rss_bytes()  # imports and handler loaded
        self.settling: list = []  # (stream, seq, follow-up ids) waiting for the router
        self._settle_due = asyncio.Event()
        self._emit_errors: dict = {}  # follow-up id -> RejectedError, until matched to its cause
        self.emits_rejected = 0
        self.dead_letter_resends = 0

    def stats(self) -> dict:
        """Counters for `nexus status` (read from the heartbeat thread)."""
        return {
            "handled": self.handled,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "duplicates_dropped": self.duplicates_dropped,
            "bad_events": self.bad_events,
            "bad_deliveries": self.bad_deliveries,
            "queued": self.queued,
            "breaker": self.breaker.state,
            "timeouts": self.timeouts,
            "rss": rss_bytes(),
            "rss_peak": peak_rss_bytes(),  # what max_rss is checked against
            "emits_rejected": self.emits_rejected,
        }

    # -- lifecycle -------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.asyncio.Context()
        self.coord = transport.connect(
            self.ctx, zmq.DEALER, self.config.coord, identity=f"{self.group}/{self.name}/{os.getpid()}".encode()
        )
        self.sub = transport.subscriber(self.ctx, self.config.publish)
        self.heartbeat = HeartbeatThread(
            self.config.coord,
            self.group,
            self.name,
            self.config.router.heartbeat_interval,
            self._on_pulse_threadsafe,
            stats=self.stats,
        )
        self.watchdog = Watchdog(self)
        self.watchdog.start()
        tasks = [
            asyncio.ensure_future(c)
            for c in (
                self._coord_reader(),
                self._sub_reader(),
                self._dispatcher(),
                self._acker(),
                self._joiner(),
                self._ticker(),
                self._settler(),
            )
        ]
        try:
            await self.stop_event.wait()
            await self._drain()
        finally:
            self.watchdog.stop()
            self.heartbeat.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._producer is not None:
                try:
                    await asyncio.to_thread(self._producer.close, 5.0)
                except Exception as exc:
                    self.log.error("emit_flush_failed", error=str(exc))
            if self.close_handler is not None:
                result = self.close_handler()
                if inspect.isawaitable(result):
                    await result
            self.coord.close(linger=500)
            self.sub.close(0)
            self.ctx.term()
            self.log.info("member_stopped", handled=self.handled, failed=self.failed)

    async def _joiner(self) -> None:
        """Join, and join again whenever the router forgot us (router restart)."""
        while True:
            if not self.joined.is_set():
                # after a router restart: the partitions we still run, to keep them
                holding = {p: st.handled_upto() for p, st in self.streams.items() if not st.revoked}
                await self._send(
                    Join(
                        group=self.group, member=self.name, host=_socket.gethostname(), pid=os.getpid(), holding=holding
                    )
                )
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
        self.sub.close(0)
        for st in self.streams.values():
            st.revoked = True
        # leave before the launcher's shutdown_timeout runs out: a stuck call is left unacked
        deadline = (self.stop_requested_at or time.monotonic()) + self.stop_grace
        while any(st.busy for st in self.streams.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        acks = {p: st.handled_upto() for p, st in self.streams.items()}
        busy = [p for p, st in self.streams.items() if st.busy]  # unacked, maybe half done
        if busy:
            self.log.warning("drain_deadline_passed", busy=busy)
        await self._send(Leave(group=self.group, member=self.name, acks=acks, busy=busy))

    async def _send(self, msg) -> None:
        await self.coord.send(encoder.encode(msg))

    # -- coord -------------------------------------------------------------------
    async def _coord_reader(self) -> None:
        while True:
            raw = await self.coord.recv()
            try:
                msg = received_coord_decoder.decode(raw)
            except DECODE_ERRORS:
                try:
                    msg = coord_decoder.decode(raw)  # events left raw: see _decode_each
                except DECODE_ERRORS:
                    self.log.error("bad_coord_message")
                    continue
            if isinstance(msg, Assign):
                self._on_assign(msg)
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

    def _on_pulse_threadsafe(self, msg) -> None:
        self.loop.call_soon_threadsafe(self._on_pulse, msg)

    def _on_pulse(self, msg) -> None:
        if isinstance(msg, Error):
            return self._on_error(msg)
        if not isinstance(msg, Pulse):
            return
        for p, head in msg.heads.items():
            st = self.streams.get(p)
            if st is not None and head > st.watermark and not st.fetching and not st.revoked:
                self._fetch(st)

    def _on_assign(self, msg: Assign) -> None:
        if not self.joined.is_set():
            self.joined.set()
            if not self.heartbeat.started:
                self.heartbeat.start()  # only now: a beat before the join would be refused
        wanted = set(msg.partitions)
        if msg.skip:
            self.log.warning("poison_skipped", skip={p: sorted(s) for p, s in msg.skip.items()})
        for p, st in list(self.streams.items()):
            if p not in wanted and not st.revoked:
                st.revoked = True
                self.sub.setsockopt(zmq.UNSUBSCRIBE, topic(self.group, p))
                self._drop_queued(st)
                self._maybe_release(st)
        for p, cursor in msg.grants.items():
            redelivered = msg.redelivered.get(p, 0)
            old = self.streams.get(p)
            if old is not None and not old.revoked:
                self._drop_queued(old)
                if msg.replay:
                    # journal replay: rewind; what we handled before comes again, flagged
                    old.redelivered_upto = max(old.redelivered_upto, old.watermark)
                    old.watermark = old.queue[0][0] if old.busy else cursor
                    self._last_acks[p] = cursor
                    self.recent.clear()
                else:
                    # granted again after a rejoin: keep what we handled ourselves
                    old.watermark = max(cursor, old.queue[0][0] if old.busy else old.handled_upto())
                    old.redelivered_upto = max(old.redelivered_upto, redelivered)
                self._fetch(old)
                continue
            self._last_acks.pop(p, None)
            st = self.streams[p] = PartitionStream(p, cursor, redelivered)
            self.sub.setsockopt(zmq.SUBSCRIBE, topic(self.group, p))
            self._fetch(st)
        for p, seqs in msg.solo.items():
            st = self.streams.get(p)
            if st is not None and not st.revoked:
                st.solo = set(seqs)
        for p, seqs in msg.skip.items():
            st = self.streams.get(p)
            if st is not None and not st.revoked:
                # dead-lettered poison: pass over it (queued copies leave the queue)
                self.queued -= st.add_skip(seqs)
                self._ready(st)
        self.log.info("partitions_assigned", partitions=sorted(wanted), granted=sorted(msg.grants))

    def _drop_queued(self, st: PartitionStream) -> None:
        """Forget queued events (not the one being handled); they stay in the journal."""
        self.queued -= st.drop_queued()

    def _maybe_release(self, st: PartitionStream) -> None:
        if st.revoked and not st.busy and self.streams.get(st.partition) is st:
            del self.streams[st.partition]
            if not self.stop_event.is_set():
                asyncio.ensure_future(
                    self._send(Released(group=self.group, member=self.name, acks={st.partition: st.handled_upto()}))
                )

    # -- intake ------------------------------------------------------------------
    def _capacity(self) -> int:
        """Events we may queue: max_in_flight, and max_in_flight_bytes at the average event
        size seen lately (queued events are not measured one by one)."""
        if not self.event_bytes:
            return self.spec.max_in_flight
        return min(self.spec.max_in_flight, max(1, int(self.spec.max_in_flight_bytes / self.event_bytes)))

    def _room(self) -> int:
        return self._capacity() - self.queued

    def _observe(self, nbytes: int, events: int) -> None:
        if events:
            size = nbytes / events
            self.event_bytes = size if not self.event_bytes else 0.8 * self.event_bytes + 0.2 * size

    def _fetch(self, st: PartitionStream) -> None:
        room = self._room()
        if room <= 0:
            st.behind = True
            return
        st.fetching, st.behind = True, False
        st.fetch_after = st.watermark
        asyncio.ensure_future(
            self._send(
                Fetch(
                    group=self.group,
                    member=self.name,
                    partition=st.partition,
                    after=st.watermark,
                    limit=min(room, self.config.router.fetch_limit),
                )
            )
        )

    def _on_records(self, msg: Records, nbytes: int | None = None) -> None:
        """`nbytes`: the reply's size as received (the byte budget's measure, like a live
        frame's; without it the events are measured one by one)."""
        st = self.streams.get(msg.partition)
        if st is None or st.revoked or not st.fetching or msg.after != st.fetch_after:
            return
        st.fetching = False
        if msg.events:
            if nbytes is None:
                nbytes = sum(len(e.payload) if type(e) is WireEvent else len(e) for e in msg.events)
            self._observe(nbytes, len(msg.events))
        self._enqueue(st, msg.seqs, msg.events, msg.upto)
        if not msg.complete or st.overflow:
            st.overflow = False
            st.buffered.clear()
            self._fetch(st)
            return
        buffered, st.buffered = st.buffered, []
        for frame in buffered:
            self._apply(st, frame)

    async def _sub_reader(self) -> None:
        # Once awake, read what is already queued through a plain (blocking-API) shadow of
        # the socket: no future and no loop turn per message. pyzmq's asyncio recv looks
        # at the socket's state before it waits, so nothing is missed by mixing the two.
        sub = zmq.Socket.shadow(self.sub.underlying)
        while True:
            self._on_delivery(await self.sub.recv_multipart())
            for _ in range(DRAIN_MAX):
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_delivery(frames)
            else:
                await asyncio.sleep(0)  # let the handlers run; the rest is still queued

    def _on_delivery(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        try:
            p = int(frames[0][len(self.group) + 1 :])
        except ValueError:
            return
        st = self.streams.get(p)
        if st is None or st.revoked:
            return
        if st.fetching:
            st.buffer(frames[1])  # kept undecoded: applied after the fetch reply
            return
        self._apply(st, frames[1])

    def _apply(self, st: PartitionStream, frame: bytes) -> None:
        """Queue a live delivery's events, unless they are old, follow a gap (fetch it
        first) or there is no room (fall behind: they wait in the journal)."""
        full = self._room() <= 0
        # full, it will not be queued: read only prev and seqs (a quarter of a full decode)
        d = self._decode_delivery(st, frame, delivery_head_decoder if full else received_delivery_decoder)
        if d is not None:
            self._observe(len(frame), len(d.seqs))
        if d is not None and self._takes(st, d, frame):
            self._enqueue(st, d.seqs, d.events, d.seqs[-1])

    def _takes(self, st: PartitionStream, d: DeliveryHead | ReceivedDelivery, frame: bytes) -> bool:
        if d.seqs[-1] <= st.watermark:
            return False
        if st.needs_fetch(d.prev):
            st.buffer(frame)
            self._fetch(st)
            return False
        if self._room() <= 0:
            st.behind = True  # full: fall behind; catch up from the journal later
            return False
        # Room left: take the whole delivery, even if it overshoots max_in_flight (by less
        # than one delivery, i.e. one router batch): dropping it would only make us fetch
        # the same events from the journal later, a much dearer way in.
        return True

    def _decode_delivery(
        self, st: PartitionStream, frame: bytes, decoder: msgspec.msgpack.Decoder
    ) -> DeliveryHead | ReceivedDelivery | None:
        try:
            d = decoder.decode(frame)
        except DECODE_ERRORS:
            d = None
        if d is None or not d.seqs or (isinstance(d, ReceivedDelivery) and len(d.seqs) != len(d.events)):
            self._bad_delivery(st)
            return None
        return d

    def _bad_delivery(self, st: PartitionStream) -> None:
        """A live delivery we cannot read: take that part of the stream from the journal,
        the truth, instead (the router validated and journaled every event it publishes)."""
        self.bad_deliveries += 1
        self.log.error("bad_delivery", partition=st.partition, after=st.watermark)
        if st.fetching:
            st.overflow = True  # fetch again once the outstanding reply is in
        else:
            self._fetch(st)

    def _enqueue(self, st: PartitionStream, seqs: list[int], events: list, upto: int) -> None:
        if events and type(events[0]) is not WireEvent:
            seqs, events = self._decode_each(seqs, events)
        was_empty = not st.queue
        n = st.take(seqs, events, upto)
        self.queued += n
        if n and was_empty:
            self._ready(st)

    def _decode_each(self, seqs: list[int], raws: list) -> tuple[list[int], list[WireEvent]]:
        """The slow path for a fetch reply whose events did not all decode: keep the good
        ones. This is the journal's copy, there is no better one: a bad event is logged
        and skipped (it can never be handled), the stream moves on."""
        good_seqs, events = [], []
        for seq, raw in zip(seqs, raws, strict=False):
            try:
                events.append(decode_wire_event(raw))
            except DECODE_ERRORS as exc:
                self.bad_events += 1
                self.log.error("bad_event_skipped", seq=seq, error=str(exc))
                continue
            good_seqs.append(seq)
        return good_seqs, events

    def _refill(self) -> None:
        """Partitions that fell behind fetch again once there is room."""
        if self.queued > self._capacity() // 2:
            return
        for st in self.streams.values():
            if st.behind and not st.fetching and not st.revoked:
                self._fetch(st)

    # -- acks and emits --------------------------------------------------------------
    async def _acker(self) -> None:
        while True:
            await asyncio.sleep(ACK_EVERY)
            acks = {}
            for p, st in self.streams.items():
                upto = st.handled_upto()
                if upto > self._last_acks.get(p, -1):
                    acks[p] = upto
                    if st.skip:
                        st.forget_skips_upto(upto)  # passed: no delivery checks them again
            if not acks:
                continue
            # (follow-ups need no flush here: a cause that emitted stays the busy head of its
            # stream, so it is not acked, until the router answered for them; see _settler)
            await self._send(Ack(group=self.group, member=self.name, acks=acks))
            self._last_acks.update(acks)

    async def _ticker(self) -> None:
        """The loop's own heartbeat: stamp it for the watchdog thread (which beats the black
        box), cancel overdue async handlers, resend unconfirmed dead letters, and check the
        recycle limits now and then."""
        next_check = time.monotonic() + RECYCLE_CHECK_EVERY
        while True:
            await asyncio.sleep(TICK)
            now = self.loop_stamp = time.monotonic()
            if self.is_async:
                self._cancel_overdue(now)
            self._resend_dead_letters(now)
            if now >= next_check:
                next_check = now + RECYCLE_CHECK_EVERY
                self._check_recycle()

    def _next_recycle_check(self) -> float:
        """The handled count at which the dispatcher checks the recycle limits between the
        ticks (a fast leak grows a lot in a tick): every RSS_CHECK_EVENTS with max_rss (a
        getrusage call, ~1 us), at max_events; never without limits."""
        spec = self.spec
        at = float("inf")
        if spec.max_rss is not None:
            at = self.handled + RSS_CHECK_EVENTS
        if spec.max_events is not None:
            at = min(at, spec.max_events)
        return at

    def _check_recycle(self) -> None:
        self.recycle_check_at = self._next_recycle_check()
        if self.recycling or self.stop_event.is_set() or not self.handled:
            return  # nothing handled since start: a restart would not make us smaller
        spec = self.spec
        if spec.max_events is not None and self.handled >= spec.max_events:
            self.recycling = f"handled {self.handled} events (max_events {spec.max_events})"
        elif spec.max_rss is not None and (rss := peak_rss_bytes()) > spec.max_rss:
            self.recycling = f"rss {rss >> 20} MiB over max_rss {spec.max_rss >> 20} MiB"
            if self.rss_at_start > spec.max_rss:
                # a restart starts over the limit again: end as a failure, so the launcher
                # backs off and gives up after crash_loop instead of recycling per event
                self.recycle_exit = ExitCode.FAILURE
                self.log.error(
                    "max_rss_below_start_size", rss_at_start_mib=self.rss_at_start >> 20, max_rss_mib=spec.max_rss >> 20
                )
        if self.recycling:
            self.recycle_check_at = float("inf")
            # graceful: take nothing new, finish and ack what is in flight, leave, exit RECYCLE
            self.log.warning("member_recycling", reason=self.recycling, handled=self.handled)
            self.stop_event.set()

    def _emit(self, type_: str, payload: Any, **kw) -> str:
        if self._producer is None:
            self._producer = Producer(
                self.config.confirm, source=f"worker:{self.group}", max_event_bytes=self.config.router.max_event_bytes
            )
        return self._producer.send(type_, payload, **kw)


def main(config: Config, group: str, name: str) -> None:
    import signal
    import sys

    members: list[Member] = []

    async def runner() -> None:
        member = Member(config, group, name)
        members.append(member)
        loop = asyncio.get_running_loop()

        def on_signal(signum, frame) -> None:  # noqa: ARG001
            # a plain handler, not loop.add_signal_handler: it runs even while a sync
            # handler blocks the loop, so the watchdog sees the stop and bounds that call
            if not member.stop_requested_at:
                member.stop_requested_at = time.monotonic()
            loop.call_soon_threadsafe(member.stop_event.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        await member.run()

    asyncio.run(runner())
    if members and members[0].recycling:
        sys.exit(int(members[0].recycle_exit))

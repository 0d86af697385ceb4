"""Events into the partition streams (no sockets): live deliveries, the journal's fetch
replies, and what to fetch next.

Deliveries and fetch replies are decoded with their events in one msgspec call (the
envelopes typed, the payloads kept raw until a handler needs them) instead of a call per
event, and only when they reach the head of the stream's queue: one that arrives behind
queued events is read for its seqs alone and held as the bytes it came in
(PartitionStream.hold), so a backlog costs its wire size in memory. A live delivery that
does not decode is taken from the journal instead (`_bad_delivery`, or the stream rewinds
when a held one does not: PartitionStream.unhold); a fetch reply's events are then decoded
one by one (`_decode_each`).

The in-flight budget: `max_in_flight` events queued, and `max_in_flight_bytes` at the
average event size seen lately. A stream with no room left falls behind (`behind`): its
events wait in the journal, fetched again once there is room (`refill`). It is also
`muted` (unsubscribed) meanwhile: its live deliveries would only be dropped, and queued
for it in ZeroMQ's pipes on the way they cost memory in the router and here; it is
subscribed again once a fetch reply reaches the journal's end with room left. A stream with a
gap before a live delivery fetches the gap and buffers live deliveries meanwhile.

Every entry point returns the fetches it decided on, for the runtime to send.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from nexus.member.group import RecordsHead, records_decoder
from nexus.member.partitions import Partitions
from nexus.member.scheduler import Scheduler
from nexus.member.stream import PartitionStream
from nexus.protocol.events import DECODE_ERRORS, WireEvent, decode_wire_event
from nexus.protocol.wire import Delivery, Records, coord_decoder


class ReceivedDelivery(Delivery, frozen=True, array_like=True):
    events: list[WireEvent]  # type: ignore[assignment]  # the same field, decoded


class DeliveryHead(msgspec.Struct, frozen=True, array_like=True):
    """The first two fields of a Delivery (msgspec skips the rest of the array)."""

    prev: int
    seqs: list[int]


received_delivery_decoder = msgspec.msgpack.Decoder(ReceivedDelivery)
delivery_head_decoder = msgspec.msgpack.Decoder(DeliveryHead)


class FetchRequest(NamedTuple):
    partition: int
    after: int  # the events after this seq
    limit: int  # at most this many


NOTHING: Sequence[FetchRequest] = ()


def _as_is(decoded: tuple[list[int], list[WireEvent]]) -> tuple[list[int], list[WireEvent]]:
    return decoded


class Fetcher:
    def __init__(
        self,
        partitions: Partitions,
        scheduler: Scheduler,
        *,
        group: str,
        max_in_flight: int,
        max_in_flight_bytes: int,
        fetch_limit: int,
        log: Any,
    ):
        self.partitions = partitions
        self.scheduler = scheduler  # told when a stream has events to run
        self.prefix = len(group) + 1  # live topics are b"<group>/<partition>"
        self.max_in_flight, self.max_in_flight_bytes = max_in_flight, max_in_flight_bytes
        self.fetch_limit = fetch_limit
        self.log = log
        self.event_bytes = 0.0  # average bytes per event lately: the byte budget's unit
        self.bad_deliveries = 0  # live deliveries that did not decode (fetched instead)
        self.bad_events = 0  # undecodable journal events skipped (never from a sound router)
        self.gap_repairs = 0  # fetches for a stream behind what the router published
        self.sub_changes: list[tuple[int, bool]] = []  # (partition, subscribe) for the SUB socket
        self._wanted: list[FetchRequest] = []

    # -- entry points --------------------------------------------------------------------------
    def fetch(self, st: PartitionStream) -> Sequence[FetchRequest]:
        """A stream (re)granted: read it from its watermark."""
        self._fetch(st)
        return self._take()

    def on_heads(self, heads: dict[int, int]) -> Sequence[FetchRequest]:
        """The router's stream heads (a heartbeat's Pulse): fetch what we have not seen."""
        streams = self.partitions.streams
        for p, head in heads.items():
            st = streams.get(p)
            if st is not None and head > st.watermark and not st.fetching and not st.revoked:
                self.gap_repairs += 1  # the live stream missed its tail
                self._fetch(st)
        return self._take()

    def on_records(
        self, msg: Records | RecordsHead, nbytes: int | None = None, raw: bytes | None = None
    ) -> Sequence[FetchRequest]:
        """A fetch reply: a Records, or a RecordsHead and the `raw` bytes it was read from
        (its events still in them). `nbytes`: its size as received (the byte budget's
        measure, like a live frame's; without it the events are measured one by one)."""
        st = self.partitions.streams.get(msg.partition)
        if st is None or st.revoked or not st.fetching or msg.after != st.fetch_after:
            return NOTHING
        st.fetching = False
        if isinstance(msg, RecordsHead):
            if raw is None:
                return NOTHING
            if msg.seqs:
                self._observe(nbytes or len(raw), len(msg.seqs))
            if st.queue:
                self.partitions.hold(st, msg.seqs, raw, self._decode_records, msg.upto)
            elif (got := self._decode_records(raw)) is not None:
                self._enqueue(st, got[0], got[1], msg.upto)
            else:
                self._fetch(st)  # (unreadable: ask again)
                return self._take()
        else:
            events: list[Any] = msg.events  # left raw
            if events:
                if nbytes is None:
                    nbytes = sum(len(e.payload) if type(e) is WireEvent else len(e) for e in events)
                self._observe(nbytes, len(events))
            self._enqueue(st, msg.seqs, events, msg.upto)
        if st.muted and msg.complete:
            if self.room() > 0:
                st.muted = False  # caught up: live again (a gap since this reply is fetched)
                self.sub_changes.append((st.partition, True))
            else:
                st.behind = True  # no room for live deliveries yet: fetch again (refill)
        if not msg.complete or st.overflow:
            st.overflow = False
            st.buffered.clear()
            self._fetch(st)
            return self._take()
        buffered, st.buffered = st.buffered, []
        for frame in buffered:
            self._apply(st, frame)
        return self._take()

    def on_delivery(self, frames: list[bytes]) -> Sequence[FetchRequest]:
        """A live delivery from the SUB socket: [topic, Delivery]."""
        if len(frames) != 2:
            return NOTHING
        try:
            p = int(frames[0][self.prefix :])
        except ValueError:
            return NOTHING
        st = self.partitions.streams.get(p)
        if st is None or st.revoked:
            return NOTHING
        if st.fetching:
            st.buffer(frames[1])  # kept undecoded: applied after the fetch reply
            return NOTHING
        self._apply(st, frames[1])
        return self._take()

    def refill(self) -> Sequence[FetchRequest]:
        """Partitions that fell behind fetch again once there is room."""
        if self.partitions.queued > self.capacity() // 2:
            return NOTHING
        for st in self.partitions.streams.values():
            if st.behind and not st.fetching and not st.revoked:
                self._fetch(st)
        return self._take()

    # -- the budget ----------------------------------------------------------------------------
    def capacity(self) -> int:
        """Events we may queue: max_in_flight, and max_in_flight_bytes at the average event
        size seen lately (queued events are not measured one by one)."""
        if not self.event_bytes:
            return self.max_in_flight
        return min(self.max_in_flight, max(1, int(self.max_in_flight_bytes / self.event_bytes)))

    def room(self) -> int:
        return self.capacity() - self.partitions.queued

    def _observe(self, nbytes: int, events: int) -> None:
        if events:
            size = nbytes / events
            self.event_bytes = size if not self.event_bytes else 0.8 * self.event_bytes + 0.2 * size

    # -- inside --------------------------------------------------------------------------------
    def _fetch(self, st: PartitionStream) -> None:
        room = self.room()
        if room <= 0:
            self._fall_behind(st)
            return
        st.fetching, st.behind = True, False
        st.fetch_after = st.watermark
        self._wanted.append(FetchRequest(st.partition, st.watermark, min(room, self.fetch_limit)))

    def _fall_behind(self, st: PartitionStream) -> None:
        """No room: `st` waits in the journal (refill), unsubscribed from its live deliveries."""
        st.behind = True
        if not st.muted:
            st.muted = True
            self.sub_changes.append((st.partition, False))

    def _take(self) -> Sequence[FetchRequest]:
        wanted = self._wanted
        if not wanted:
            return NOTHING
        self._wanted = []
        return wanted

    def _apply(self, st: PartitionStream, frame: bytes) -> None:
        """Queue a live delivery's events, unless they are old, follow a gap (fetch it
        first) or there is no room (fall behind: they wait in the journal). Behind queued
        events, or with no room, only its prev and seqs are read (a quarter of a full
        decode): it is held undecoded, or dropped."""
        full = self.room() <= 0
        d = self._decode_delivery(st, frame, delivery_head_decoder if full or st.queue else received_delivery_decoder)
        if d is None:
            return
        self._observe(len(frame), len(d.seqs))
        if not self._takes(d, st, frame, full):
            return
        if type(d) is ReceivedDelivery:
            self._enqueue(st, d.seqs, d.events, d.seqs[-1])
        else:
            self.partitions.hold(st, d.seqs, frame, self._decode_held, d.seqs[-1])

    def _takes(self, d: DeliveryHead | ReceivedDelivery, st: PartitionStream, frame: bytes, full: bool) -> bool:
        """True: queue `d`."""
        if d.seqs[-1] <= st.watermark:
            return False
        if st.needs_fetch(d.prev):
            self.gap_repairs += 1
            st.buffer(frame)
            self._fetch(st)
            return False
        if full or self.room() <= 0:
            # full (when it came, though smaller events seen since may have made room):
            # fall behind; catch up from the journal later
            self._fall_behind(st)
            return False
        # Room left: take the whole delivery, even if it overshoots max_in_flight (by less
        # than one delivery, i.e. one router batch): dropping it would only make us fetch
        # the same events from the journal later, a much dearer way in.
        return True

    def _decode_held(self, frame: bytes) -> tuple[list[int], list[WireEvent]] | None:
        """A held live delivery reaches the head: its events (None: it does not decode, the
        stream takes that part from the journal, see PartitionStream.unhold)."""
        try:
            d = received_delivery_decoder.decode(frame)
        except DECODE_ERRORS:
            d = None
        if d is None or not d.seqs or len(d.seqs) != len(d.events):
            self.bad_deliveries += 1
            self.log.error("bad_delivery", held=True)
            return None
        return d.seqs, d.events

    def _decode_records(self, raw: bytes) -> tuple[list[int], list[WireEvent]] | None:
        """A fetch reply's events (decoded one by one if they do not all decode at once)."""
        try:
            m = records_decoder.decode(raw)
            return m.seqs, m.events
        except DECODE_ERRORS:
            pass
        try:
            r = coord_decoder.decode(raw)
        except DECODE_ERRORS:
            r = None
        if not isinstance(r, Records):
            self.log.error("bad_fetch_reply")
            return None
        return self._decode_each(r.seqs, r.events)

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
        if st.held:  # (events decoded already, behind held ones: they keep their order)
            self.partitions.hold(st, seqs, (seqs, events), _as_is, upto)
            return
        was_empty = not st.queue
        if self.partitions.take(st, seqs, events, upto) and was_empty:
            self.scheduler.ready(st)

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

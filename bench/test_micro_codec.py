"""Encode / decode / validate: the per-event codec work of producer, router and member."""

from __future__ import annotations

import time

import msgspec

from nexus.producer.client import _EventMaker
from nexus.protocol.events import Contracts, Event, decode_wire_event, encode, new_id
from nexus.router.journal import Entry, entry_decoder, entry_encoder

from .conftest import PAD, make_event


def test_new_id(benchmark):
    benchmark(new_id)


def test_producer_make_event(benchmark):
    """Producer.send's CPU work before the lock: checks, id, Event, encode."""
    maker = _EventMaker("bench-0", 2**20)
    payload = {"n": 1, "pad": PAD}
    benchmark(maker.make, "bench.event", payload, None, 5, None, 1, None)


def test_encode_event(benchmark):
    ev = make_event(1)
    benchmark(encode, ev)


def test_decode_wire_event(benchmark):
    """Router intake and member enqueue: envelope decode, payload kept raw."""
    raw = encode(make_event(1))
    benchmark(decode_wire_event, raw)


def test_check_payload_untyped(benchmark):
    """Router validation of an untyped type (glob cache hit)."""
    contracts = Contracts(("bench.*",))
    w = decode_wire_event(encode(make_event(1)))
    benchmark(contracts.check_payload, w.type, w.v, w.payload)


def test_check_payload_typed(benchmark, raw_typed_events):
    """Router validation against a contract (file.created: strict struct decode)."""
    contracts = Contracts(())
    w = decode_wire_event(raw_typed_events[0])
    benchmark(contracts.check_payload, w.type, w.v, w.payload)


def test_decode_payload_untyped(benchmark):
    """Member: payload for the handler, untyped (generic msgpack decode)."""
    contracts = Contracts(("bench.*",))
    w = decode_wire_event(encode(make_event(1)))
    benchmark(contracts.decode_payload, w.type, w.v, w.payload)


def test_member_build_event(benchmark):
    """Member: WireEvent -> Event for the handler (payload decode + Event construction)."""
    contracts = Contracts(("bench.*",))
    w = decode_wire_event(encode(make_event(1)))

    def build():
        payload = contracts.decode_payload(w.type, w.v, w.payload)
        return Event(
            type=w.type,
            source=w.source,
            payload=payload,
            id=w.id,
            time=w.time,
            key=w.key,
            priority=w.priority,
            correlation_id=w.correlation_id,
            v=w.v,
        )

    benchmark(build)


def test_journal_entry_encode(benchmark):
    raw = encode(make_event(1))
    now = time.time()
    benchmark(lambda: entry_encoder.encode(Entry("bench.event", 12345, "p" * 32, 7, msgspec.Raw(raw), now)))


def test_journal_entry_decode(benchmark):
    """Router fetch/lag/recovery: one journal body -> Entry."""
    body = entry_encoder.encode(Entry("bench.event", 12345, "p" * 32, 7, msgspec.Raw(encode(make_event(1))), 1.0))
    benchmark(entry_decoder.decode, body)

"""Batching on both ends: the producer outbox, the publish Delivery codec, and the member's
per-event path (enqueue, priority heap, Event + Context, handler, pop)."""

from __future__ import annotations

import msgspec
import pytest

from nexus.member.stream import PartitionStream
from nexus.producer.outbox import Outbox
from nexus.protocol.wire import Delivery, ProducerReply, delivery_decoder, encoder

from .conftest import BATCH, per_event


def test_outbox_fire_batch(benchmark, raw_events):
    """Producer I/O thread, fire mode: BATCH adds + next_batch (one ProducerBatch message)."""
    ob = Outbox("p" * 32, False, 20_000, 3.0)

    def run():
        for r in raw_events:
            ob.add("id", r)
        return ob.next_batch(0.0)

    benchmark(run)
    per_event(benchmark, BATCH)


def test_outbox_confirm_batch_and_ack(benchmark, raw_events):
    """Producer, confirm mode: BATCH adds + next_batch (unacked bookkeeping) + the router's ACK."""
    ob = Outbox("p" * 32, True, 20_000, 3.0)

    def run():
        for r in raw_events:
            ob.add("id", r)
        ob.next_batch(0.0)
        ob.on_reply(ProducerReply(ack=ob.next_pseq - 1), 0.0)

    benchmark(run)
    per_event(benchmark, BATCH)


def test_delivery_encode(benchmark, raw_events):
    """Router publish: one Delivery of BATCH events."""
    d = Delivery(0, list(range(1, BATCH + 1)), [msgspec.Raw(r) for r in raw_events])
    benchmark(encoder.encode, d)
    per_event(benchmark, BATCH)


def test_delivery_decode(benchmark, raw_events):
    """One Delivery of BATCH events, events left raw (`nexus tail`; the member decodes the
    events with it: bench/test_micro_member.py)."""
    data = encoder.encode(Delivery(0, list(range(1, BATCH + 1)), [msgspec.Raw(r) for r in raw_events]))
    benchmark(delivery_decoder.decode, data)
    per_event(benchmark, BATCH)


def test_stream_take(benchmark, raw_events):
    seqs = list(range(1, BATCH + 1))

    def run():
        st = PartitionStream(0, 0)
        return st.take(seqs, raw_events, BATCH)

    benchmark(run)
    per_event(benchmark, BATCH)


@pytest.fixture
def member(bench_config):
    from nexus.member.runtime import Member

    m = Member(bench_config, "bench0", "bench0-0")
    yield m
    if m.handler.close is not None:
        m.handler.close()


def test_member_dispatch_batch(benchmark, member):
    """Member: one live Delivery of BATCH events through the fetcher (decoded with its
    events) and the scheduler's sync turns (the body of Member._dispatch without the event
    loop), into the no-op Counter handler. Every round uses fresh event ids, so the member's
    dedup window does not drop them."""
    from nexus.protocol.events import encode

    from .conftest import make_event

    rounds = 60
    frames = []
    for r in range(rounds + 1):
        raws = [msgspec.Raw(encode(make_event(r * BATCH + i))) for i in range(BATCH)]
        frames.append(encoder.encode(Delivery(r * BATCH, list(range(r * BATCH + 1, (r + 1) * BATCH + 1)), raws)))
    state = {"round": 0}
    sched, streams = member.scheduler, member.partitions.streams
    handled_before = sched.handled

    def run():
        st = streams.get(0)
        if st is None:
            st = streams[0] = PartitionStream(0, 0)
        member.fetcher._apply(st, frames[state["round"]])
        state["round"] += 1
        while (s := sched.next()) is not None:
            sched.run(s, float("inf"))

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    assert member.outcomes.failed == 0 and sched.handled - handled_before == state["round"] * BATCH
    per_event(benchmark, BATCH)

"""Member hot path: reading a Delivery, and one Delivery of BATCH events through a real
`Member` (intake, dedup, Event and Context, the sync dispatcher; fake sockets, no-op
handler), per event."""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec

from nexus.member.fetcher import received_delivery_decoder
from nexus.member.runtime import Member
from nexus.protocol.events import Event, decode_wire_event, encode, new_id
from nexus.protocol.wire import Assign, Delivery, Records, delivery_decoder, encoder, topic

from .conftest import BATCH, PAD, per_event

ROUNDS = 20


def _delivery(raw_events: list[bytes], prev: int = 0) -> bytes:
    seqs = list(range(prev + 1, prev + 1 + len(raw_events)))
    return encoder.encode(Delivery(prev, seqs, [msgspec.Raw(r) for r in raw_events]))


def test_member_decode_delivery(benchmark, raw_events):
    """What the member does: the Delivery and its event envelopes in one msgspec call."""
    frame = _delivery(raw_events)
    benchmark(received_delivery_decoder.decode, frame)
    per_event(benchmark, BATCH)


def test_member_decode_delivery_per_event_reference(benchmark, raw_events):
    """Reference (the previous way): events left raw, then one decode call per event."""
    frame = _delivery(raw_events)
    benchmark(lambda: [decode_wire_event(r) for r in delivery_decoder.decode(frame).events])
    per_event(benchmark, BATCH)


class _Coord:
    def send(self, data: bytes):
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Sub:
    def setsockopt(self, *args) -> None:
        pass


class _Heartbeat:
    started = True


def test_member_intake_and_dispatch(benchmark, bench_config):
    """One live Delivery of BATCH events into a member of one partition and handled by a
    no-op sync handler: decode, queue, dedup check and record, payload decode, Event,
    Context, the dispatcher loop."""
    loop = asyncio.new_event_loop()
    member = Member(bench_config, "bench0", "bench-m", handle=lambda event, ctx: None)
    member.loop = loop
    member.coord, member.sub, member.heartbeat = _Coord(), _Sub(), _Heartbeat()
    now = time.time()
    counter = itertools.count()
    frames, prev = [], 0
    for _ in range(ROUNDS + 1):  # + the warmup round; fresh ids: none is a duplicate
        raws = [
            encode(
                Event(
                    type="bench.event",
                    source="bench-0",
                    payload={"n": next(counter), "pad": PAD},
                    id=new_id(),
                    time=now,
                )
            )
            for _ in range(BATCH)
        ]
        frames.append([topic("bench0", 0), _delivery(raws, prev)])
        prev += BATCH
    pending = iter(frames)

    async def start():
        member._on_assign(Assign(group="bench0", partitions=[0], grants={0: 0}))
        member._on_records(Records(group="bench0", partition=0, after=0, upto=0, seqs=[], events=[]))
        return asyncio.ensure_future(member._dispatcher())

    async def one_delivery():
        member._on_delivery(next(pending))
        while member.partitions.queued:
            await asyncio.sleep(0)

    dispatcher = loop.run_until_complete(start())
    try:
        benchmark.pedantic(
            lambda: loop.run_until_complete(one_delivery()), rounds=ROUNDS, iterations=1, warmup_rounds=1
        )
        assert member.scheduler.handled == (ROUNDS + 1) * BATCH and member.scheduler.duplicates_dropped == 0
    finally:
        dispatcher.cancel()
        loop.run_until_complete(asyncio.gather(dispatcher, return_exceptions=True))
        if member.handler.close is not None:
            member.handler.close()
        loop.close()
    per_event(benchmark, BATCH)


BACKLOG = 20  # deliveries queued before the dispatcher runs


def _member_with_frames(bench_config, rounds: int, per_round: int):
    loop = asyncio.new_event_loop()
    member = Member(bench_config, "bench0", "bench-m", handle=lambda event, ctx: None)
    member.loop = loop
    member.coord, member.sub, member.heartbeat = _Coord(), _Sub(), _Heartbeat()
    now, counter, prev = time.time(), itertools.count(), 0
    frames = []
    for _ in range(rounds * per_round):
        raws = [
            encode(
                Event(
                    type="bench.event",
                    source="bench-0",
                    payload={"n": next(counter), "pad": PAD},
                    id=new_id(),
                    time=now,
                )
            )
            for _ in range(BATCH)
        ]
        frames.append([topic("bench0", 0), _delivery(raws, prev)])
        prev += BATCH

    async def start():
        member._on_assign(Assign(group="bench0", partitions=[0], grants={0: 0}))
        member._on_records(Records(group="bench0", partition=0, after=0, upto=0, seqs=[], events=[]))

    loop.run_until_complete(start())
    return loop, member, iter(frames)


def _close(loop, member) -> None:
    if member.handler.close is not None:
        member.handler.close()
    loop.close()


def test_member_intake_behind_a_queue_and_dispatch(benchmark, bench_config):
    """A backlog: BACKLOG live Deliveries of BATCH events arrive before the dispatcher runs
    (all but the first behind queued events), then all are handled: intake, queue, dispatch."""
    rounds = 5
    loop, member, pending = _member_with_frames(bench_config, rounds + 1, BACKLOG)

    async def backlog():
        for _ in range(BACKLOG):
            member._on_delivery(next(pending))
        dispatcher = asyncio.ensure_future(member._dispatcher())
        while member.partitions.queued:
            await asyncio.sleep(0)
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)

    try:
        benchmark.pedantic(lambda: loop.run_until_complete(backlog()), rounds=rounds, iterations=1, warmup_rounds=1)
        assert member.scheduler.handled == (rounds + 1) * BACKLOG * BATCH
    finally:
        _close(loop, member)
    per_event(benchmark, BACKLOG * BATCH)


def test_member_memory_per_queued_event(benchmark, bench_config):
    """Bytes of Python memory (tracemalloc) per event queued in a member with a backlog:
    BACKLOG Deliveries of BATCH events received, none handled yet (the frames' own bytes
    included). Reported in extra_info (bytes_per_event); the timing is the intake alone."""
    import gc
    import tracemalloc

    loop, member, pending = _member_with_frames(bench_config, 1, BACKLOG)
    frames = list(pending)
    try:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        copies = [[t, bytes(bytearray(f))] for t, f in frames]  # fresh frames, as a socket hands them over
        benchmark.pedantic(lambda: [member._on_delivery(f) for f in copies], rounds=1, iterations=1)
        copies.clear()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert member.partitions.queued == BACKLOG * BATCH
        benchmark.extra_info["bytes_per_event"] = round(used / (BACKLOG * BATCH))
    finally:
        _close(loop, member)
    per_event(benchmark, BACKLOG * BATCH)

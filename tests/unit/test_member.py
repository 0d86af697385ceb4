"""Unit tests of the member (nexus/member/) without a router. Most drive its socket-free
parts directly (`Parts`: partitions, scheduler, fetcher, handler): priority across
partitions, order per partition, duplicates dropped, bounded intake, gap repair and hostile
input. Where the runtime's wiring is under test (the loop between sync handlers, retries,
dead letters, a partition given back, the SUB reader) a real `Member` runs (`Rig`), whose
coord socket is a recorder and whose deliveries are fed by hand (or through a real
in-process PUB/SUB pair)."""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
import pytest
import structlog
import zmq
import zmq.asyncio
from conftest import write_config
from hypothesis import given, settings
from hypothesis import strategies as hs

from nexus import config
from nexus.common.backoff import backoff_delay
from nexus.errors import DependencyError, PermanentError
from nexus.member.breaker import CircuitBreaker
from nexus.member.group import GroupClient
from nexus.member.handlers import Handler
from nexus.member.outcomes import DEAD_LETTER, DEAD_LETTER_RESEND, DONE, OutcomePolicy
from nexus.member.runtime import DRAIN_MAX, Member, dispatch_parts
from nexus.member.scheduler import SLICE, TURN_MAX
from nexus.member.stream import GENERATIONS, PartitionStream, RecentIds
from nexus.protocol.events import Contracts, Event, decode_wire_event, encode
from nexus.protocol.wire import Assign, Delivery, Fetch, Records, coord_decoder, encoder, topic
from nexus.testing import wait_for

GROUP = "g"
PARTITIONS = 4
_ids = itertools.count(1)


def event(n: int, priority: int = 5, id: str | None = None, type_: str = "test.n") -> bytes:
    return encode(
        Event(
            type=type_,
            source="unit",
            payload={"n": n},
            id=id or f"id-{next(_ids)}",
            time=time.time(),
            priority=priority,
        )
    )


def group_config(tmp_path, **group) -> config.Config:
    spec = {
        "handler": "recorder:record",
        "partitions": PARTITIONS,
        "options": {"out": str(tmp_path)},
        "retry": {"attempts": 3, "backoff": ["10ms"]},
        **group,
    }
    return config.load(write_config(tmp_path, workers={GROUP: spec}))


class Feed:
    """Live deliveries and fetch replies fed by hand, numbered as the router numbers them,
    and a handler that records its calls (`fail`: n -> failures left before it succeeds)."""

    def __init__(self) -> None:
        self.handled: list = []  # (n, seq, redelivered, attempt)
        self.prev = dict.fromkeys(range(PARTITIONS), 0)
        self.seq = 0
        self.fail: dict[int, int] = {}

    def handle(self, ev, ctx) -> None:
        if self.fail.get(ev.payload["n"], 0) > 0:
            self.fail[ev.payload["n"]] -= 1
            raise RuntimeError("planned")
        self.handled.append((ev.payload["n"], ctx.seq, ctx.redelivered, ctx.attempt))

    def handle_fn(self, handler_async: bool):
        if not handler_async:
            return self.handle

        async def handle(ev, ctx) -> None:
            await asyncio.sleep(0)
            self.handle(ev, ctx)

        return handle

    # -- what the member under test is fed and asked for ------------------------------
    streams: dict[int, PartitionStream]

    def on_delivery(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def on_records(self, records: Records) -> None:
        raise NotImplementedError

    def fetches(self) -> list:
        """The fetches asked for so far (.partition, .after, .limit)."""
        raise NotImplementedError

    def deliver(
        self, p: int, raws: list[bytes], raw_frame: bytes | None = None, seqs: list[int] | None = None
    ) -> list[int]:
        """One live delivery to partition p; its seqs follow the last one given out, or
        are `seqs` (interleaved with other partitions', as the router numbers keyed events)."""
        if seqs is None:
            seqs = list(range(self.seq + 1, self.seq + 1 + len(raws)))
        self.seq = max(self.seq, seqs[-1])
        frame = (
            raw_frame
            if raw_frame is not None
            else encoder.encode(Delivery(self.prev[p], seqs, [msgspec.Raw(r) for r in raws]))
        )
        self.prev[p] = seqs[-1]
        self.on_delivery([topic(GROUP, p), frame])
        return seqs

    def answer_fetches(
        self, journal: dict[int, list[tuple[int, bytes]]] | None = None, last_seq: int | None = None
    ) -> None:
        """Answer the outstanding fetches from `journal` (partition -> [(seq, raw)]), whose
        last seq is `last_seq` (default: the last one delivered)."""
        for f in self.fetches():
            st = self.streams.get(f.partition)
            if st is None or not st.fetching or f.after != st.fetch_after:
                continue
            items = [(s, r) for s, r in (journal or {}).get(f.partition, []) if s > f.after][: f.limit]
            upto = max([f.after, self.seq if last_seq is None else last_seq] + [s for s, _ in items])
            self.on_records(
                Records(
                    group=GROUP,
                    partition=f.partition,
                    after=f.after,
                    upto=upto,
                    seqs=[s for s, _ in items],
                    events=[msgspec.Raw(r) for _, r in items],
                )
            )


def as_received(records: Records) -> tuple:
    """A fetch reply as the runtime's coord reader hands it on: read from its bytes by the
    member's client (its events left in them), its size, the bytes."""
    raw = encoder.encode(records)
    return GroupClient.read(raw), len(raw), raw


# -- the parts, without a Member ----------------------------------------------------------
class Parts(Feed):
    """The member's socket-free parts as the runtime wires them, holding every partition
    from cursor 0; the fetches the fetcher asks for are kept in `requests`. `run` dispatches
    what is ready as the runtime's dispatcher does when every call succeeds."""

    def __init__(self, cfg: config.Config, handler_async: bool = False) -> None:
        super().__init__()
        spec = cfg.workers[GROUP]
        self.log = structlog.get_logger("test").bind(group=GROUP, member="m1")
        self.handler = Handler(
            self.handle_fn(handler_async),
            contracts=Contracts.from_modules(cfg.contracts, cfg.contracts_untyped),
            group=GROUP,
            member="m1",
            options=spec.options,
            log=self.log,
        )
        self.partitions, self.scheduler, self.fetcher = dispatch_parts(cfg, GROUP, self.handler, box=None, log=self.log)
        self.outcomes = OutcomePolicy(spec.retry, CircuitBreaker(), GroupClient(GROUP, "m1"), self.log)
        self.streams = self.partitions.streams
        for p in range(PARTITIONS):
            self.streams[p] = PartitionStream(p, 0)
        self.requests: list = []

    def on_delivery(self, frames: list[bytes]) -> None:
        self.requests.extend(self.fetcher.on_delivery(frames))

    def on_records(self, records: Records) -> None:
        self.requests.extend(self.fetcher.on_records(*as_received(records)))

    def fetches(self) -> list:
        return self.requests

    async def run(self) -> None:
        """Run every ready head (and what becomes ready meanwhile), then refill."""
        sched, running = self.scheduler, set()
        while True:
            while (st := sched.next()) is not None:
                if not self.handler.is_async:
                    assert sched.run(st, time.perf_counter() + SLICE) is None  # (no call fails here)
                elif sched.start(st, time.monotonic()):
                    running.add(asyncio.ensure_future(self._call(st)))
            if not running:
                break
            _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        self.requests.extend(self.fetcher.refill())

    async def _call(self, st: PartitionStream) -> None:
        error, ctx = await self.scheduler.call(st)
        assert error is None and self.outcomes.judge(st, error).action == "done"
        self.scheduler.done(st)


def make_parts(tmp_path, handler_async: bool = False, **group) -> Parts:
    return Parts(group_config(tmp_path, **group), handler_async)


# -- a whole Member, with a recorder for its coord socket -----------------------------------
class FakeCoord:
    """Records what the member sends to the router (decoded)."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, data: bytes):
        self.sent.append(coord_decoder.decode(data))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def fetches(self) -> list[Fetch]:
        return [m for m in self.sent if isinstance(m, Fetch)]


class FakeSub:
    def __init__(self) -> None:
        self.changes: list[tuple[int, bytes]] = []  # (SUBSCRIBE or UNSUBSCRIBE, topic)

    def setsockopt(self, option: int, value: bytes) -> None:
        self.changes.append((option, value))


class FakeHeartbeat:
    started = True


class Rig(Feed):
    """A Member with all partitions granted at cursor 0 and its fetches answered empty."""

    m: Member

    @property
    def streams(self) -> dict[int, PartitionStream]:
        return self.m.partitions.streams

    def on_delivery(self, frames: list[bytes]) -> None:
        self.m._on_delivery(frames)

    def on_records(self, records: Records) -> None:
        self.m._on_records(*as_received(records))

    def fetches(self) -> list:
        return self.m.coord.fetches()

    async def store_dead_letters(self, rounds: int = 3) -> None:
        """Answer the member's DeadLetters as the router does once each is stored."""
        answered = set()
        for _ in range(rounds):
            await self.settle()
            for m in self.m.coord.sent:
                if type(m).__name__ == "DeadLetter" and (m.partition, m.seq) not in answered:
                    answered.add((m.partition, m.seq))
                    self.m._on_dead_letter_stored(m.partition, m.seq)

    async def settle(self) -> None:
        """Let the member's tasks run until they are idle."""
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        for _ in range(50):
            await asyncio.sleep(0)


async def make_rig(tmp_path, handler_async: bool = False, **group) -> Rig:
    rig = Rig()
    m = rig.m = Member(group_config(tmp_path, **group), GROUP, "m1", handle=rig.handle_fn(handler_async))
    m.loop = asyncio.get_running_loop()
    m.coord, m.sub, m.heartbeat = FakeCoord(), FakeSub(), FakeHeartbeat()
    m._on_assign(Assign(group=GROUP, partitions=list(range(PARTITIONS)), grants=dict.fromkeys(range(PARTITIONS), 0)))
    await asyncio.sleep(0)
    rig.answer_fetches()
    m.coord.sent.clear()
    return rig


def run(coro):
    return asyncio.run(coro)


# -- order ------------------------------------------------------------------------------
def check_order(handled: list[int], parts: dict[int, list[tuple[int, int, int]]]) -> None:
    """The dispatch order of events all queued up front (items (seq, priority, n) per
    partition), against the rules: each partition in seq order; no event is handled
    while another partition's head has a better priority; a partition taken from the heap
    starts with the best (priority, seq) of all heads; among equal priorities a partition
    runs on past an older head in another partition for TURN_MAX events at most."""
    where = {n: (p, i) for p, items in parts.items() for i, (_, _, n) in enumerate(items)}
    pos = dict.fromkeys(parts, 0)
    last, turn = None, 0
    for n in handled:
        p, i = where[n]
        assert i == pos[p], "order within a partition"
        seq, prio, _ = parts[p][i]
        others = [parts[q][pos[q]][:2] for q in parts if q != p and pos[q] < len(parts[q])]
        assert all(o_prio >= prio for _, o_prio in others), "priority across partitions"
        turn = turn + 1 if p == last else 1
        if turn == 1:
            assert all((prio, seq) < (o_prio, o_seq) for o_seq, o_prio in others), "the heap's best first"
        elif turn > TURN_MAX:
            assert not any(o_prio == prio and o_seq < seq for o_seq, o_prio in others), "bounded turn"
        pos[p] += 1
        last = p
    assert all(pos[p] == len(items) for p, items in parts.items())


@settings(max_examples=40, deadline=None, database=None)
@given(
    events=hs.lists(hs.tuples(hs.integers(0, PARTITIONS - 1), hs.integers(1, 3)), min_size=1, max_size=120),
    per_delivery=hs.integers(1, 50),
    handler_async=hs.booleans(),
)
def test_priority_across_partitions_and_order_per_partition(tmp_path_factory, events, per_delivery, handler_async):
    """Keyed events spread over partitions (seqs interleaved as the router numbers them),
    all queued before the dispatcher runs: see check_order for what must hold."""

    async def main():
        rig = make_parts(tmp_path_factory.mktemp("m"), handler_async=handler_async, concurrency=1)
        parts: dict[int, list[tuple[int, int, int]]] = {p: [] for p in range(PARTITIONS)}
        for n, (p, prio) in enumerate(events):
            parts[p].append((n + 1, prio, n))
        for p, items in parts.items():
            for k in range(0, len(items), per_delivery):
                chunk = items[k : k + per_delivery]
                rig.deliver(p, [event(n, priority=prio) for _, prio, n in chunk], seqs=[s for s, _, _ in chunk])
        await rig.run()
        check_order([h[0] for h in rig.handled], parts)
        assert rig.partitions.queued == 0 and rig.scheduler.handled == len(events)

    run(main())


def test_a_partition_yields_to_an_older_head_of_equal_priority_after_its_turn(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        rig.deliver(0, [event(1)], seqs=[1])
        rig.deliver(1, [event(2)], seqs=[2])
        rig.deliver(0, [event(n) for n in range(3, 51)], seqs=list(range(3, 51)))
        await rig.run()
        first_turn = [1] + list(range(3, 3 + TURN_MAX - 1))  # TURN_MAX events of partition 0
        assert [h[0] for h in rig.handled] == first_turn + [2] + list(range(3 + TURN_MAX - 1, 51))

    run(main())


def test_a_lone_partition_runs_without_the_heap_but_yields_to_a_better_event(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        rig.deliver(0, [event(n) for n in range(5)])  # seqs 1..5, priority 5
        rig.deliver(1, [event(100, priority=1)])  # seq 6, priority 1: first
        await rig.run()
        assert [h[0] for h in rig.handled] == [100, 0, 1, 2, 3, 4]
        rig.scheduler.work.clear()
        rig.deliver(0, [event(n) for n in range(5, 8)])  # arrives while idle: wakes the dispatcher
        assert rig.scheduler.work.is_set()
        await rig.run()
        assert [h[0] for h in rig.handled][6:] == [5, 6, 7]
        assert rig.scheduler.heap == [] and rig.partitions.queued == 0

    run(main())


def test_context_of_each_event(tmp_path):
    async def main():
        rig = make_parts(tmp_path, options={"out": str(tmp_path), "k": 1})
        seen = []
        rig.handler.handle = lambda ev, ctx: seen.append(ctx)
        rig.deliver(2, [event(0, id="e-1")])
        await rig.run()
        (ctx,) = seen
        assert (ctx.group, ctx.member, ctx.seq, ctx.partition, ctx.attempt, ctx.redelivered) == (
            GROUP,
            "m1",
            1,
            2,
            1,
            False,
        )
        assert ctx.options["k"] == 1 and ctx.log is not None

    run(main())


def test_slow_sync_handlers_let_the_loop_run_between_events(tmp_path):
    """A sync handler longer than the dispatcher's slice: the loop (sockets, timers, acks)
    gets a turn after each event, not after the whole backlog."""

    async def main():
        rig = await make_rig(tmp_path)
        calls = []

        def slow(ev, ctx) -> None:
            time.sleep(0.006)
            calls.append(ev.payload["n"])
            if ev.payload["n"] == 0:
                rig.m.loop.call_soon(lambda: calls.append("loop"))

        rig.m.handler.handle = slow
        rig.deliver(0, [event(n) for n in range(4)])
        task = asyncio.ensure_future(rig.m._dispatcher())
        await rig.settle()
        task.cancel()
        assert calls == [0, "loop", 1, 2, 3]

    run(main())


# -- failures -----------------------------------------------------------------------------
def test_a_failing_event_holds_only_its_partition_and_is_retried(tmp_path):
    async def main():
        rig = await make_rig(tmp_path)
        rig.fail[1] = 2  # fails twice, then succeeds
        rig.deliver(0, [event(0), event(1), event(2)])
        rig.deliver(1, [event(10), event(11)])
        task = asyncio.ensure_future(rig.m._dispatcher())
        await rig.settle()
        await asyncio.sleep(0.1)
        await rig.settle()
        task.cancel()
        order = [h[0] for h in rig.handled]
        assert order.index(10) < order.index(1) and order.index(11) < order.index(1)  # p1 went on
        assert [n for n in order if n < 10] == [0, 1, 2]  # p0 in order
        assert [h for h in rig.handled if h[0] == 1][0][2:] == (True, 3)  # attempt 3
        assert rig.m.outcomes.failed == 2 and rig.m.scheduler.handled == 5

    run(main())


def test_dead_letter_then_the_partition_moves_on(tmp_path):
    async def main():
        rig = await make_rig(tmp_path, retry={"attempts": 1})
        rig.fail[0] = 5
        rig.deliver(0, [event(0), event(1)])
        task = asyncio.ensure_future(rig.m._dispatcher())
        await rig.settle()
        assert [type(m).__name__ for m in rig.m.coord.sent] == ["DeadLetter"]
        # issue 10 #5: the partition keeps its head (unacked) until the router stored it
        assert rig.handled == [] and rig.streams[0].handled_upto() == 0
        rig.m._on_dead_letter_stored(0, rig.m.coord.sent[0].seq)
        await rig.settle()
        task.cancel()
        assert [h[0] for h in rig.handled] == [1]
        assert rig.m.outcomes.dead_lettered == 1

    run(main())


# -- outcomes (no Member) -----------------------------------------------------------------------
def test_backoff_delay_is_the_attempts_backoff_and_the_last_one_past_the_list():
    assert [backoff_delay([1.0, 2.0, 4.0], n) for n in (0, 1, 2, 3, 9)] == [1.0, 1.0, 2.0, 4.0, 4.0]
    assert backoff_delay([], 3) == 1.0


def head_stream(n: int = 0) -> PartitionStream:
    """A stream whose head (seq 1) is in a call."""
    st = PartitionStream(0, 0)
    st.take([1], [decode_wire_event(event(n))], 1)
    st.busy = True
    return st


def test_outcome_policy_retries_with_backoff_then_dead_letters(tmp_path):
    retry = group_config(tmp_path, retry={"attempts": 3, "backoff": ["1s", "2s", "50s"], "max_backoff": "30s"})
    policy = OutcomePolicy(
        retry.workers[GROUP].retry, CircuitBreaker(), GroupClient(GROUP, "m1"), structlog.get_logger()
    )
    st = head_stream()
    assert policy.judge(st, None) == DONE and not st.busy and policy.failed == 0
    st.busy = True
    assert policy.judge(st, RuntimeError("1")) == ("retry", 1.0)
    assert st.attempt == 2 and st.waiting and not st.busy and st.first_failed > 0
    st.waiting, st.busy = False, True
    assert policy.judge(st, RuntimeError("2")) == ("retry", 2.0)
    st.waiting, st.busy = False, True
    assert policy.judge(st, RuntimeError("3")) == DEAD_LETTER and st.attempt == 3 and policy.failed == 3
    letter = coord_decoder.decode(policy.dead_letter(st, RuntimeError("3")))
    assert (letter.partition, letter.seq, letter.attempts, letter.error_type) == (0, 1, 3, "RuntimeError")
    assert st.busy and st.dead_letter is not None  # kept until the router stored it
    assert policy.resends([st], time.monotonic()) == []
    assert policy.resends([st], time.monotonic() + DEAD_LETTER_RESEND + 1) == [st.dead_letter[0]]
    assert not policy.stored(st, 2) and policy.stored(st, 1)
    assert not st.busy and st.dead_letter is None and policy.dead_lettered == 1
    assert not policy.stored(st, 1)  # a resend's second answer
    # a PermanentError goes to the dead letters at once; a DependencyError is retried, always
    assert policy.judge(head_stream(), PermanentError("no")) == DEAD_LETTER
    st = head_stream()
    st.attempt = 5
    assert policy.judge(st, DependencyError("down")) == ("retry", 30.0)  # the last backoff, capped


def test_outcome_policy_breaker_opens_on_dependency_errors_and_a_probe_closes_it(tmp_path):
    cfg = group_config(tmp_path, retry={"attempts": 9, "backoff": ["10ms"]})
    breaker = CircuitBreaker(failures=2, window=60.0, reset=5.0)
    policy = OutcomePolicy(cfg.workers[GROUP].retry, breaker, GroupClient(GROUP, "m1"), structlog.get_logger())
    assert policy.closed
    for _ in range(2):
        assert policy.judge(head_stream(), DependencyError("down")).action == "retry"
    assert not policy.closed
    now = time.monotonic()
    assert 4.0 < policy.admit(now) <= 5.0  # open: nothing is taken
    assert policy.admit(now + 5.0) == 0.0  # half open: one probe
    assert policy.admit(now + 5.0) == 0.05  # ... at a time
    assert policy.judge(head_stream(), None) == DONE and policy.closed  # the probe succeeded


# -- duplicates ---------------------------------------------------------------------------
def test_an_id_handled_before_is_dropped(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        rig.deliver(0, [event(0, id="same"), event(1), event(2, id="same")])
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1]
        assert rig.scheduler.duplicates_dropped == 1 and rig.partitions.queued == 0
        assert rig.streams[0].handled_upto() == 3  # the duplicate is acked too

    run(main())


def test_a_partition_given_back_redelivers_and_what_we_handled_is_dropped(tmp_path):
    """The partition goes away and comes back from an older cursor (the router lost our
    acks): the events come again flagged, and the ones this member handled are dropped."""

    async def main():
        rig = await make_rig(tmp_path)
        raws = [event(n) for n in range(4)]
        seqs = rig.deliver(0, raws)
        task = asyncio.ensure_future(rig.m._dispatcher())
        await rig.settle()
        assert len(rig.handled) == 4
        rig.m._on_assign(Assign(group=GROUP, partitions=[1, 2, 3]))  # revoked
        await rig.settle()
        rig.m._on_assign(
            Assign(group=GROUP, partitions=list(range(PARTITIONS)), grants={0: 0}, redelivered={0: seqs[-1]})
        )
        await rig.settle()
        journal = {0: list(zip(seqs, raws, strict=False)) + [(rig.seq + 1, event(99))]}
        rig.seq += 1
        rig.answer_fetches(journal)
        await rig.settle()
        task.cancel()
        assert [h[0] for h in rig.handled] == [0, 1, 2, 3, 99]
        assert rig.m.scheduler.duplicates_dropped == 4

    run(main())


@settings(max_examples=50, deadline=None, database=None)
@given(capacity=hs.integers(1, 20), ids=hs.lists(hs.integers(0, 60), max_size=200))
def test_recent_ids_remember_at_least_the_last_capacity(capacity, ids):
    recent = RecentIds(capacity)
    handled = []
    for i in ids:
        key = f"e{i}"
        if key not in recent:  # as the dispatcher does: only new ids are added
            recent.add(key)
            handled.append(key)
        assert set(handled[-capacity:]) <= recent
        assert len(recent) <= (GENERATIONS + 1) * -(-capacity // GENERATIONS)  # about capacity
    recent.clear()
    assert not recent and all(f"e{i}" not in recent for i in ids)


# -- intake -------------------------------------------------------------------------------
def test_a_delivery_is_taken_while_there_is_room_even_past_max_in_flight(tmp_path):
    async def main():
        rig = make_parts(tmp_path, max_in_flight=10)
        rig.deliver(0, [event(n) for n in range(8)])
        rig.deliver(0, [event(n) for n in range(8, 13)])  # 8 < 10: taken whole (13)
        assert rig.partitions.queued == 13 and not rig.streams[0].behind
        rig.deliver(0, [event(n) for n in range(13, 15)])  # full: left in the journal
        assert rig.partitions.queued == 13 and rig.streams[0].behind
        assert rig.streams[0].watermark == 13

    run(main())


def test_deliveries_dropped_while_full_are_fetched_once_there_is_room(tmp_path):
    async def main():
        rig = make_parts(tmp_path, max_in_flight=4)
        raws = [event(n) for n in range(8)]
        rig.deliver(0, raws[:4])
        rig.deliver(0, raws[4:6])  # full: dropped, the stream is behind
        rig.deliver(0, raws[6:])  # a gap now: fetched, not queued
        assert rig.partitions.queued == 4 and rig.streams[0].watermark == 4
        await rig.run()  # (then refills: the stream behind fetches)
        rig.answer_fetches({0: list(zip(range(1, 9), raws, strict=False))})
        await rig.run()
        assert [h[0] for h in rig.handled] == list(range(8))

    run(main())


def test_a_gap_is_fetched_and_live_deliveries_wait_for_it(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        raws = [event(n) for n in range(6)]
        rig.deliver(0, raws[:2])  # seqs 1, 2
        rig.seq += 2  # 3, 4 lost on PUB/SUB
        rig.prev[0] = 4
        rig.deliver(0, raws[4:])  # seqs 5, 6: prev 4 > watermark 2
        assert [f.after for f in rig.fetches()] == [2]
        rig.answer_fetches({0: list(zip(range(1, 7), raws, strict=False))})  # the journal has them all
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1, 2, 3, 4, 5]

    run(main())


def test_live_deliveries_buffered_during_a_fetch_are_applied_after_it(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        raws = [event(n) for n in range(6)]
        rig.deliver(0, raws[:2])
        rig.seq += 2
        rig.prev[0] = 4
        rig.deliver(0, raws[4:])  # buffered: 3, 4 are fetched
        rig.answer_fetches({0: list(zip(range(1, 5), raws, strict=False))}, last_seq=4)  # journal read before 5, 6
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1, 2, 3, 4, 5]
        assert len(rig.fetches()) == 1

    run(main())


def test_deliveries_behind_queued_events_are_held_undecoded_and_handled_in_order(tmp_path):
    """A backlog costs its wire size: deliveries and fetch replies that arrive behind queued
    events are kept as the bytes they came in, decoded when they reach the head."""

    async def main():
        rig = make_parts(tmp_path)
        rig.deliver(0, [event(n) for n in range(3)])  # the head's delivery: decoded
        rig.deliver(0, [event(n) for n in range(3, 5)])  # behind it: held
        rig.deliver(1, [event(n) for n in range(5, 7)])  # another partition's head: decoded
        rig.deliver(0, [event(7)])
        st = rig.streams[0]
        assert len(st.queue) == 3 and [(h.first, h.n) for h in st.held] == [(4, 2), (8, 1)]
        assert all(type(h.frame) is bytes for h in st.held) and rig.partitions.queued == 8
        # a fetch reply behind the queue is held too (the stream missed seqs 9, 10)
        st.fetching, st.fetch_after = True, st.watermark
        rig.seq = 10
        rig.on_records(
            Records(
                group=GROUP,
                partition=0,
                after=8,
                upto=10,
                seqs=[9, 10],
                events=[msgspec.Raw(event(8)), msgspec.Raw(event(9))],
            )
        )
        assert [(h.first, h.n) for h in st.held][-1] == (9, 2) and type(st.held[-1].frame) is bytes
        assert rig.partitions.queued == 10 and st.watermark == 10
        await rig.run()
        handled = [h[0] for h in rig.handled]
        assert [n for n in handled if n not in (5, 6)] == [0, 1, 2, 3, 4, 7, 8, 9]
        assert sorted(handled) == list(range(10))
        assert rig.partitions.queued == 0 and not st.held and st.handled_upto() == 10

    run(main())


def test_a_held_delivery_that_does_not_decode_is_fetched_from_the_journal(tmp_path):
    """Its head (prev, seqs) read when it came, its events do not: the stream goes back to
    before it, drops what was held after it and fetches that part from the journal."""

    async def main():
        rig = make_parts(tmp_path)
        raws = [event(n) for n in range(4)]
        rig.deliver(0, raws[:1])  # seq 1: queued
        bad = encoder.encode(Delivery(1, [2], [raws[1]]))  # bytes, not Raw: a bin, not a map
        rig.deliver(0, raws[1:2], raw_frame=bad)  # seq 2: held (its head reads)
        rig.deliver(0, raws[2:])  # seqs 3, 4: held
        st = rig.streams[0]
        assert len(st.held) == 2 and rig.partitions.queued == 4 and rig.fetches() == []
        await rig.run()  # handles seq 1; seq 2 does not decode: back to 1, behind, refetched
        assert [h[0] for h in rig.handled] == [0] and rig.fetcher.bad_deliveries == 1
        assert rig.partitions.queued == 0 and not st.held and st.watermark == 1
        assert [(f.partition, f.after) for f in rig.fetches()] == [(0, 1)]
        rig.answer_fetches({0: list(zip(range(1, 5), raws, strict=False))})
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1, 2, 3] and rig.partitions.queued == 0

    run(main())


def test_a_poison_seq_passed_over_in_a_held_delivery(tmp_path):
    """Assign.skip reaches events still held undecoded: they leave the queue count too."""

    async def main():
        rig = make_parts(tmp_path)
        rig.deliver(0, [event(0)])
        rig.deliver(0, [event(1), event(2)])  # seqs 2, 3: held
        rig.deliver(0, [event(3)])  # seq 4: held
        assert rig.partitions.queued == 4
        rig.partitions.assign(Assign(group=GROUP, partitions=list(range(PARTITIONS)), skip={0: [3]}))
        assert rig.partitions.queued == 3
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1, 3] and rig.partitions.queued == 0
        assert rig.streams[0].handled_upto() == 4

    run(main())


def test_a_delivery_that_does_not_decode_is_fetched_from_the_journal(tmp_path):
    """E.g. an event published as msgpack bin instead of a map: the journal's copy is used."""

    async def main():
        rig = make_parts(tmp_path)
        good = event(0)
        bad_frame = encoder.encode(Delivery(0, [1], [good]))  # bytes, not Raw: a bin, not a map
        rig.deliver(0, [good], raw_frame=bad_frame)
        assert rig.fetcher.bad_deliveries == 1 and [f.after for f in rig.fetches()] == [0]
        rig.answer_fetches({0: [(1, good)]})
        rig.deliver(0, [event(1)])
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 1]

    run(main())


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        encoder.encode([0, [], []]),
        encoder.encode([0, [1, 2], []]),
        encoder.encode({"prev": 0}),
        encoder.encode([0, [1], [{"type": 1}]]),
    ],
)
def test_hostile_deliveries_do_not_hurt(tmp_path, frame):
    async def main():
        rig = make_parts(tmp_path)
        rig.on_delivery([topic(GROUP, 0), frame])
        rig.on_delivery([b"nonsense", frame])
        rig.on_delivery([topic(GROUP, 0)])
        rig.requests.clear()
        rig.streams[0].fetching = False
        rig.deliver(0, [event(0)])
        await rig.run()
        assert [h[0] for h in rig.handled] == [0]

    run(main())


def test_an_unreadable_event_in_a_fetch_reply_is_skipped_not_fatal(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        rig.streams[0].fetching = True
        rig.streams[0].fetch_after = 0
        rig.seq = 3
        rig.on_records(
            Records(
                group=GROUP,
                partition=0,
                after=0,
                upto=3,
                seqs=[1, 2, 3],
                events=[msgspec.Raw(event(0)), msgspec.Raw(b"\x01"), msgspec.Raw(event(2))],
            )
        )
        await rig.run()
        assert [h[0] for h in rig.handled] == [0, 2] and rig.fetcher.bad_events == 1
        assert rig.streams[0].handled_upto() == 3

    run(main())


def test_an_unknown_type_or_bad_payload_fails_like_a_handler_error(tmp_path):
    async def main():
        rig = await make_rig(tmp_path, retry={"attempts": 1})
        bad_payload = msgspec.msgpack.encode(
            {"type": "test.n", "source": "unit", "payload": msgspec.Raw(b"\xa2\xff\xfe"), "id": "bad-utf8", "time": 1.0}
        )
        rig.deliver(0, [event(0, type_="nope.unknown"), bad_payload, event(2)])
        task = asyncio.ensure_future(rig.m._dispatcher())
        await rig.store_dead_letters()
        task.cancel()
        assert [h[0] for h in rig.handled] == [2]
        letters = [m for m in rig.m.coord.sent if type(m).__name__ == "DeadLetter"]
        assert [m.error_type for m in letters] == ["EventError", "EventError"]
        assert "unknown event type" in letters[0].error and "not valid msgpack" in letters[1].error

    run(main())


def inproc_pub_sub(name: str) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    """A real PUB and a plain SUB (as the member's) subscribed to everything, connected."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"inproc://{name}")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"inproc://{name}")
    # (inproc connects at once, but the subscription reaches the PUB when it next sends or
    # polls: wait until a probe gets through)
    wait_for(lambda: pub.send(b"probe") is None and sub.poll(10, zmq.POLLIN) and sub.recv() == b"probe", timeout=5)
    return ctx, pub, sub


@pytest.mark.parametrize("handler_async", [False, True])
def test_the_sub_reader_loses_nothing_when_many_deliveries_are_queued(tmp_path, handler_async):
    """More than DRAIN_MAX deliveries waiting before the reader starts, and no new arrival
    after them (ZMQ_FD is edge triggered: nothing signals again): read in rounds, in order,
    none dropped (sync handlers run from the reader callback, async ones from the
    dispatcher task)."""

    async def main():
        rig = await make_rig(tmp_path, handler_async=handler_async)
        ctx, pub, sub = inproc_pub_sub(f"unit-member-{handler_async}")
        rig.m.sub = sub
        total = 0
        for k in range(DRAIN_MAX * 3 + 5):
            p = k % PARTITIONS
            seqs = list(range(rig.seq + 1, rig.seq + 4))
            pub.send_multipart(
                [
                    topic(GROUP, p),
                    encoder.encode(Delivery(rig.prev[p], seqs, [msgspec.Raw(event(total + i)) for i in range(3)])),
                ]
            )
            rig.seq, rig.prev[p], total = seqs[-1], seqs[-1], total + 3
        task = asyncio.ensure_future(rig.m._dispatcher())
        rig.m._start_intake()
        deadline = time.monotonic() + 10
        while rig.m.scheduler.handled < total and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rig.m._stop_intake()
        pub.close(0)
        ctx.term()
        assert rig.m.scheduler.handled == total and rig.m.coord.fetches() == []
        assert sorted(h[0] for h in rig.handled) == list(range(total))

    run(main())


def test_a_delivery_reaches_a_sync_handler_in_the_loop_turn_it_arrives_in(tmp_path):
    """A live delivery runs its sync handler from the SUB socket's reader callback: one loop
    turn after it was sent, not three (the recv future, the reader task, the dispatcher
    task), and the dispatcher task does not wake for it. Loop turns are counted by a
    callback that schedules itself again each turn."""

    async def main():
        rig = await make_rig(tmp_path)
        ctx, pub, sub = inproc_pub_sub("unit-member-turns")
        rig.m.sub = sub
        loop = asyncio.get_running_loop()
        turns = 0

        def count() -> None:
            nonlocal turns
            turns += 1
            counter[0] = loop.call_soon(count)

        counter = [loop.call_soon(count)]
        at_handler: list[int] = []
        rig.m.handler.handle = lambda ev, ctx: at_handler.append(turns)
        passes = 0
        dispatch = rig.m._dispatch

        def counted_dispatch() -> bool:
            nonlocal passes
            passes += 1
            return dispatch()

        rig.m._dispatch = counted_dispatch  # type: ignore[method-assign]
        task = asyncio.ensure_future(rig.m._dispatcher())
        rig.m._start_intake()
        try:
            lags = []
            for n in range(5):
                await asyncio.sleep(0.01)  # (idle: the reader has read everything, the edge is armed)
                passes_before = passes
                p = n % PARTITIONS
                seq = rig.seq + 1
                pub.send_multipart(
                    [topic(GROUP, p), encoder.encode(Delivery(rig.prev[p], [seq], [msgspec.Raw(event(n))]))]
                )
                rig.seq = rig.prev[p] = seq
                sent_at = turns
                deadline = time.monotonic() + 5
                while len(at_handler) <= n and time.monotonic() < deadline:
                    await asyncio.sleep(0)
                assert len(at_handler) > n, "the delivery was not handled"
                lags.append(at_handler[n] - sent_at)
                for _ in range(5):
                    await asyncio.sleep(0)  # (a dispatcher task woken for it would run now)
                assert passes - passes_before == 1, "the dispatcher task ran a pass for the delivery too"
            assert lags == [1] * 5
        finally:
            counter[0].cancel()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            rig.m._stop_intake()
            pub.close(0)
            ctx.term()
        assert rig.m.scheduler.handled == 5

    run(main())


def test_a_stream_behind_is_unsubscribed_until_a_fetch_reaches_the_journal_end(tmp_path):
    """While a stream is behind (full), its live deliveries would only be dropped: the
    member unsubscribes from them (nothing queues for it in ZeroMQ's pipes, in the router or
    here) and subscribes again once it caught up from the journal; nothing is lost."""

    async def main():
        rig = await make_rig(tmp_path, max_in_flight=4)
        sub = rig.m.sub
        sub.changes.clear()
        raws = [event(n) for n in range(12)]
        rig.deliver(0, raws[:4])
        rig.deliver(0, raws[4:6])  # full: dropped, behind, muted
        assert rig.streams[0].behind and rig.streams[0].muted
        assert sub.changes == [(zmq.UNSUBSCRIBE, topic(GROUP, 0))]
        rig.deliver(0, raws[6:8])  # (in the pipe before the unsubscribe took effect)
        assert len(sub.changes) == 1  # muted once
        rig.seq = 12  # the journal's end

        def answer() -> None:  # the router's fetch replies, bounded by their limit
            for f in rig.fetches():
                st = rig.streams[0]
                if f.partition != 0 or not st.fetching or f.after != st.fetch_after:
                    continue
                seqs = list(range(f.after + 1, min(12, f.after + f.limit) + 1))
                upto = seqs[-1] if seqs else 12
                rig.on_records(
                    Records(
                        group=GROUP,
                        partition=0,
                        after=f.after,
                        upto=upto,
                        seqs=seqs,
                        events=[msgspec.Raw(raws[s - 1]) for s in seqs],
                        complete=upto >= 12,
                    )
                )
                assert st.muted or upto == 12  # live again only at the journal's end

        task = asyncio.ensure_future(rig.m._dispatcher())
        try:
            for _ in range(50):
                await rig.settle()
                answer()
                if len(rig.handled) == 12 and not rig.streams[0].muted:
                    break
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [h[0] for h in rig.handled] == list(range(12))
        assert not rig.streams[0].muted and sub.changes[-1] == (zmq.SUBSCRIBE, topic(GROUP, 0))

    run(main())


def test_a_delivery_read_while_full_is_not_queued_when_smaller_events_made_room(tmp_path):
    """A delivery that arrives while the member is full is read as its head only (prev,
    seqs); its events' size, smaller than the average so far, can make room at once. It
    must still only fall behind (fetched later), not be queued without its events."""

    async def main():
        rig = make_parts(tmp_path, max_in_flight=100, max_in_flight_bytes=10_000)
        big = encode(Event(type="test.n", source="unit", payload={"n": 0, "pad": "x" * 6000}, id="big", time=1.0))
        rig.deliver(0, [big])
        assert rig.fetcher.capacity() == 1 and rig.partitions.queued == 1  # full
        rig.deliver(0, [event(n) for n in range(1, 11)])
        assert rig.fetcher.room() > 0  # smaller events seen: room again
        assert rig.partitions.queued == 1 and rig.streams[0].behind and rig.streams[0].watermark == 1
        await rig.run()  # (then refills: the stream behind fetches)
        assert [(f.partition, f.after) for f in rig.fetches()] == [(0, 1)]

    run(main())


def test_a_members_coord_identity_is_unguessable():
    """The router hands an identity to the newest connection claiming it: one made of
    group, name and pid (all shown in `nexus status`) could be taken over by any key."""
    import os

    from nexus.member.group import GroupClient

    a, b = GroupClient("rec", "rec-0"), GroupClient("rec", "rec-0")
    assert a.identity() == a.identity() and a.identity("hb") == a.identity() + b"/hb"
    assert a.identity() != b.identity()
    assert str(os.getpid()).encode() not in a.identity().split(b"/")
    assert len(a.identity().split(b"/")[2]) >= 32

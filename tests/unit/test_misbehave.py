"""Unit tests (no sockets, no processes) of what bounds misbehaving handlers: crash
accounting (nexus/supervisor/crashes.py), exited members and poison skips in the coordinator,
skips in a partition stream, the dead-letter store and its writer thread, follow-ups
settled before their cause counts as handled, and async handler timeouts."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from conftest import write_config
from test_member import event, make_rig, run

from nexus import config
from nexus.common.blackbox import InFlight
from nexus.errors import ExitCode, RejectedError, describe_exit
from nexus.member.stream import PartitionStream
from nexus.router.coordinator import Coordinator
from nexus.router.deadletters import DeadLetterStore, DeadLetterWriter, PendingDeadLetter
from nexus.supervisor.crashes import CrashBook
from nexus.testing import wait_for


def cfg_with(tmp_path, **group):
    spec = {"handler": "recorder:record", "options": {"out": str(tmp_path)}, **group}
    return config.load(write_config(tmp_path, workers={"g": spec}))


# -- crashes.py -------------------------------------------------------------------------------
def test_crashes_count_per_event_and_name_poison_at_max_crashes(tmp_path):
    book = CrashBook(cfg_with(tmp_path, max_crashes=3))
    seen = [book.assess("g", "g-0", 100 + i, -11, [InFlight(0, 5, 42)]) for i in range(3)]
    assert [m.poison for m in seen] == [{}, {}, {5: [42]}]
    assert seen[0].inflight == {5: [42]} and seen[0].reason == "crashed" and seen[0].pid == 100
    # counted afresh after it was named; other events have their own counts
    assert book.assess("g", "g-1", 1, 1, [InFlight(0, 5, 42), InFlight(1, 6, 43)]).poison == {}
    assert describe_exit(-11) == "signal SIGSEGV" and describe_exit(13) == "exit code 13"


def test_handler_timeouts_count_against_retry_attempts(tmp_path):
    book = CrashBook(cfg_with(tmp_path, retry={"attempts": 2}, max_crashes=5))
    first = book.assess("g", "g-0", 1, int(ExitCode.HANDLER_TIMEOUT), [InFlight(0, 1, 7)])
    second = book.assess("g", "g-0", 2, int(ExitCode.HANDLER_TIMEOUT), [InFlight(0, 1, 7)])
    assert first.reason == "handler_timeout" and first.poison == {} and second.poison == {1: [7]}


def test_an_exit_without_an_event_in_flight_names_none(tmp_path):
    msg = CrashBook(cfg_with(tmp_path)).assess("g", "g-0", 1, 1, [])
    assert msg.inflight == {} and msg.poison == {}


# -- coordinator: exited members and poison skips -------------------------------------------
def coordinator(partitions=4):
    heads = {"g": [10] * partitions}
    c = Coordinator(3.0, heads=heads)
    group = c.add_group("g", partitions, [0] * partitions)
    return c, group


def test_an_exited_member_is_dropped_at_once_and_its_poison_skipped_by_the_next_owner():
    c, group = coordinator()
    c.join(group, "a", b"A", 0.0, pid=1)
    c.join(group, "b", b"B", 0.0, pid=2)
    for p in range(4):
        if group.owner[p] == "a" and group.target[p] == "b":
            c.released(group, "a", {p: 0}, 0.1)
    held_by_a = [p for p in range(4) if group.owner[p] == "a"]
    out = c.exited(group, "a", 1, {held_by_a[0]: [7]}, 1.0)
    out += c.poison_stored(group, held_by_a[0], 7, 1.1)  # the dead letter is stored
    assert "a" not in group.members and all(o == "b" for o in group.owner)
    assert [a.skip for _, a in out if a.skip] == [{held_by_a[0]: [7]}]
    assert all(ident == b"B" for ident, _ in out)
    assert set().union(*(a.redelivered for _, a in out)) == set(held_by_a)  # unclean: flagged


def test_a_newer_incarnation_is_not_dropped_and_the_holder_is_told_to_skip():
    c, group = coordinator()
    c.join(group, "a", b"A2", 0.0, pid=22)  # the restarted member, already back
    out = c.exited(group, "a", 21, {2: [9]}, 1.0)  # about the old process
    assert "a" in group.members and out == []
    out = c.poison_stored(group, 2, 9, 1.1)  # told once the row is stored
    ((ident, assign),) = out
    assert ident == b"A2" and assign.skip == {2: [9]} and assign.grants == {}


def test_skips_behind_the_cursor_are_forgotten():
    c, group = coordinator()
    c.exited(group, "nobody", 0, {1: [3, 30]}, 0.0)
    c.poison_stored(group, 1, 3, 0.0)
    c.poison_stored(group, 1, 30, 0.0)
    group.cursors[1] = 5
    out = c.join(group, "a", b"A", 1.0)
    assert out[0][1].skip == {1: [30]} and group.skip == {1: {30}}


def test_poison_is_skipped_only_once_its_dead_letter_is_stored():
    """Review #3: the skip was handed to the next owner at once while the dead letter was
    only queued; a router stopping before the row was written lost the event (the owner
    passed over it and acked, restore_skips found nothing). Until the row is stored, the
    partition goes to no one; then its next owner gets it with the skip."""
    c, group = coordinator()
    c.join(group, "a", b"A", 0.0, pid=1)
    c.join(group, "b", b"B", 0.0, pid=2)
    for p in range(4):
        if group.owner[p] == "a" and group.target[p] == "b":
            c.released(group, "a", {p: 0}, 0.1)
    poisoned, other = [p for p in range(4) if group.owner[p] == "a"]
    out = c.exited(group, "a", 1, {poisoned: [7]}, 1.0)
    assert group.owner[poisoned] is None and group.skip == {}
    assert all(poisoned not in a.grants and not a.skip for _, a in out)
    assert group.owner[other] == "b"  # the other one moves at once
    assert c.expire(2.0) == [] and group.owner[poisoned] is None
    out = c.poison_stored(group, poisoned, 7, 2.5)
    ((ident, assign),) = out
    assert ident == b"B" and poisoned in assign.grants and assign.skip == {poisoned: [7]}
    assert c.poison_stored(group, poisoned, 7, 2.6) == []  # told twice: nothing more


def test_a_redelivery_flag_survives_a_graceful_move_before_it_was_handled():
    c, group = coordinator(partitions=2)
    c.join(group, "a", b"A", 0.0)  # unclean at start: flagged up to 10
    out = c.join(group, "b", b"B", 0.1)
    moving = [p for p in range(2) if group.target[p] == "b"][0]
    out = c.released(group, "a", {moving: 0}, 0.2)  # a handled none of them
    grant = [m for ident, m in out if ident == b"B" and m.grants][0]
    assert grant.redelivered == {moving: 10}


# -- partition stream skips -------------------------------------------------------------------
def test_a_stream_passes_over_skipped_seqs_and_acks_past_them():
    st = PartitionStream(0, 0)
    st.skip = {2}
    assert st.take([1, 2, 3], ["a", "b", "c"], 3) == 2
    assert [s for s, _ in st.queue] == [1, 3] and st.watermark == 3
    st.busy = True
    assert st.add_skip([1, 3]) == 1  # the busy head stays
    assert [s for s, _ in st.queue] == [1]
    st.queue.popleft()
    assert st.handled_upto() == 3


# -- dead-letter store ---------------------------------------------------------------------------
def letter(seq=1, event_id="e1", **kw):
    return dict(
        group="g",
        event_id=event_id,
        type="test.n",
        source="s",
        seq=seq,
        partition=0,
        member="m",
        error_type="ValueError",
        error="bad",
        traceback="",
        attempts=3,
        first_failed=1.0,
        event=b"x",
        **kw,
    )


def test_a_resent_dead_letter_is_stored_once_and_a_replayed_one_counts_again(tmp_path):
    store = DeadLetterStore(str(tmp_path / "dlq.sqlite3"))
    a = store.put(**letter())
    assert store.put(**letter()) == a  # the member's resend
    assert store.list()[0]["failures"] == 1
    store.put(**letter(seq=50))  # replayed (a new seq), failed again
    assert store.list()[0]["failures"] == 2
    store.close()


def test_the_writer_waits_out_a_locked_database_and_loses_nothing(tmp_path):
    path = str(tmp_path / "dlq.sqlite3")
    writer = DeadLetterWriter(path).start()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
    try:
        for i in range(5):
            writer.submit(PendingDeadLetter(letter(seq=i + 1, event_id=f"e{i}"), reply_to=b"m"))
        time.sleep(0.5)  # (the lock is held this long on purpose)
        assert not writer.done and writer.busy_waits > 0
    finally:
        other.execute("COMMIT")
        other.close()
    wait_for(lambda: len(writer.done) == 5, 10, message="5 dead letters written")
    assert all(item.row and not item.error for item in writer.done)
    writer.stop()


# -- follow-ups (ctx.emit) ------------------------------------------------------------------------
class FakeProducer:
    """Stands in for the member's Producer: `rejected` ids are NACKed."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.rejected: set[str] = set()
        self.settles = 0

    def send(self, type_, payload, **kw) -> str:
        self.sent.append(f"f{len(self.sent)}")
        return self.sent[-1]

    def settle(self, timeout: float, take_errors: bool = True):
        self.settles += 1
        errors = [RejectedError(i, "unknown event type") for i in self.sent if i in self.rejected]
        self.rejected -= {e.event_id for e in errors}
        return True, errors


def test_a_rejected_follow_up_fails_its_cause_and_the_rest_are_acked(tmp_path):
    async def main():
        rig = await make_rig(tmp_path, retry={"attempts": 2, "backoff": ["10ms"]})
        m, producer = rig.m, FakeProducer()
        m.producer = producer
        calls = []

        def handle(ev, ctx) -> None:
            calls.append(ev.payload["n"])
            follow = ctx.emit("test.follow", {})
            if ev.payload["n"] == 1:
                producer.rejected.add(follow)

        m.handler.handle = handle
        rig.deliver(0, [event(0), event(1), event(2)])
        tasks = [asyncio.ensure_future(m._dispatcher()), asyncio.ensure_future(m._settler())]
        await rig.store_dead_letters(rounds=10)
        await asyncio.sleep(0.05)
        await rig.store_dead_letters(rounds=10)
        for t in tasks:
            t.cancel()
        letters = [x for x in m.coord.sent if type(x).__name__ == "DeadLetter"]
        assert calls == [0, 1, 1, 2]  # 1 retried once, then dead-lettered
        assert [x.error_type for x in letters] == ["RejectedError"] and "unknown event type" in letters[0].error
        assert m.scheduler.handled == 2 and m.followups.rejected == 2 and rig.streams[0].handled_upto() == 3

    run(main())


def test_a_cause_is_not_acked_before_its_follow_ups_are_settled(tmp_path):
    async def main():
        rig = await make_rig(tmp_path)
        m, producer = rig.m, FakeProducer()
        m.producer = producer
        m.handler.handle = lambda ev, ctx: ctx.emit("test.follow", {})
        rig.deliver(0, [event(0)])
        task = asyncio.ensure_future(m._dispatcher())
        await rig.settle()
        assert rig.streams[0].busy and rig.streams[0].handled_upto() == 0 and producer.settles == 0
        settler = asyncio.ensure_future(m._settler())
        await rig.settle()
        for t in (task, settler):
            t.cancel()
        assert m.scheduler.handled == 1 and rig.streams[0].handled_upto() == 1

    run(main())


# -- async handler timeouts ---------------------------------------------------------------------
def test_an_async_handler_past_handler_timeout_is_cancelled_and_follows_retry(tmp_path):
    async def main():
        rig = await make_rig(
            tmp_path, handler_async=True, handler_timeout="0.2s", retry={"attempts": 2, "backoff": ["10ms"]}
        )
        m = rig.m
        started = []

        async def handle(ev, ctx) -> None:
            started.append((ev.payload["n"], ctx.attempt))
            if ev.payload["n"] == 0:
                await asyncio.Event().wait()
            rig.handled.append((ev.payload["n"], ctx.seq, ctx.redelivered, ctx.attempt))

        m.handler.handle = handle
        rig.deliver(0, [event(0), event(1)])
        rig.deliver(1, [event(5)])
        tasks = [asyncio.ensure_future(m._dispatcher()), asyncio.ensure_future(m._ticker())]
        await wait_async(lambda: any(type(x).__name__ == "DeadLetter" for x in m.coord.sent), 5)
        await rig.store_dead_letters()
        for t in tasks:
            t.cancel()
        letter_ = [x for x in m.coord.sent if type(x).__name__ == "DeadLetter"][0]
        assert letter_.error_type == "TimeoutError" and letter_.attempts == 2
        assert started[:1] == [(0, 1)] and (0, 2) in started
        assert [h[0] for h in rig.handled] == [5, 1] and m.scheduler.timeouts == 2

    run(main())


async def wait_async(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition")
        await asyncio.sleep(0.02)

"""Unit tests (no processes) for the review findings of issue 10 fixed on the member and
launcher side (docs/failure-modes-member.md, docs/failure-modes-supervisor.md): one
test per finding, named after it."""

from __future__ import annotations

import asyncio
import time

from test_member import event, make_parts, make_rig, run
from test_misbehave import wait_async

from nexus.protocol.wire import Assign, Leave
from nexus.router.coordinator import Coordinator


class ClosableSub:
    def setsockopt(self, *args) -> None:
        pass

    def close(self, linger=None) -> None:
        pass


# -- finding 6: a member leaving at its drain deadline with a call still running -------------
def test_f6_leave_marks_partitions_still_busy_unclean():
    heads = {"g": [50, 50]}
    coord = Coordinator(3.0, heads=heads)
    g = coord.add_group("g", 2, [0, 0])
    coord.join(g, "a", b"A", now=0.0)
    coord.ack(g, "a", {0: 50, 1: 50})
    g.unclean.clear()  # everything before was handled cleanly
    heads["g"][:] = [60, 60]
    coord.join(g, "b", b"B", now=1.0)  # b waits for a's partitions
    # a leaves at its deadline: partition 0's head (seq 51) still runs, partition 1 is clean
    out = dict(coord.leave(g, "a", {0: 50, 1: 60}, now=2.0, busy=[0]))
    assert out[b"B"].grants == {0: 50, 1: 60}
    assert out[b"B"].redelivered == {0: 60}  # the rerun of 51.. is flagged


def test_f6_member_leaving_at_its_drain_deadline_names_the_busy_partitions(tmp_path):
    async def main():
        rig = await make_rig(tmp_path, handler_async=True)
        m = rig.m
        m.sub = ClosableSub()

        async def handle(ev, ctx) -> None:
            if ev.payload["n"] == 0:
                await asyncio.Event().wait()  # still running at the deadline
            rig.handled.append(ev.payload["n"])

        m.handler.handle = handle
        rig.deliver(0, [event(0)])
        rig.deliver(1, [event(1)])
        task = asyncio.ensure_future(m._dispatcher())
        await wait_async(lambda: rig.handled == [1], 5)
        m.live.stop_grace, m.live.stop_requested_at = 0.1, time.monotonic()
        await m._drain()
        task.cancel()
        leave = [x for x in m.coord.sent if isinstance(x, Leave)][0]
        assert leave.busy == [0] and leave.acks[0] == 0 and leave.acks[1] == 2
        for st in rig.streams.values():
            if st.task is not None:
                st.task.cancel()
        await asyncio.sleep(0)

    run(main())


# -- finding 11: the dead-letter writer thread survives any database error ---------------------
def test_f11_dead_letter_writer_survives_a_database_error(tmp_path):
    from test_misbehave import letter

    from nexus.router.deadletters import DeadLetterWriter, PendingDeadLetter
    from nexus.testing import wait_for

    writer = DeadLetterWriter(str(tmp_path / "dlq.sqlite3")).start()
    try:
        writer.submit(PendingDeadLetter(letter(seq=1, event_id="e1"), reply_to=b"m"))
        wait_for(lambda: len(writer.done) == 1, 10, message="first dead letter written")
        assert writer.done.popleft().row
        # rows the database refuses for good (NOT NULL): an IntegrityError killed the thread
        writer.submit(PendingDeadLetter({**letter(seq=2, event_id="e2"), "error_type": None}, reply_to=b"m"))
        writer.submit(PendingDeadLetter({**letter(seq=3, event_id="e3"), "error_type": None}, reply_to=None))
        wait_for(lambda: len(writer.done) == 2, 10, message="both failures reported")
        assert all(item.error and not item.row for item in writer.done)
        assert writer.alive() and writer.describe()["errors"] == 2
        writer.done.clear()
        writer.submit(PendingDeadLetter(letter(seq=4, event_id="e4"), reply_to=b"m"))
        wait_for(lambda: len(writer.done) == 1, 10, message="the writer still writes")
        assert writer.done[0].row and not writer.done[0].error
    finally:
        writer.stop()


# -- finding 12: max_rss below the member's own size must not make a restart loop -------------
def test_f12_member_over_max_rss_at_start_recycles_only_after_an_event_and_as_a_failure(tmp_path):
    import structlog

    from nexus.errors import ExitCode
    from nexus.member.limits import RecycleLimits

    limits = RecycleLimits(max_events=None, max_rss=2**20, log=structlog.get_logger("test"))  # below any Python process
    stop = limits.check(handled=0)
    assert not limits.recycling and not stop  # nothing handled: no recycle
    stop = limits.check(handled=1)
    assert stop and limits.recycling and limits.exit_code == ExitCode.FAILURE


def test_f12_launcher_backs_off_a_recycle_right_after_the_start(tmp_path):
    import multiprocessing
    import os

    from conftest import write_config

    from nexus import config
    from nexus.errors import ExitCode
    from nexus.supervisor.children import Child
    from nexus.supervisor.launcher import Launcher

    cfg = config.load(
        write_config(tmp_path, workers={"g": {"handler": "recorder:record", "options": {"out": str(tmp_path)}}})
    )
    launcher = Launcher(cfg, None)
    launcher.starting = False
    spawned = []
    launcher._spawn = spawned.append  # (no real member: only the decision is under test)
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(int(ExitCode.RECYCLE),))
    proc.start()
    proc.join(10)
    child = Child("g-0", "worker", "g", process=proc, state="running", spawned=time.monotonic())
    launcher._on_exit(child)
    assert spawned == [] and child.state == "backoff" and child.restart_at > time.monotonic()
    assert child.crashes == [] and child.last_exit == "recycled"  # backed off, not a crash
    child.state, child.spawned = "running", time.monotonic() - 60  # a recycle after a long life
    launcher._on_exit(child)
    assert spawned == [child] and child.last_exit == "recycled"


# -- finding 8: a black-box slot for every concurrent call ------------------------------------
def test_f8_member_box_has_a_slot_per_concurrent_call(tmp_path):
    from conftest import write_config

    from nexus import config
    from nexus.common import blackbox
    from nexus.supervisor.children import Child
    from nexus.supervisor.launcher import Launcher

    cfg = config.load(
        write_config(
            tmp_path,
            workers={"g": {"handler": "recorder:record", "concurrency": 100, "options": {"out": str(tmp_path)}}},
        )
    )
    box = Launcher(cfg, None)._new_box(Child("g-0", "worker", "g"))
    try:
        member_side = blackbox.BlackBox.open(box.path)
        slots = [member_side.begin(p, 1000 + p) for p in range(100)]
        assert len(set(slots)) == 100  # no call shares a slot
        assert sorted(f.seq for f in box.inflight()) == [1000 + p for p in range(100)]
        member_side.close()
    finally:
        box.close()


# -- finding 7: innocent events in flight with the poison are not dead-lettered -----------------
def test_f7_only_an_event_crashing_alone_is_poison(tmp_path):
    from test_misbehave import cfg_with

    from nexus.common.blackbox import InFlight
    from nexus.supervisor.crashes import CrashBook

    book = CrashBook(cfg_with(tmp_path, max_crashes=3))
    together = [InFlight(0, 0, 42), InFlight(1, 1, 43)]  # poison 42, innocent 43
    assert [book.assess("g", "g-0", i, -11, together).poison for i in range(3)] == [{}, {}, {}]
    assert book.assess("g", "g-0", 9, -11, [InFlight(0, 0, 42)]).poison == {0: [42]}  # alone: poison
    # a bound regardless, should the suspects never run alone (router down)
    other = CrashBook(cfg_with(tmp_path, max_crashes=2))
    assert [other.assess("g", "g-0", i, -11, together).poison for i in range(4)] == [{}, {}, {}, {0: [42], 1: [43]}]


def test_f7_suspects_of_a_crash_with_several_in_flight_are_granted_to_run_alone():
    heads = {"g": [100, 100]}
    coord = Coordinator(3.0, heads=heads)
    g = coord.add_group("g", 2, [10, 20])
    coord.join(g, "a", b"A", now=0.0)
    coord.join(g, "b", b"B", now=1.0)
    coord.released(g, "a", {p: g.cursors[p] for p in range(2) if g.target[p] == "b"}, now=1.5)
    a_parts = [p for p in range(2) if g.owner[p] == "a"]
    inflight = {p: [g.cursors[p] + 1, g.cursors[p] + 2] for p in a_parts}
    coord.suspect(g, inflight, {})
    out = dict(coord.exited(g, "a", 0, {}, now=2.0))
    assert out[b"B"].solo == inflight
    coord.ack(g, "b", {p: g.cursors[p] + 1 for p in a_parts})
    coord.exited(g, "b", 0, {}, now=3.0)
    out = dict(coord.join(g, "c", b"C", now=4.0))
    assert out[b"C"].solo == {p: [s[1]] for p, s in inflight.items()}  # the ones behind the cursor go
    coord.suspect(g, {a_parts[0]: [77]}, {})  # one in flight: it was alone
    assert 77 not in g.suspects.get(a_parts[0], set())


def test_f7_member_runs_a_suspect_with_no_other_call_in_flight(tmp_path):
    async def main():
        rig = make_parts(tmp_path, handler_async=True, concurrency=8)
        running, seen, overlaps = set(), [], []

        async def handle(ev, ctx) -> None:
            n = ev.payload["n"]
            if 0 in running or (n == 0 and running):
                overlaps.append((n, sorted(running)))
            running.add(n)
            seen.append(len(running))
            await asyncio.sleep(0.05)
            running.discard(n)
            rig.handled.append(n)

        rig.handler.handle = handle
        rig.deliver(1, [event(1)])
        rig.deliver(2, [event(2)])
        rig.deliver(0, [event(0)])  # seq 3: the suspect
        rig.deliver(3, [event(3)])
        change = rig.partitions.assign(Assign(group="g", partitions=list(range(4)), solo={0: [3]}))
        assert change.fetch == [] and change.released == {}  # (only the solo changed)
        await asyncio.wait_for(rig.run(), 5)
        assert len(rig.handled) == 4
        assert overlaps == []  # the suspect ran alone
        assert max(seen) > 1  # the others still run concurrently
        assert rig.scheduler.active == 0 and rig.streams[0].solo is None

    run(main())


# -- finding 15: an async handler that ignores its cancellation ends the member -----------------
def test_f15_async_handler_ignoring_cancellation_ends_the_member(tmp_path):
    class Ending:
        """Stands in for Watchdog.timed_out, whose os._exit(7) would end the test process."""

        def __init__(self) -> None:
            self.calls = []

        def timed_out(self, st, running, stopping) -> None:
            self.calls.append((st.partition, st.queue[0][0], running >= 0.2))

    async def main():
        rig = await make_rig(tmp_path, handler_async=True, handler_timeout="0.2s")
        m = rig.m
        m.watchdog = Ending()

        done = []

        async def handle(ev, ctx) -> None:
            while not done:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue  # a handler that swallows its cancellation

        m.handler.handle = handle
        seqs = rig.deliver(2, [event(0)])
        task = asyncio.ensure_future(m._dispatcher())
        try:
            await wait_async(lambda: rig.streams[2].task is not None, 5)
            st = rig.streams[2]
            st.started -= 0.3  # past handler_timeout: cancelled
            m._cancel_overdue(time.monotonic())
            assert st.timed_out and m.watchdog.calls == []
            st.started -= 5  # still running past the grace
            m._cancel_overdue(time.monotonic())
            assert m.watchdog.calls == [(2, seqs[0], True)]
        finally:
            task.cancel()
            done.append(True)  # (let it end, or the loop never closes)
            if rig.streams[2].task is not None:
                rig.streams[2].task.cancel()
            await asyncio.sleep(0.01)

    run(main())


# -- finding 14: no blocking requests in the launcher loop turn after turn ----------------------
def launcher_for(tmp_path, **group):
    from conftest import write_config

    from nexus import config
    from nexus.supervisor.launcher import Launcher

    cfg = config.load(
        write_config(
            tmp_path,
            workers={"g": {"handler": "recorder:record", "processes": 2, "options": {"out": str(tmp_path)}, **group}},
        )
    )
    launcher = Launcher(cfg, None)
    launcher.starting = False
    return launcher


def test_f14_readiness_is_probed_at_a_bounded_rate_and_skips_failed_members(tmp_path):
    from nexus.supervisor.children import Child

    launcher = launcher_for(tmp_path)
    asked = []

    def status(timeout):
        asked.append(timeout)
        return {"router": {}, "groups": {"g": {"members": [{"name": "g-0"}]}}}

    launcher.router_status = status
    launcher.children = {
        "g-0": Child("g-0", "worker", "g", state="running"),
        "g-1": Child("g-1", "worker", "g", state="backoff"),
    }
    for _ in range(10):
        launcher._log_ready()
    assert len(asked) == 1 and not launcher.ready_logged  # one probe per READY_CHECK_EVERY
    launcher.children["g-1"].state = "failed"  # given up on: never joins
    launcher.ready_check_at = 0.0
    launcher._log_ready()
    assert launcher.ready_logged and len(asked) == 2


def test_f14_a_member_exit_while_the_router_is_down_asks_nothing(tmp_path):
    from nexus.common.blackbox import InFlight
    from nexus.supervisor.crashes import CrashBook

    launcher = launcher_for(tmp_path, max_crashes=1)
    book = CrashBook(launcher.cfg)
    msg = book.assess("g", "g-0", 1, -11, [InFlight(0, 0, 42)])
    assert msg.poison == {0: [42]}
    assert book.notify(msg, tell=False) is False  # no request: nothing to wait for
    assert book.crashes[("g", 42)] == 0  # one short of the limit (1): named again next crash


# -- finding 20: a member forgets poison skips once its stream is past them ---------------------
def test_f20_skips_are_forgotten_once_acked_past(tmp_path):
    async def main():
        rig = make_parts(tmp_path)
        rig.partitions.assign(Assign(group="g", partitions=list(range(4)), skip={0: [2]}))
        rig.deliver(0, [event(1), event(2), event(3)])  # seq 2 is dead-lettered poison
        await rig.run()
        acks = rig.partitions.due_acks()
        rig.partitions.acks_sent(acks)
        assert acks[0] == 3 and rig.partitions.acked.get(0) == 3
        assert [n for n, *_ in rig.handled] == [1, 3]
        assert rig.streams[0].skip is None

    run(main())


# -- finding 17: leaks of a failed router start and of black boxes --------------------------------
def open_files_under(path) -> list[str]:
    import os

    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


def test_f17_a_router_start_that_fails_leaves_no_file_open(tmp_path):
    import pytest
    import zmq
    from conftest import write_config

    from nexus import config
    from nexus.errors import NexusError
    from nexus.router.server import Router
    from nexus.testing import free_port

    cfg = config.load(write_config(tmp_path, router={"coord": f"tcp://127.0.0.1:{free_port()}"}))
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    taken.bind(cfg.coord)  # the coord endpoint is in use
    try:
        router = Router(cfg)
        with pytest.raises(NexusError):
            router.run()
        assert open_files_under(cfg.data_dir) == []
    finally:
        taken.close(0)
        ctx.term()


def test_f17_black_boxes_are_unmapped_and_deleted_when_their_child_ends_for_good(tmp_path):
    import multiprocessing
    import os

    from nexus.supervisor.children import Child

    launcher = launcher_for(tmp_path)
    boxes = []
    for name in ("g-0", "g-1"):
        child = Child(name, "worker", "g")
        child.box = launcher._new_box(child)
        boxes.append(child.box.path)
        launcher.children[name] = child
    # g-1 scaled away (the group down to 1): its process ends
    launcher.scale["g"] = 1
    g1 = launcher.children["g-1"]
    g1.process = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    g1.process.start()
    g1.process.join(10)
    g1.retired, g1.state = True, "stopping"
    launcher._on_exit(g1)
    assert g1.box is None and not os.path.exists(boxes[1]) and os.path.exists(boxes[0])
    launcher.shutdown()  # g-0 never ran: its box goes too
    assert launcher.children["g-0"].box is None and not os.path.exists(boxes[0])
    assert open_files_under(launcher.cfg.data_dir) == []


# -- finding 22: one rule, written once ------------------------------------------------------
def test_f22_member_stats_show_the_peak_rss_max_rss_is_checked_against(tmp_path):
    async def main():
        rig = await make_rig(tmp_path, max_rss="1GiB")
        stats = rig.m.stats()
        # (getrusage's peak and /proc's current RSS count slightly differently: both shown)
        assert stats["rss_peak"] > 0 and stats["rss"] > 0

    run(main())


def test_f22_restart_needing_keys_are_one_list(tmp_path):
    import msgspec
    from conftest import write_config

    from nexus import config

    cfg = config.load(write_config(tmp_path))
    fresh = msgspec.structs.replace(cfg, contracts_untyped=["other.*"])
    assert config.needs_restart(cfg, fresh) == ["contracts_untyped"]
    assert config.needs_restart(cfg, cfg) == []

"""The NATS engine's member (nexus/jsmember/) against real nats-server nodes: members run as
subprocesses, events are published straight to the events subjects with nats-py (the test
is the other side of the protocol), a recorder handler writes what it handled."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from conftest import recorder_group, write_config
from nats.js.errors import KeyNotFoundError
from recorder import read_handled, tally

from nexus.config import load
from nexus.jetstream import names as h
from nexus.jetstream import ops
from nexus.jetstream.connect import connect
from nexus.jetstream.names import Names
from nexus.jetstream.records import OwnerRecord
from nexus.jetstream.setup import ensure
from nexus.jsmember.ownership import member_id
from nexus.protocol.events import Event, encode, new_id
from nexus.testing import wait_for

GROUP = "g"
PARTITIONS = 4
RUN_MEMBER = (
    "import sys; from nexus.config import load; from nexus.jsmember.runtime import main; "
    "main(load(sys.argv[1]), sys.argv[2], sys.argv[3])"
)


def nats_config(tmp_path: Path, urls: list[str], out: Path, replicas: int = 1, **group) -> Path:
    return write_config(
        tmp_path,
        engine="nats",
        nats={"servers": urls, "stream": "T", "shards": 8, "replicas": replicas},
        router={"heartbeat_interval": "0.3s", "heartbeat_misses": 4},
        shutdown_timeout="10s",
        workers={GROUP: recorder_group(out, partitions=PARTITIONS, **group)},
    )


class Members:
    """Member subprocesses; every one is stopped at teardown (SIGCONT first: a stopped
    process cannot act on SIGTERM)."""

    def __init__(self, path: Path, logs: Path):
        self.path, self.logs = path, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN_MEMBER, str(self.path), GROUP, name], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs[name] = proc
        return proc

    def member_id(self, name: str) -> str:
        return member_id(name, socket.gethostname(), self.procs[name].pid)

    def stop(self, name: str, timeout: float = 20.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise
        return proc.returncode

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    self.stop(name)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture
def members_of(tmp_path):
    made: list[Members] = []

    def make(path: Path) -> Members:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        made.append(Members(path, logs))
        return made[-1]

    yield make
    for m in made:
        m.close()


# -- the other side of the protocol: a raw NATS publisher and reader ---------------------------
def run(coro):
    return asyncio.run(coro)


def event(i: int, keys: int = 16, type_: str = "test.ping", payload=None) -> Event:
    return Event(type_, "t", payload if payload is not None else {"n": i}, new_id(), time.time(), key=f"k{i % keys}")


async def _publish(path: Path, events: list[Event], raw: list[tuple[str, bytes]] = ()) -> list[int]:
    cfg = load(path)
    nc = await connect(cfg, "test-publisher")
    try:
        js = nc.jetstream()
        names = await ensure(js, cfg, timeout=20)
        seqs = []
        for ev in events:
            subject = names.event_subject(names.shard_of(ev.key, ev.source))
            ack = await js.publish(subject, encode(ev), headers={h.MSG_ID: ev.id})
            seqs.append(ack.seq)
        for subject, data in raw:
            seqs.append((await js.publish(subject, data)).seq)
        return seqs
    finally:
        await nc.close()


def publish(path: Path, events: list[Event], raw: list[tuple[str, bytes]] = ()) -> list[int]:
    return run(_publish(path, events, raw))


async def _stored(path: Path, stream: str) -> list[tuple[dict, bytes]]:
    """Every message in `stream`: (headers, data)."""
    cfg = load(path)
    nc = await connect(cfg, "test-reader")
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(1, last + 1):
            msg = await js.get_msg(stream, seq)
            out.append((dict(msg.headers or {}), msg.data or b""))
        return out
    finally:
        await nc.close()


def stored(path: Path, stream: str) -> list[tuple[dict, bytes]]:
    return run(_stored(path, stream))


async def _owners(path: Path) -> dict[int, str]:
    """partition -> owning member, from the group bucket ("" = free)."""
    cfg = load(path)
    nc = await connect(cfg, "test-owners")
    try:
        js = nc.jetstream()
        kv = await js.key_value((await ensure(js, cfg, timeout=20)).bucket)
        out = {}
        for p in range(PARTITIONS):
            try:
                entry = await kv.get(Names.owner_key(GROUP, p))
            except KeyNotFoundError:
                continue
            out[p] = msgspec.msgpack.decode(entry.value, type=OwnerRecord).member
        return out
    finally:
        await nc.close()


async def _consumers(path: Path) -> set[str]:
    cfg = load(path)
    nc = await connect(cfg, "test-consumers")
    try:
        return {c.name for c in await nc.jetstream().consumers_info("T")}
    finally:
        await nc.close()


def consumers(path: Path) -> set[str]:
    return run(_consumers(path))


def owners(path: Path) -> dict[int, str]:
    return run(_owners(path))


def wait_balanced(path: Path, members: list[str], timeout: float = 30.0) -> dict[int, str]:
    """Until the partitions are spread evenly over exactly `members` (member ids)."""

    def balanced():
        now = owners(path)
        counts = [sum(1 for m in now.values() if m == member) for member in members]
        full = len(now) == PARTITIONS and set(now.values()) == set(members)
        return now if full and max(counts) - min(counts) <= 1 else None

    return wait_for(balanced, timeout, 0.1, f"partitions balanced over {members}")


# -- checks -------------------------------------------------------------------------------------
def handled_ids(out: Path) -> set[str]:
    return {row[1] for row in read_handled(str(out))}


def wait_handled(out: Path, ids: set[str], timeout: float = 30.0) -> None:
    wait_for(lambda: ids <= handled_ids(out), timeout, 0.05, f"{len(ids)} events handled")


def check_order_per_key(out: Path, events: list[Event]) -> None:
    """Within each member, a key's events were handled in stream order (a redelivered
    event may come again after later ones: only the first handlings are compared)."""
    key_of = {ev.id: ev.key for ev in events}
    seen: dict[tuple[str, str | None], int] = {}
    firsts: set[tuple[str, str]] = set()
    for member, event_id, seq, _p, _redelivered, _attempt in read_handled(str(out)):
        if (member, event_id) in firsts:
            continue
        firsts.add((member, event_id))
        k = (member, key_of.get(event_id))
        assert seq > seen.get(k, 0), f"{member}: key {k[1]} handled seq {seq} after {seen[k]}"
        seen[k] = seq


def report(label: str, sent: int, out: Path, ids: set[str]) -> tuple[int, int]:
    rows = read_handled(str(out))
    got, flagged, unflagged = tally(rows)
    per_member: dict[str, int] = {}
    for row in rows:
        per_member[row[0].split("-")[0]] = per_member.get(row[0].split("-")[0], 0) + 1
    lost = len(ids - got)
    print(
        f"{label}: sent {sent} handled {len(rows)} distinct {len(got & ids)} lost {lost} "
        f"duplicates flagged {flagged} unflagged {unflagged} per member {per_member}"
    )
    assert lost == 0, f"lost: {sorted(ids - got)[:5]}"
    return flagged, unflagged


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("handler", ["recorder:record", "recorder:record_async"])
def test_two_members_share_the_partitions(tmp_path, nats_node, members_of, handler):
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, handler=handler)
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    wait_balanced(path, [members.member_id("w0"), members.member_id("w1")])
    events = [event(i) for i in range(300)]
    publish(path, events)
    ids = {ev.id for ev in events}
    wait_handled(out, ids)
    flagged, unflagged = report(f"two members ({handler})", len(events), out, ids)
    rows = read_handled(str(out))
    assert len(rows) == len(events), "every event handled exactly once"
    by_member = {row[0] for row in rows}
    assert len(by_member) == 2, f"both members handled events: {by_member}"
    partitions_of = {m: {row[3] for row in rows if row[0] == m} for m in by_member}
    a, b = partitions_of.values()
    assert not a & b and len(a | b) == PARTITIONS, partitions_of
    check_order_per_key(out, events)
    assert members.stop("w0") == 0 and members.stop("w1") == 0


def test_a_member_joins_and_one_leaves(tmp_path, nats_node, members_of):
    """Rebalancing over clean hand-overs (release: finish the head, ack, free the record;
    take: start after the ack floor) loses nothing and handles nothing twice."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, options={"sleep": 0.01})
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    ids_of = lambda *names: [members.member_id(n) for n in names]
    wait_balanced(path, ids_of("w0", "w1"))
    events = [event(i) for i in range(200)]
    publish(path, events)
    members.start("w2")  # joins while the first batch is being handled
    wait_balanced(path, ids_of("w0", "w1", "w2"))
    print(f"handled when w2 had its partitions: {len(handled_ids(out))} of 200")
    more = [event(i) for i in range(200, 400)]
    publish(path, more)
    assert members.stop("w0") == 0  # leaves while the second batch is being handled
    wait_balanced(path, ids_of("w1", "w2"))
    last = [event(i) for i in range(400, 500)]
    publish(path, last)
    events += more + last
    ids = {ev.id for ev in events}
    wait_handled(out, ids)
    flagged, unflagged = report("join and leave", len(events), out, ids)
    rows = read_handled(str(out))
    assert len(rows) == len(events) and flagged == unflagged == 0, "clean hand-overs: each event handled once"
    assert {row[0].split("-")[0] for row in rows} == {"w0", "w1", "w2"}
    check_order_per_key(out, events)


def test_sigkill_mid_stream_redelivers_flagged(tmp_path, nats_cluster, members_of):
    """On a 3-node cluster (R3 streams and bucket): a member killed mid-stream is declared
    dead after heartbeat_interval x misses; its partitions go to the survivor, which
    handles what was not acked again, flagged ctx.redelivered."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_cluster.urls, out, replicas=3, options={"sleep": 0.004})
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    w0, w1 = members.member_id("w0"), members.member_id("w1")
    wait_balanced(path, [w0, w1], timeout=60)
    events = [event(i) for i in range(400)]
    publish(path, events)
    ids = {ev.id for ev in events}
    wait_for(lambda: sum(1 for r in read_handled(str(out)) if r[0] == w0) >= 40, 30, 0.02, "w0 handling")
    members.procs["w0"].kill()
    members.procs["w0"].wait(10)
    wait_handled(out, ids, timeout=60)
    flagged, unflagged = report("sigkill", len(events), out, ids)
    assert unflagged == 0, "every duplicate carries ctx.redelivered"
    assert set(owners(path).values()) == {w1}
    check_order_per_key(out, events)
    # one consumer per partition: the taker's new generation; the dead owner's were deleted
    generations = {c.rsplit("-g", 1)[0]: c for c in consumers(path)}
    assert len(consumers(path)) == PARTITIONS == len(generations), consumers(path)


def test_retries_then_dead_letter_in_the_dlq_stream(tmp_path, nats_node, members_of):
    out = tmp_path / "out"
    fixed = tmp_path / "never-created"
    path = nats_config(tmp_path, nats_node.urls, out, handler="recorder:poisonable", options={"fixed": str(fixed)})
    members = members_of(path)
    members.start("w0")
    wait_balanced(path, [members.member_id("w0")])
    events = [event(i, keys=4) for i in range(10)]
    poison = event(10, keys=4, payload={"poison": True})
    after = [event(i, keys=4) for i in range(11, 20)]  # the same keys: they wait behind it
    seqs = publish(path, events + [poison] + after)
    ids = {ev.id for ev in events + after}
    wait_handled(out, ids)
    dlq = wait_for(lambda: stored(path, "T_DLQ"), 20, 0.1, "the dead letter stored")
    report("dead letter", 20, out, ids)
    print(f"dead letters stored: {len(dlq)}")
    assert poison.id not in handled_ids(out)
    assert len(dlq) == 1
    headers, data = dlq[0]
    assert data == encode(poison)
    assert headers[h.H_GROUP] == GROUP
    assert headers[h.H_SEQ] == str(seqs[10])
    assert headers[h.H_ATTEMPTS] == "3"
    assert headers[h.H_ERROR].startswith("ValueError: cannot digest event")
    assert headers[h.MSG_ID] == f"{GROUP}:{seqs[10]}"
    names = Names("T", 8)
    shard = names.shard_of(poison.key, poison.source)
    assert headers[h.H_PARTITION] == str(shard % PARTITIONS)
    assert members.stop("w0") == 0
    # it was acked past: the released record starts after every event
    assert owners(path) == dict.fromkeys(range(PARTITIONS), "")


async def _owner_record(path: Path, p: int) -> OwnerRecord:
    cfg = load(path)
    nc = await connect(cfg, "test-owner")
    try:
        kv = await nc.jetstream().key_value(Names.of(cfg).bucket)
        return msgspec.msgpack.decode((await kv.get(Names.owner_key(GROUP, p))).value, type=OwnerRecord)
    finally:
        await nc.close()


async def _add_skips(path: Path, p: int, seqs: list[int]) -> None:
    cfg = load(path)
    nc = await connect(cfg, "test-admin")
    try:
        await ops.add_skips(nc.jetstream(), Names.of(cfg), GROUP, p, seqs)
    finally:
        await nc.close()


def test_the_owner_passes_over_poison_the_admin_marked(tmp_path, nats_node, members_of):
    """The ingest's admin marks seqs of a partition as dead-lettered poison (OwnerRecord.skip,
    compare-and-set) while a member owns it: the owner keeps the partition (same generation)
    and never hands those seqs to its handler; the events around them are handled."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out)
    members = members_of(path)
    members.start("w0")
    wait_balanced(path, [members.member_id("w0")])
    first = [event(i, keys=1) for i in range(5)]  # one key: one partition
    seqs = publish(path, first)
    wait_handled(out, {ev.id for ev in first})
    p = Names("T", 8).shard_of(first[0].key, first[0].source) % PARTITIONS
    before = run(_owner_record(path, p))
    last = seqs[-1]
    poison = {last + 2, last + 4}  # the 2nd and 4th of the next events
    run(_add_skips(path, p, sorted(poison)))
    after = [event(i, keys=1) for i in range(5, 15)]
    later = publish(path, after)
    assert poison <= set(later)
    kept = {ev.id for ev, seq in zip(after, later, strict=True) if seq not in poison}
    wait_handled(out, kept)
    skipped = {ev.id for ev, seq in zip(after, later, strict=True) if seq in poison}
    record = run(_owner_record(path, p))
    print(f"skip: sent {len(after)} handled {len(kept & handled_ids(out))} passed over {len(skipped)}")
    assert not skipped & handled_ids(out), "a dead-lettered poison event was handled"
    assert record.generation == before.generation and record.member == before.member
    assert sorted(record.skip) == sorted(poison)
    assert "poison_skipped" in members.log("w0")
    assert members.stop("w0") == 0
    # acked past them: the released record starts after every event
    assert run(_owner_record(path, p)).start_seq == later[-1] + 1


async def _name_owner(path: Path, p: int, member: str) -> None:
    """Rewrite partition p's owner record to name `member` (as a take that failed after
    its compare-and-set leaves it)."""
    cfg = load(path)
    nc = await connect(cfg, "test-owner")
    try:
        kv = await nc.jetstream().key_value(Names.of(cfg).bucket)
        entry = await kv.get(Names.owner_key(GROUP, p))
        old = msgspec.msgpack.decode(entry.value, type=OwnerRecord)
        new = msgspec.structs.replace(old, member=member, generation=old.generation + 1, consumer="")
        await kv.update(Names.owner_key(GROUP, p), msgspec.msgpack.encode(new), last=entry.revision)
    finally:
        await nc.close()


def test_a_record_naming_a_live_member_that_does_not_hold_it_is_freed(tmp_path, nats_node, members_of):
    """A take can fail after its compare-and-set (the cluster lost its meta leader while the
    consumer was made): the record names a live member that does not hold the partition.
    The others wait for a live owner to let go, so that member frees it and the target's
    owner takes it; nothing published to it is left unread."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out)
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    w0, w1 = members.member_id("w0"), members.member_id("w1")
    before = wait_balanced(path, [w0, w1])
    p = min(q for q, m in before.items() if m == w0)
    run(_name_owner(path, p, w1))
    # w0 lost it (its record changed); w1 does not hold it and the target keeps it w0's
    wait_for(lambda: owners(path).get(p) == w0, 30, 0.1, f"partition {p} back with w0")
    events = [event(i) for i in range(64)]
    publish(path, events)
    ids = {ev.id for ev in events}
    wait_handled(out, ids)
    report("record freed", len(events), out, ids)
    assert "partition_disowned" in members.log("w1")


def test_invalid_events_go_to_the_rejected_stream(tmp_path, nats_node, members_of):
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, subscribe=["test.*", "schedule.tick"])
    members = members_of(path)
    members.start("w0")
    wait_balanced(path, [members.member_id("w0")])
    good = [event(i) for i in range(5)]
    tick = Event("schedule.tick", "t", {"name": "a", "scheduled": 1.0, "fired": 2.0}, new_id(), time.time())
    bad_payload = Event("schedule.tick", "t", {"name": 5}, new_id(), time.time())  # breaks the contract
    other = event(99, type_="other.thing")  # not subscribed: passed over
    names = Names("T", 8)
    garbage = (names.event_subject(3), b"\xc1 not msgpack")
    seqs = publish(path, [*good, tick, bad_payload, other], raw=[garbage])
    ids = {ev.id for ev in [*good, tick]}
    rejected = wait_for(lambda: len(got := stored(path, "T_REJECTED")) >= 2 and got, 20, 0.1, "2 rejected")
    wait_handled(out, ids)
    report("rejected", len(seqs), out, ids)
    print(f"rejected stored: {len(rejected)}")
    assert handled_ids(out) == ids, "neither the bad payload, the garbage nor the unsubscribed type reached the handler"
    by_seq = {hd[h.H_SEQ]: (hd, data) for hd, data in rejected}
    assert set(by_seq) == {str(seqs[6]), str(seqs[8])}
    hd, data = by_seq[str(seqs[6])]
    assert data == encode(bad_payload) and "schedule.tick" in hd[h.H_REASON]
    assert hd[h.H_SOURCE] == f"group:{GROUP}"
    hd, data = by_seq[str(seqs[8])]
    assert data == garbage[1] and hd[h.H_REASON].startswith("not a Nexus event")
    assert members.stop("w0") == 0


def test_a_resumed_member_does_not_handle_what_another_now_owns(tmp_path, nats_node, members_of):
    """SIGSTOP past the dead-member timeout: the other member takes over; after SIGCONT the
    stopped one's own heartbeat is stale or lapsed (whichever its threads see first), so it
    drops its partitions (its queued events too) instead of handling them; its late acks
    would reach a deleted consumer anyway."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, options={"sleep": 0.01})
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    w0, w1 = members.member_id("w0"), members.member_id("w1")
    wait_balanced(path, [w0, w1])
    events = [event(i) for i in range(300)]
    publish(path, events)
    wait_for(lambda: sum(1 for r in read_handled(str(out)) if r[0] == w0) >= 20, 30, 0.02, "w0 handling")
    members.procs["w0"].send_signal(signal.SIGSTOP)
    wait_for(lambda: set(owners(path).values()) == {w1}, 30, 0.1, "w1 owns every partition")
    during = [event(i) for i in range(300, 400)]
    publish(path, during)
    ids = {ev.id for ev in events + during}
    wait_handled(out, ids, timeout=60)  # all by now: w0 is stopped
    before = len([r for r in read_handled(str(out)) if r[0] == w0])
    members.procs["w0"].send_signal(signal.SIGCONT)
    wait_balanced(path, [w0, w1])  # it comes back as a fresh member
    last = [event(i) for i in range(400, 450)]
    publish(path, last)
    ids |= {ev.id for ev in last}
    wait_handled(out, ids)
    flagged, unflagged = report("sigstop", len(ids), out, ids)
    rows = read_handled(str(out))
    w0_after = {r[1] for r in [r for r in rows if r[0] == w0][before:]}
    by_w1 = {r[1] for r in rows if r[0] == w1}
    overlap = w0_after & by_w1
    print(f"w0 handled {len(w0_after)} after SIGCONT, {len(overlap)} of them also handled by w1")
    # at most the call that was running when it stopped (it finishes on SIGCONT)
    assert len(overlap) <= 1, sorted(overlap)
    assert unflagged <= len(overlap)
    assert "fenced" in members.log("w0")
    assert not w0_after & {ev.id for ev in during}


def test_a_long_sync_call_keeps_the_lease(tmp_path, nats_node, members_of):
    """The heartbeat beats from its own thread: a sync call longer than the dead-member
    timeout (1.2 s here) does not fence the member or hand its partitions over."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, options={"sleep": 1.5})
    members = members_of(path)
    members.start("w0")
    members.start("w1")
    w0, w1 = members.member_id("w0"), members.member_id("w1")
    before = wait_balanced(path, [w0, w1])
    events = [event(i, keys=1) for i in range(2)]  # one key: one partition, both on one member
    publish(path, events)
    ids = {ev.id for ev in events}
    wait_handled(out, ids)
    report("long call", 2, out, ids)
    assert len(read_handled(str(out))) == 2
    assert owners(path) == before, "no partition changed hands"
    assert "fenced" not in members.log("w0") + members.log("w1")


def test_max_events_recycles_after_a_drain(tmp_path, nats_node, members_of):
    """max_events: the member drains (acks, releases its partitions) and exits 8 (RECYCLE)."""
    out = tmp_path / "out"
    path = nats_config(tmp_path, nats_node.urls, out, max_events=20)
    members = members_of(path)
    proc = members.start("w0")
    wait_balanced(path, [members.member_id("w0")])
    events = [event(i) for i in range(30)]
    publish(path, events)
    assert proc.wait(20) == 8
    handled = handled_ids(out)
    print(f"recycle: sent 30 handled {len(handled)} before exit")
    assert 20 <= len(handled) < 30
    assert owners(path) == dict.fromkeys(range(PARTITIONS), ""), "released on the way out"
    members.start("w1")  # goes on after what was acked: nothing twice (10 left: under max_events)
    ids = {ev.id for ev in events}
    wait_handled(out, ids)
    flagged, unflagged = report("recycle", 30, out, ids)
    assert len(read_handled(str(out))) == 30


def test_a_stuck_sync_call_ends_the_member_and_the_event_comes_again_flagged(tmp_path, nats_node, members_of):
    """handler_timeout: the watchdog ends the member (exit 7, nothing released); the next
    member takes its partitions once its lease ran out and hands the event over flagged."""
    out = tmp_path / "out"
    stuck = nats_config(tmp_path / "a", nats_node.urls, out, handler_timeout="1s", options={"sleep": 30})
    healthy = nats_config(tmp_path / "b", nats_node.urls, out)
    first = members_of(stuck)
    proc = first.start("w0")
    w0 = first.member_id("w0")
    wait_balanced(stuck, [w0])
    ev = event(1)
    publish(stuck, [ev])
    assert proc.wait(20) == 7
    assert set(owners(stuck).values()) == {w0}, "a stuck member releases nothing"
    second = members_of(healthy)
    second.start("w1")
    wait_handled(out, {ev.id})
    rows = read_handled(str(out))
    print(f"stuck call: handled {len(rows)} by {[r[0] for r in rows]} redelivered {[r[4] for r in rows]}")
    assert [(r[1], r[4]) for r in rows] == [(ev.id, 1)], "handled once more, flagged ctx.redelivered"

"""Fault tests of the nats engine on a three-node JetStream cluster (replicas 3): the
stream leader SIGKILLed or SIGSTOPped while confirmed producers send, members killed in
a storm, and two launchers (as on two hosts) sharing one group. Real nats-server nodes,
real launchers, real producers; each prints a FAULT-REPORT line (pytest -s)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import nats
import pytest
from conftest import recorder_group, write_config
from nats.js.errors import KeyNotFoundError, NoKeysError
from recorder import read_handled, tally
from test_faults import report

from nexus import Producer, config
from nexus.jetstream.localserver import NatsCluster, NatsNode
from nexus.jetstream.names import Names
from nexus.jetstream.records import member_decoder, owner_decoder
from nexus.testing import wait_for

pytestmark = pytest.mark.system

STREAM = "NEXUS"
KEYS = 64


# -- the cluster, seen from the test --------------------------------------------------------
def running(cluster: NatsCluster, stopped: Collection[str] = ()) -> list[NatsNode]:
    return [n for n in cluster.nodes if n.alive() and n.name not in stopped]


def ask(cluster: NatsCluster, fn, stopped: Collection[str] = ()):
    """Run `fn(js)` on a fresh connection to a running node; None if the cluster cannot
    answer now (no leader yet, a node going down): callers poll with wait_for."""

    async def go():
        nc = await nats.connect(
            servers=[n.url for n in running(cluster, stopped)],
            connect_timeout=1,
            allow_reconnect=False,
            max_reconnect_attempts=1,
        )
        try:
            return await fn(nc.jetstream(timeout=2))
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error, OSError):
        return None


def stream_leader(cluster: NatsCluster, stopped: Collection[str] = ()) -> NatsNode | None:
    async def leader(js):
        info = await js.stream_info(STREAM)
        return info.cluster.leader if info.cluster else None

    name = ask(cluster, leader, stopped)
    return cluster.by_name(name) if name else None


def ownership(cluster: NatsCluster, group: str, partitions: int = 16) -> tuple[dict[int, str], dict[str, int]]:
    """(partition -> owning member id, live member id -> pid) from the group's KV records."""

    async def read(js):
        kv = await js.key_value(Names(STREAM, 64).bucket)
        owners: dict[int, str] = {}
        for p in range(partitions):
            try:
                owners[p] = owner_decoder.decode((await kv.get(Names.owner_key(group, p))).value).member
            except KeyNotFoundError:
                owners[p] = ""
        try:
            keys = [k for k in await kv.keys() if k.startswith(f"m.{group}.")]
        except NoKeysError:
            keys = []
        members = {}
        for key in keys:
            try:
                record = member_decoder.decode((await kv.get(key)).value)
            except KeyNotFoundError:
                continue  # left meanwhile
            members[record.member] = record.pid
        return owners, members

    return ask(cluster, read) or ({}, {})


def cluster_config(directory: Path, cluster: NatsCluster, **overrides) -> Path:
    return write_config(directory, engine="nats", nats={"servers": cluster.urls, "replicas": 3}, **overrides)


# -- producers and what the groups handled --------------------------------------------------
class TimedSender(threading.Thread):
    """Sends `total` confirmed events (keys k0..k63) in chunks; keeps the ACKed ids in
    send order and, per chunk, (monotonic time of its first send, time of its ACK)."""

    def __init__(self, endpoint: str, total: int, source: str, chunk: int = 200, pace: float = 0.0):
        super().__init__(daemon=True)
        self.endpoint, self.total, self.source, self.chunk, self.pace = endpoint, total, source, chunk, pace
        self.sent: list[str] = []
        self.acked: list[str] = []
        self.chunks: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Producer(self.endpoint, source=self.source, ack_timeout=1.0) as producer:
                for start in range(0, self.total, self.chunk):
                    t0 = time.monotonic()
                    ids = [
                        producer.send("test.item", {"i": i}, key=f"k{i % KEYS}")
                        for i in range(start, min(start + self.chunk, self.total))
                    ]
                    self.sent += ids
                    producer.flush(120)
                    self.acked += ids
                    self.chunks.append((t0, time.monotonic()))
                    if self.pace:
                        time.sleep(self.pace)  # pacing the load, not synchronizing
        except BaseException as exc:
            self.error = exc


def next_ack_after(senders: list[TimedSender], t: float) -> float | None:
    """Seconds from `t` to the first ACK of a chunk begun after it (None: none yet)."""
    acks = [end for s in senders for begun, end in s.chunks if begun >= t]
    return round(min(acks) - t, 3) if acks else None


def handled(out: Path) -> Counter:
    return Counter(row[1] for row in read_handled(str(out)))


def wait_handled(out: Path, ids: list[str], timeout: float = 90) -> Counter:
    want = set(ids)
    wait_for(lambda: want <= set(handled(out)), timeout, 0.1, f"all {len(want)} events handled in {out.name}")
    return handled(out)


def order_violations(out: Path, senders: list[TimedSender]) -> dict[str, int]:
    """stream: events of one producer and key whose stream seqs are not in send order;
    handling: per member log (its handling order) and key, a first handling (not flagged
    redelivered) of a seq below one that member handled before."""
    sent_as = {eid: (n, i) for n, s in enumerate(senders) for i, eid in enumerate(s.sent)}
    rows = read_handled(str(out))
    seq_of = {eid: seq for _m, eid, seq, _p, _r, _a in rows}
    stream = 0
    for s in senders:
        for k in range(KEYS):
            seqs = [seq_of[e] for e in s.sent[k::KEYS] if e in seq_of]
            stream += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
    handling = 0
    last: dict[tuple[str, int], int] = {}
    for member, eid, seq, _p, redelivered, _a in rows:  # read_handled keeps each log's line order
        if eid not in sent_as or redelivered:
            continue
        key = (member, sent_as[eid][1] % KEYS)
        if seq < last.get(key, 0):
            handling += 1
        last[key] = max(seq, last.get(key, 0))
    return {"stream_order": stream, "handling_order": handling}


def group_counts(name: str, out: Path, acked: list[str]) -> dict:
    got = handled(out)
    ids, flagged, unflagged = tally(read_handled(str(out)))
    return {
        f"delivered_{name}": len(set(acked) & ids),
        f"lost_{name}": len(set(acked) - ids),
        f"dup_{name}": sum(v - 1 for v in got.values()),
        f"dup_flagged_{name}": flagged,
        f"dup_unflagged_{name}": unflagged,
    }


def two_groups(tmp_path: Path, processes: int = 2) -> tuple[Path, Path, dict]:
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    return (
        out_a,
        out_b,
        {"a": recorder_group(out_a, processes=processes), "b": recorder_group(out_b, processes=processes)},
    )


def wait_stream_leader(cluster: NatsCluster, stopped: Collection[str] = ()) -> NatsNode:
    """The stream's leader among the running nodes (a follower may still name a leader
    that was just killed or paused: wait for the election)."""

    def leader():
        node = stream_leader(cluster, stopped)
        return node if node in running(cluster, stopped) else None

    return wait_for(leader, 30, 0.1, "a stream leader among the running nodes")


def check_delivery(name: str, senders: list[TimedSender], outs: dict[str, Path], **extra) -> None:
    """Every ACKed event handled by every group, duplicates flagged, order per key; prints
    the counts first (a failure still shows them)."""
    for s in senders:
        s.join(240)
        assert not s.is_alive() and s.error is None, s.error
    acked = [e for s in senders for e in s.acked]
    for out in outs.values():
        try:
            wait_handled(out, acked, 120)
        except TimeoutError:
            pass  # the report below names what is missing
    counts: dict = {"sent": sum(s.total for s in senders), "acked": len(acked), **extra}
    orders = {}
    for group, out in outs.items():
        counts.update(group_counts(group, out, acked))
        orders[group] = order_violations(out, senders)
        counts.update({f"{k}_{group}": v for k, v in orders[group].items()})
    report(name, **counts)
    assert len(acked) == counts["sent"]
    for group in outs:
        assert counts[f"lost_{group}"] == 0, f"group {group} lost ACKed events"
        assert counts[f"dup_unflagged_{group}"] == 0, f"group {group} handled events twice without the flag"
        assert orders[group] == {"stream_order": 0, "handling_order": 0}, f"group {group}: {orders[group]}"


# -- (a) the stream leader SIGKILLed -------------------------------------------------------
def test_stream_leader_kill(tmp_path, nats_cluster, launched):
    out_a, out_b, workers = two_groups(tmp_path)
    path = cluster_config(tmp_path, nats_cluster, workers=workers)
    cfg = config.load(path)
    launched(path)
    leader = wait_stream_leader(nats_cluster)
    senders = [TimedSender(cfg.confirm, 10_000, f"s{n}", pace=0.02) for n in range(2)]
    for s in senders:
        s.start()
    wait_for(lambda: sum(len(s.acked) for s in senders) >= 4_000, 90, message="4,000 ACKed before the kill")
    acked_at_kill = sum(len(s.acked) for s in senders)
    t_kill = time.monotonic()
    leader.kill()
    new_leader = wait_stream_leader(nats_cluster)
    elected_s = round(time.monotonic() - t_kill, 3)
    wait_for(lambda: next_ack_after(senders, t_kill) is not None, 60, message="an ACK after the kill")
    check_delivery(
        "nats_stream_leader_kill",
        senders,
        {"a": out_a, "b": out_b},
        killed=leader.name,
        new_leader=new_leader.name,
        acked_at_kill=acked_at_kill,
        leader_elected_s=elected_s,
        kill_to_next_ack_s=next_ack_after(senders, t_kill),
    )
    assert new_leader is not leader


# -- (b) members SIGKILLed in a storm ---------------------------------------------------------
def test_member_kill_storm(tmp_path, nats_cluster, launched):
    out_a, out_b, workers = two_groups(tmp_path)
    path = cluster_config(tmp_path, nats_cluster, workers=workers)
    cfg = config.load(path)
    p = launched(path)
    senders = [TimedSender(cfg.confirm, 5_000, f"s{n}", chunk=100, pace=0.1) for n in range(2)]  # ~6 s
    for s in senders:
        s.start()
    rng = random.Random(1234)
    killed: set[int] = set()  # (the launcher may still list one killed a moment ago as running)
    kills: Counter = Counter()  # by process name: spread, so none reaches the launcher's crash_loop limit
    next_kill = time.monotonic() + 1.0
    while any(s.is_alive() for s in senders):
        senders[0].join(max(0.0, next_kill - time.monotonic()))
        if not any(s.is_alive() for s in senders):
            break
        procs = p.processes()
        victims = [x for x in procs if x["role"] == "worker" and x["state"] == "running" and x["pid"] not in killed]
        if victims:
            victim = min(victims, key=lambda x: (kills[x["name"]], rng.random()))
            os.kill(victim["pid"], signal.SIGKILL)
            killed.add(victim["pid"])
            kills[victim["name"]] += 1
        next_kill += 1.0
    wait_for(lambda: sum(x["restarts"] for x in p.processes()) >= len(killed), 30, 0.1, "every killed member restarted")
    restarts = sum(x["restarts"] for x in p.processes())
    check_delivery("nats_member_kill_storm", senders, {"a": out_a, "b": out_b}, kills=len(killed), restarts=restarts)
    assert len(killed) >= 3


# -- (c) the stream leader SIGSTOPped for 10 s ------------------------------------------------
def test_stream_leader_paused_10s(tmp_path, nats_cluster, launched):
    out_a, out_b, workers = two_groups(tmp_path, processes=1)
    path = cluster_config(tmp_path, nats_cluster, workers=workers)
    cfg = config.load(path)
    launched(path)
    leader = wait_stream_leader(nats_cluster)
    senders = [TimedSender(cfg.confirm, 6_000, f"s{n}", pace=0.05) for n in range(2)]
    for s in senders:
        s.start()
    wait_for(lambda: sum(len(s.acked) for s in senders) >= 2_000, 90, message="2,000 ACKed before the pause")
    t_stop = time.monotonic()
    leader.signal(signal.SIGSTOP)
    try:
        new_leader = wait_stream_leader(nats_cluster, stopped={leader.name})
        elected_s = round(time.monotonic() - t_stop, 3)
        # the pause lasts 10 s whatever happens meanwhile (the fault's length, not a sync)
        time.sleep(max(0.0, 10.0 - (time.monotonic() - t_stop)))
        acked_paused = sum(len(s.acked) for s in senders)
    finally:
        leader.signal(signal.SIGCONT)
    wait_for(lambda: next_ack_after(senders, t_stop) is not None, 60, message="an ACK after the pause began")
    check_delivery(
        "nats_stream_leader_paused",
        senders,
        {"a": out_a, "b": out_b},
        paused=leader.name,
        new_leader=new_leader.name,
        leader_elected_s=elected_s,
        stop_to_next_ack_s=next_ack_after(senders, t_stop),
        acked_while_paused=acked_paused,
    )


# -- (d) two launchers (two hosts) share one group --------------------------------------------
def test_two_launchers_share_a_group(tmp_path, nats_cluster, launched):
    outs = {h: tmp_path / f"out-{h}" for h in ("h1", "h2")}
    paths = {
        h: cluster_config(tmp_path / h, nats_cluster, workers={"shared": recorder_group(outs[h], processes=2)})
        for h in ("h1", "h2")
    }
    cfgs = {h: config.load(paths[h]) for h in paths}
    pipes = {h: launched(paths[h]) for h in paths}
    pids = {h: {x["pid"] for x in pipes[h].processes() if x["role"] == "worker"} for h in pipes}

    def settled(hosts: tuple[str, ...]):
        """{host: partitions} once every partition is owned by a member of a launcher in
        `hosts` and each of their members owns some (records of members that died with
        their launcher may linger in the bucket: they own nothing)."""
        owners, members = ownership(nats_cluster, "shared")
        wanted = {pid for h in hosts for pid in pids[h]}
        live = {m: pid for m, pid in members.items() if pid in wanted}
        if set(live.values()) != wanted or not all(owners.get(p) in live for p in range(16)):
            return None
        if len(set(owners.values())) != len(live):
            return None
        return dict(Counter(next(h for h in hosts if live[owners[p]] in pids[h]) for p in range(16)))

    split = wait_for(lambda: settled(("h1", "h2")), 60, 0.2, "4 members over two launchers owning all partitions")
    # phase 1: a producer on each host, each to its own launcher
    first = [TimedSender(cfgs[h].confirm, 2_000, f"p-{h}") for h in ("h1", "h2")]
    for s in first:
        s.start()
    for s in first:
        s.join(120)
        assert s.error is None, s.error
    acked1 = [e for s in first for e in s.acked]
    wait_for(lambda: set(acked1) <= set(handled(outs["h1"])) | set(handled(outs["h2"])), 90, 0.1, "phase 1 handled")
    by_host1 = {h: len(set(acked1) & set(handled(outs[h]))) for h in outs}
    # host 2 goes away at once (its launcher and, with it, its members)
    t_kill = time.monotonic()
    pipes["h2"].proc.kill()
    pipes["h2"].proc.wait(10)
    wait_for(lambda: settled(("h1",)), 60, 0.2, "host 1's members owning every partition")
    takeover_s = round(time.monotonic() - t_kill, 3)
    second = TimedSender(cfgs["h1"].confirm, 2_000, "p-h1-after")
    second.start()
    second.join(120)
    assert second.error is None, second.error
    after = wait_handled(outs["h1"], second.acked, 90)
    rows = read_handled(str(outs["h1"])) + read_handled(str(outs["h2"]))
    ids, flagged, unflagged = tally(rows)
    everything = acked1 + second.acked
    report(
        "nats_two_launchers",
        sent=6_000,
        acked=len(everything),
        partitions_h1_h2=f"{split.get('h1', 0)}/{split.get('h2', 0)}",
        phase1_by_host=f"{by_host1['h1']}/{by_host1['h2']}",
        takeover_s=takeover_s,
        delivered=len(set(everything) & ids),
        lost=len(set(everything) - ids),
        after_kill_on_h1=len(set(second.acked) & set(after)),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert split == {"h1": 8, "h2": 8}
    assert by_host1["h1"] > 0 and by_host1["h2"] > 0, "both hosts' members handled events"
    assert set(everything) <= ids and unflagged == 0

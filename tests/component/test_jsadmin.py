"""The nats engine's admin (nexus/jsingest/admin.py over nexus/jetstream/ops.py) against
a real nats-server: the test plays the members' side, writing their KV records,
consumers and dead letters as nexus/jsmember does, and the ingest's, publishing events."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import msgspec
import pytest
from nats.js import api
from nats.js.errors import NotFoundError

from nexus import config as config_mod
from nexus.jetstream import connect, setup
from nexus.jetstream import names as hdr
from nexus.jetstream.names import Names
from nexus.jetstream.records import GroupRecord, MemberRecord, OwnerRecord, encoder, owner_decoder
from nexus.jsingest.admin import Admin
from nexus.protocol.events import encode, new_id
from nexus.protocol.wire import (
    DlqRequest,
    Error,
    Journaled,
    MemberExited,
    MetricsRequest,
    Read,
    ReloadRequest,
    ReplayRequest,
    Reply,
    StatusRequest,
)

PARTITIONS = 4
SHARDS = 8
STATS = {"accepted": 7, "rejected": {"contract": 2}, "duplicates": 1, "engine": "nats"}


def _config(tmp_path, url: str, **extra) -> config_mod.Config:
    from conftest import write_config

    path = write_config(
        tmp_path / "cfg",
        engine="nats",
        nats={"servers": [url], "stream": "T", "shards": SHARDS},
        router={"heartbeat_interval": "0.2s", "heartbeat_misses": 3},
        workers={
            "g": {"handler": "recorder:record", "subscribe": ["test.*"], "partitions": PARTITIONS},
            "h": {"handler": "recorder:record", "subscribe": ["test.*"], "partitions": 2},
        },
        **extra,
    )
    return config_mod.load(str(path))


def _event(type_: str = "test.a", key: str | None = None, n: int = 0) -> bytes:
    return encode(
        {
            "type": type_,
            "source": "t",
            "payload": msgspec.Raw(encode({"n": n})),
            "id": new_id(),
            "time": time.time(),
            "key": key,
        }
    )


class Side:
    """The cluster as the other processes leave it: events, records, consumers."""

    def __init__(self, cfg):
        self.cfg = cfg

    async def __aenter__(self):
        self.nc = await connect.connect(self.cfg, "test")
        self.js = self.nc.jetstream(timeout=5)
        self.names = await setup.ensure(self.js, self.cfg, timeout=20)
        self.kv = await self.js.key_value(self.names.bucket)
        self.admin = Admin(self.cfg, self.nc, self.js, self.names, lambda: dict(STATS))
        return self

    async def __aexit__(self, *exc):
        if self.admin.refresher is not None:
            self.admin.refresher.cancel()
        await self.nc.close()

    async def publish(self, raw: bytes, shard: int | None = None) -> int:
        subject = self.names.event_subject(shard if shard is not None else 0)
        return (await self.js.publish(subject, raw)).seq

    async def member(self, group: str, name: str, partitions: list[int], beat: int = 1, pid: int = 0) -> MemberRecord:
        rec = MemberRecord(
            group=group,
            member=f"{name}-{socket.gethostname()}-{pid or os.getpid()}",
            name=name,
            host=socket.gethostname(),
            pid=pid or os.getpid(),
            started=time.time(),
            beat=beat,
            partitions=partitions,
            stats={"handled": 3},
            metrics={"counters": {}, "gauges": {}, "histograms": {}},
        )
        await self.kv.put(Names.member_key(group, rec.member), encoder.encode(rec))
        return rec

    async def own(self, group: str, p: int, partitions: int, member: str, start: int) -> str:
        consumer = Names.consumer(group, p, 1)
        await self.js.add_consumer(
            self.names.stream,
            api.ConsumerConfig(
                durable_name=consumer,
                filter_subjects=self.names.partition_subjects(group, p, partitions),
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=api.AckPolicy.ALL,
            ),
        )
        rec = OwnerRecord(member=member, generation=1, consumer=consumer, start_seq=start)
        await self.kv.put(Names.owner_key(group, p), encoder.encode(rec))
        return consumer

    async def ask(self, msg):
        reply = await self.admin.answer(msg)
        assert not isinstance(reply, Error), reply
        return reply.data if isinstance(reply, Reply) else reply


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_status_lag_members_owners_and_engine(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            # shard s belongs to partition s % 4 of g; 3 events on shard 1, 2 on shard 2
            for shard in (1, 1, 1, 2, 2):
                await s.publish(_event(), shard)
            await s.kv.put(Names.group_key("g"), encoder.encode(GroupRecord(start_seq=1, created=time.time())))
            m = await s.member("g", "g-0", [1, 2])
            await s.own("g", 1, PARTITIONS, m.member, 1)
            await s.own("g", 2, PARTITIONS, m.member, 5)  # consumer past the first event of shard 2
            st = await s.ask(StatusRequest())
            g = st["groups"]["g"]
            print("status g:", g)
            assert [x["name"] for x in g["members"]] == ["g-0"]
            assert g["members"][0]["handled"] == 3 and g["members"][0]["partitions"] == [1, 2]
            assert g["owners"] == [None, m.member, m.member, None]
            assert g["unassigned"] == 2
            # owned: the consumer's pending; free: events in its subjects after the group start
            assert g["partition_lag"] == [0, 3, 1, 0]
            assert g["lag"] == 4
            assert st["groups"]["h"]["lag"] == "unknown"  # no group start yet
            e = st["engine"]
            assert e["reachable"] and e["leader"] and e["messages"] == 5 and e["last_seq"] == 5
            assert e["rejected_kept"] == 0
            assert st["router"]["accepted"] == 7 and st["router"]["rejected"] == 2
            assert st["router"]["rejected_by_reason"] == {"contract": 2}
            assert st["router"]["journal"]["last_seq"] == 5

    run(go())


def test_member_without_beats_is_dead_and_member_exited_deletes_record(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            await s.member("g", "g-0", [0], pid=111)
            await s.member("g", "g-1", [1], pid=222)
            st = await s.ask(StatusRequest())
            assert {m["name"] for m in st["groups"]["g"]["members"]} == {"g-0", "g-1"}
            # g-1 beats on, g-0 does not: dead after 0.2 s x 3 by the admin's clock
            deadline = time.monotonic() + 10
            beat = 1
            while True:
                beat += 1
                await s.member("g", "g-1", [1], beat=beat, pid=222)
                await s.admin.refresh()
                names = {m["name"] for m in (await s.ask(StatusRequest()))["groups"]["g"]["members"]}
                if names == {"g-1"}:
                    break
                assert time.monotonic() < deadline, names
                await asyncio.sleep(0.05)
            # the launcher says g-1 (pid 222) exited: its record goes; a wrong pid removes nothing
            out = await s.ask(MemberExited(group="g", member="g-1", exit_code=-9, pid=999))
            assert out["removed"] == []
            out = await s.ask(MemberExited(group="g", member="g-1", exit_code=-9, pid=222))
            assert out["removed"] == [f"g-1-{socket.gethostname()}-222"]
            left = [k for k in await s.kv.keys() if k.startswith("m.g.")]
            assert left == [f"m.g.g-0-{socket.gethostname()}-111"]

    run(go())


def test_poison_named_by_member_exited_is_dead_lettered(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            seq = await s.publish(_event(n=42), 3)
            out = await s.ask(MemberExited(group="g", member="g-0", exit_code=-9, poison={3: [seq]}))
            assert out["dead_lettered"] == [seq]
            rows = (await s.ask(DlqRequest(action="list")))["dead_letters"]
            assert [(r["group"], r["seq"], r["partition"], r["error_type"]) for r in rows] == [
                ("g", seq, 3, "ProcessCrashed")
            ]
            # the partition's owners pass over it; a second exit on it stores it once
            rec = owner_decoder.decode((await s.kv.get(Names.owner_key("g", 3))).value)
            assert rec.skip == [seq]
            await s.own("g", 3, PARTITIONS, "m", 1)
            await s.ask(MemberExited(group="g", member="g-0", exit_code=-9, poison={3: [seq, 999]}))
            rec = owner_decoder.decode((await s.kv.get(Names.owner_key("g", 3))).value)
            assert rec.skip == [seq, 999] and rec.member == "m" and rec.consumer == Names.consumer("g", 3, 1)
            assert (await s.ask(DlqRequest(action="list")))["total"] == 1

    run(go())


def test_read_events_after_a_seq_by_type_glob(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            seqs = {}
            for i in range(6):
                seqs[i] = await s.publish(_event("test.a" if i % 2 else "test.b", n=i), i % SHARDS)
            # a group's replay is not for live consumers
            await s.js.publish(s.names.replay_subject("g", 0), _event("test.a", n=99))
            got = await s.ask(Read(after=0, limit=100, types=["test.a"]))
            assert isinstance(got, Journaled)
            assert got.seqs == [seqs[1], seqs[3], seqs[5]]
            assert [msgspec.msgpack.decode(e)["payload"]["n"] for e in got.events] == [1, 3, 5]
            assert got.first == 1 and got.last == 7 and got.upto == 7
            got = await s.ask(Read(after=seqs[1], limit=1))
            assert got.seqs == [seqs[2]] and got.upto == seqs[2]
            got = await s.ask(Read(after=7, limit=10))
            assert got.seqs == [] and got.upto == 7
            # more than one batched get; a byte bound still gives at least one event
            for i in range(600):
                await s.publish(_event("test.c", n=i), i % SHARDS)
            got = await s.ask(Read(after=7, limit=1000, types=["test.c"]))
            assert got.seqs == list(range(8, 608)) and got.upto == 607
            got = await s.ask(Read(after=7, limit=1000, max_bytes=1))
            assert got.seqs == [8] and got.upto == 8
            size = len(got.events[0])
            got = await s.ask(Read(after=7, limit=1000, max_bytes=10 * size))
            assert got.seqs == list(range(8, 18)) and got.upto == 17

    run(go())


async def _dead_letter(s: Side, group: str, seq: int, raw: bytes, error: str = "ValueError: bad") -> None:
    headers = {
        hdr.MSG_ID: f"{group}:{seq}",
        hdr.H_GROUP: group,
        hdr.H_PARTITION: "1",
        hdr.H_SEQ: str(seq),
        hdr.H_ERROR: error,
        hdr.H_ATTEMPTS: "3",
    }
    await s.js.publish(s.names.dlq_subject(group), raw, headers=headers)


def test_dlq_list_show_replay_purge(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            raws = [_event("test.a", key=f"k{i}", n=i) for i in range(4)]
            for i, raw in enumerate(raws):
                seq = await s.publish(raw, 1)
                await _dead_letter(s, "g" if i < 3 else "h", seq, raw)
            listed = await s.ask(DlqRequest(action="list", group="g"))
            assert [r["id"] for r in listed["dead_letters"]] == [1, 2, 3] and listed["total"] == 3
            assert (await s.ask(DlqRequest(action="list")))["total"] == 4
            assert abs(listed["dead_letters"][0]["last_failed"] - time.time()) < 60
            row = (await s.ask(DlqRequest(action="show", ids=[2])))["dead_letter"]
            assert row["error_type"] == "ValueError" and row["error"] == "bad" and row["attempts"] == 3
            assert row["event"]["payload"] == {"n": 1} and row["event"]["key"] == "k1"
            assert (await s.admin.answer(DlqRequest(action="show", ids=[99]))).data["error"].startswith("no dead")
            st = await s.ask(StatusRequest())
            assert st["groups"]["g"]["dead_letters"] == 3 and st["groups"]["h"]["dead_letters"] == 1
            # replay one: the event goes to g's replay subject of its shard, the dead letter goes
            out = await s.ask(DlqRequest(action="replay", ids=[1]))
            assert [(r["id"], r["group"]) for r in out["replayed"]] == [(1, "g")]
            msg = await s.js.get_msg(s.names.stream, seq=out["replayed"][0]["seq"])
            ev = msgspec.msgpack.decode(raws[0])
            assert msg.subject == s.names.replay_subject("g", s.names.shard_of(ev["key"], ev["source"]))
            assert msg.data == raws[0]
            assert [r["id"] for r in (await s.ask(DlqRequest(action="list")))["dead_letters"]] == [2, 3, 4]
            # by group, in pages of one
            page = await s.ask(DlqRequest(action="replay", group="g", limit=1))
            assert [r["id"] for r in page["replayed"]] == [2] and page["remaining"] == 1
            # the event fails again meanwhile: stored anew, past the run's end, not replayed by it
            await _dead_letter(s, "g", page["replayed"][0]["seq"], raws[1])
            page = await s.ask(DlqRequest(action="replay", group="g", after=page["next_after"], limit=1))
            assert [r["id"] for r in page["replayed"]] == [3] and page["remaining"] == 0
            assert [r["id"] for r in (await s.ask(DlqRequest(action="list")))["dead_letters"]] == [4, 5]
            # purge h's, then the rest
            assert (await s.ask(DlqRequest(action="purge", group="h")))["purged"] == 1
            assert (await s.ask(DlqRequest(action="purge", ids=[5])))["purged"] == 1
            assert (await s.ask(DlqRequest(action="list")))["dead_letters"] == []
            assert (await s.admin.answer(DlqRequest(action="list", group="nope"))).data["error"]

    run(go())


def test_journal_replay_resets_every_partition(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            for i in range(6):
                await s.publish(_event(n=i), i % SHARDS)
            t_mid = time.time()
            await asyncio.sleep(0.01)  # (a later timestamp on the server, not synchronization)
            late = await s.publish(_event(n=6), 1)
            m = await s.member("g", "g-0", [0, 1])
            consumer = await s.own("g", 1, PARTITIONS, m.member, 1)
            out = await s.ask(ReplayRequest(group="g", from_seq=3))
            assert out == {"group": "g", "from_seq": 3, "last_seq": late, "events": late - 2}
            for p in range(PARTITIONS):
                rec = owner_decoder.decode((await s.kv.get(Names.owner_key("g", p))).value)
                assert (rec.member, rec.consumer, rec.reset_to) == ("", "", 3), (p, rec)
            with pytest.raises(NotFoundError):
                await s.js.consumer_info(s.names.stream, consumer)
            out = await s.ask(ReplayRequest(group="g", from_time=t_mid))
            assert out["from_seq"] == late
            rec = owner_decoder.decode((await s.kv.get(Names.owner_key("g", 0))).value)
            assert rec.reset_to == late
            assert (await s.admin.answer(ReplayRequest(group="nope"))).data["error"] == "unknown group 'nope'"

    run(go())


def test_metrics_engine_gauges_and_members(nats_node, tmp_path):
    from nexus.common import metricnames as mn

    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            await s.publish(_event(), 1)
            await s.kv.put(Names.group_key("g"), encoder.encode(GroupRecord(start_seq=1, created=time.time())))
            m = await s.member("g", "g-0", [1])
            await s.own("g", 1, PARTITIONS, m.member, 1)
            out = await s.ask(MetricsRequest())
            gauges = out["router"]["gauges"]
            assert gauges[mn.NATS_LEADER] == [[{}, 1]]
            assert gauges[mn.NATS_REPLICAS_CURRENT] == [[{}, 1]]
            assert [{"group": "g", "partition": "1"}, 1] in gauges[mn.NATS_CONSUMER_LAG]
            assert [{"group": "g"}, 1] in gauges[mn.GROUP_LAG]
            assert list(out["members"]) == ["g/g-0"]
            # the HTTP port renders it with the catalogue's help text
            from nexus.http import exposition

            text = exposition.render(exposition.merge(out, None))[0].decode()
            assert "# HELP nexus_nats_stream_leader Engine nats: 1 while" in text
            assert 'nexus_nats_consumer_lag_events{group="g",partition="1"} 1.0' in text

    run(go())


def test_reload_groups_and_refusals(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            spec = msgspec.structs.replace(cfg.workers["h"], partitions=4)
            fresh = msgspec.structs.replace(cfg, workers={**cfg.workers, "k": spec})
            out = await s.ask(ReloadRequest(config=config_mod.to_bytes(fresh)))
            assert out["groups"]["added"] == ["k"] and out["needs_restart"] == []
            assert "k" in (await s.ask(StatusRequest()))["groups"]
            bad = msgspec.structs.replace(fresh, workers={**fresh.workers, "h": spec})
            out = (await s.admin.answer(ReloadRequest(config=config_mod.to_bytes(bad)))).data
            assert "cannot change workers.h.partitions 2 -> 4" in out["error"]

    run(go())


def test_status_says_unreachable_when_the_server_is_gone(nats_node, tmp_path):
    cfg = _config(tmp_path, nats_node.urls[0])

    async def go():
        async with Side(cfg) as s:
            assert (await s.ask(StatusRequest()))["engine"]["reachable"]
            nats_node.nodes[0].stop()
            await s.admin.refresh()
            st = await s.ask(StatusRequest())
            print("unreachable:", st["engine"])
            assert st["engine"]["reachable"] is False and st["engine"]["error"]
            assert st["groups"]["g"]["unassigned"] == PARTITIONS

    run(go())


def test_engine_facts_on_three_nodes_leader_kill(nats_cluster, tmp_path):
    """R3: status names the leader and two current followers; after the leader's SIGKILL a
    new leader takes over and the dead node shows as not current; metrics follow."""
    from nexus.common import metricnames as mn

    cfg = _config(tmp_path, nats_cluster.urls[0])
    cfg = msgspec.structs.replace(cfg, nats=msgspec.structs.replace(cfg.nats, servers=nats_cluster.urls, replicas=3))

    async def facts(s: Side) -> dict:
        await s.admin.refresh()
        return (await s.ask(StatusRequest()))["engine"]

    async def until(s: Side, check, what: str) -> dict:
        deadline = time.monotonic() + 30
        while True:
            e = await facts(s)
            if check(e):
                return e
            assert time.monotonic() < deadline, f"{what}: {e}"
            await asyncio.sleep(0.1)

    async def go():
        async with Side(cfg) as s:
            await s.publish(_event(), 0)
            e = await until(s, lambda e: e["leader"] and [r["current"] for r in e["replicas"]] == [True, True], "R3")
            print("before:", e)
            assert e["replicas_configured"] == 3 and e["cluster"] == "nexus"
            old = e["leader"]
            gauges = (await s.ask(MetricsRequest()))["router"]["gauges"]
            assert gauges[mn.NATS_REPLICAS_CURRENT] == [[{}, 3]] and gauges[mn.NATS_LEADER] == [[{}, 1]]
            nats_cluster.by_name(old).kill()
            e = await until(
                s,
                lambda e: (
                    e.get("reachable")
                    and e["leader"] not in (None, old)
                    and any(r["name"] == old and not r["current"] for r in e["replicas"])
                ),
                "a new leader, the old one not current",
            )
            print("after:", e)
            gauges = (await s.ask(MetricsRequest()))["router"]["gauges"]
            assert gauges[mn.NATS_REPLICAS_CURRENT] == [[{}, 2]] and gauges[mn.NATS_LEADER] == [[{}, 1]]

    run(go())

"""The CLI's requests under engine nats, end to end: `nexus status`, `journal info`,
`journal replay` and `dlq ...` as subprocesses, over the coord socket, answered by the
admin (nexus/jsingest/admin.py) from a real nats-server. The coord loop here plays the
ingest process's side (nexus/jsingest/process.py serves the same)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from nexus import config as config_mod
from nexus.jetstream import connect, setup
from nexus.jetstream import names as hdr
from nexus.jetstream.names import Names
from nexus.jetstream.records import GroupRecord, OwnerRecord, encoder, owner_decoder
from nexus.jsingest.admin import Admin
from nexus.protocol.events import encode, new_id
from nexus.protocol.wire import coord_decoder
from nexus.protocol.wire import encoder as wire_encoder


def _event(n: int) -> bytes:
    payload = msgspec.Raw(encode({"n": n}))
    return encode({"type": "test.a", "source": "t", "payload": payload, "id": new_id(), "time": time.time()})


class CoordSide:
    """A coord ROUTER whose requests the admin answers, in a thread with its own loop."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(30), self.error
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def _run(self):
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _serve(self):
        nc = await connect.connect(self.cfg, "coord-side")
        js = nc.jetstream(timeout=5)
        names = await setup.ensure(js, self.cfg, timeout=20)
        admin = Admin(self.cfg, nc, js, names, lambda: {"accepted": 3, "rejected": {}, "duplicates": 0})
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(self.cfg.coord)
        self.ready.set()
        try:
            while not self.stop.is_set():
                if not await sock.poll(100):
                    continue
                identity, frame = await sock.recv_multipart()
                reply = await admin.answer(coord_decoder.decode(frame))
                await sock.send_multipart([identity, wire_encoder.encode(reply)])
        finally:
            if admin.refresher is not None:
                admin.refresher.cancel()
            sock.close(0)
            ctx.term()
            await nc.close()


def nexus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def pipeline(nats_node, tmp_path):
    from conftest import write_config

    path = write_config(
        tmp_path / "cfg",
        engine="nats",
        nats={"servers": nats_node.urls, "stream": "C", "shards": 4},
        router={"coord": "ipc://{data_dir}/coord"},
        workers={"g": {"handler": "recorder:record", "subscribe": ["test.*"], "partitions": 2}},
    )
    (tmp_path / "cfg" / "var").mkdir(parents=True, exist_ok=True)
    cfg = config_mod.load(str(path))
    with CoordSide(cfg) as side:
        yield str(path), cfg, side


def _cluster(cfg, work):
    async def go():
        nc = await connect.connect(cfg, "test")
        js = nc.jetstream(timeout=5)
        try:
            return await work(js, Names.of(cfg))
        finally:
            await nc.close()

    return asyncio.run(go())


def test_status_journal_info_and_replay(pipeline):
    path, cfg, _ = pipeline

    async def fill(js, names):
        for i in range(5):
            await js.publish(names.event_subject(i % 4), _event(i))
        kv = await js.key_value(names.bucket)
        await kv.put(Names.group_key("g"), encoder.encode(GroupRecord(start_seq=1, created=time.time())))
        await kv.put(Names.owner_key("g", 0), encoder.encode(OwnerRecord(member="gone", generation=3)))

    _cluster(cfg, fill)
    out = nexus("status", "--json", "-c", path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["engine"]["last_seq"] == 5 and data["groups"]["g"]["lag"] == 5
    assert data["groups"]["g"]["unassigned"] == 2 and data["router"]["accepted"] == 3
    reasons = data["health"]["reasons"]
    assert "launcher not answering" in reasons and any(r.startswith("group g: 2 of 2") for r in reasons)
    text = nexus("status", "-c", path).stdout
    print(text)
    assert "ingest: accepted=3 rejected=0 (none) duplicates=0" in text
    assert "engine nats: stream C leader=" in text and "5 events" in text

    info = nexus("journal", "info", "-c", path).stdout.splitlines()
    print("\n".join(info))
    assert info[0].startswith("engine nats: stream C leader=")
    assert info[1:] == [
        "  group g: lag=5 dead_letters=0",
        "    partition 0: lag=3 owner=-",
        "    partition 1: lag=2 owner=-",
    ]

    out = nexus("journal", "replay", "--group", "g", "--from", "4", "-c", path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "group g: replaying from seq 4 (2 events)"

    async def owners(js, names):
        kv = await js.key_value(names.bucket)
        return [owner_decoder.decode((await kv.get(Names.owner_key("g", p))).value) for p in range(2)]

    recs = _cluster(cfg, owners)
    assert [(r.member, r.reset_to, r.generation) for r in recs] == [("", 4, 3), ("", 4, 0)]
    assert json.loads(nexus("status", "--json", "-c", path).stdout)["groups"]["g"]["partition_lag"] == [1, 1]
    out = nexus("journal", "replay", "--group", "nope", "--from", "1", "-c", path)
    assert out.returncode != 0 and "unknown group 'nope'" in out.stderr


def test_dlq_commands(pipeline):
    path, cfg, _ = pipeline

    async def fill(js, names):
        for i in range(3):
            seq = (await js.publish(names.event_subject(1), _event(i))).seq
            headers = {
                hdr.MSG_ID: f"g:{seq}",
                hdr.H_GROUP: "g",
                hdr.H_PARTITION: "1",
                hdr.H_SEQ: str(seq),
                hdr.H_ERROR: f"RuntimeError: planned failure {i}",
                hdr.H_ATTEMPTS: "3",
            }
            await js.publish(names.dlq_subject("g"), _event(i), headers=headers)

    _cluster(cfg, fill)
    listed = nexus("dlq", "list", "-c", path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    print(listed.stdout)
    assert len(lines) == 5 and lines[-1] == "3 dead letter(s)"
    assert "RuntimeError: planned failure 0" in lines[1]
    shown = nexus("dlq", "show", "2", "-c", path).stdout
    assert "error: RuntimeError: planned failure 1" in shown and 'payload: {"n": 1}' in shown
    out = nexus("dlq", "replay", "1", "-c", path)
    assert out.stdout.strip() == "replayed 1 dead letter(s)", out.stderr
    out = nexus("dlq", "replay", "--group", "g", "-c", path)
    assert out.stdout.strip() == "replayed 2 dead letter(s)", out.stderr
    assert nexus("dlq", "list", "-c", path).stdout.splitlines()[-1] == "0 dead letter(s)"

    async def replays(js, names):
        info = await js.stream_info(names.stream, subjects_filter=f"{names.prefix}.rp.g.*")
        return sum((info.state.subjects or {}).values())

    assert _cluster(cfg, replays) == 3
    out = nexus("dlq", "purge", "--all", "-c", path)
    assert out.stdout.strip() == "purged 0 dead letter(s)", out.stderr

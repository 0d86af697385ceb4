"""The NATS engine's ingest process (nexus/jsingest/) against real nats-server nodes:
producers with the unchanged SDK, events read back from JetStream id by id."""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time

import msgspec
import nats
import pytest
import zmq
from nats.js import api

from nexus import config
from nexus.errors import ConfigError
from nexus.jetstream.names import H_REASON, H_SOURCE, MSG_ID, Names
from nexus.jsingest.process import IngestProcess
from nexus.producer.client import Producer
from nexus.protocol.wire import Error, Join, ProducerBatch, Reply, StatusRequest, coord_decoder, encoder, reply_decoder
from nexus.testing import wait_for

STREAM = "T"
SHARDS = 8


@pytest.fixture
def ingest(config_factory):
    """Start IngestProcess(es) in threads for a cluster's URLs; stopped after (and joined)."""
    started: list[tuple[IngestProcess, threading.Thread]] = []

    def start(
        urls: list[str], replicas: int = 1, max_pending: int = 4096, shutdown_timeout: str = "20s", **router
    ) -> IngestProcess:
        path = config_factory(
            engine="nats",
            shutdown_timeout=shutdown_timeout,
            nats={"servers": urls, "stream": STREAM, "shards": SHARDS, "replicas": replicas, "dedup_window": "2m"},
            router={**_router_defaults(), **router},
        )
        proc = IngestProcess(config.load(path), max_pending=max_pending)
        thread = threading.Thread(target=proc.run, daemon=True)
        thread.start()
        started.append((proc, thread))
        wait_for(lambda: proc.ready or not thread.is_alive(), 60, message="ingest ready")
        assert proc.ready
        return proc

    yield start
    for proc, thread in started:
        proc.stop()
        thread.join(30)
        assert not thread.is_alive(), "ingest did not stop"


def _router_defaults() -> dict:
    return {
        "ingest": "ipc://{data_dir}/run/ingest",
        "confirm": "ipc://{data_dir}/run/confirm",
        "heartbeat_interval": "0.5s",
        "heartbeat_misses": 4,
    }


async def _read(urls: list[str], stream: str, subject: str) -> list:
    """Every message of `stream` on `subject` (a pull consumer from the first)."""
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        sub = await js.pull_subscribe(
            subject, stream=stream, config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, max_ack_pending=-1)
        )
        out: list = []
        while len(out) < total:
            try:
                out += await sub.fetch(min(1000, total - len(out)), timeout=5)
            except nats.errors.TimeoutError:
                break
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def read_events(urls: list[str]) -> list:
    return asyncio.run(_read(urls, STREAM, f"nexus.{STREAM}.ev.*"))


def read_rejected(urls: list[str]) -> list:
    return asyncio.run(_read(urls, f"{STREAM}_REJECTED", f"nexus.{STREAM}.rejected"))


def stream_count(urls: list[str], stream: str = STREAM) -> int:
    async def count() -> int:
        nc = await nats.connect(servers=urls, connect_timeout=2)
        try:
            return (await nc.jetstream().stream_info(stream)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def check_once(sent: list[str], msgs: list, label: str) -> collections.Counter:
    """Every sent id in the stream exactly once (event by event), nothing else there."""
    names = Names(STREAM, SHARDS)
    stored = collections.Counter()
    for m in msgs:
        ev = msgspec.msgpack.decode(m.data)
        assert m.headers[MSG_ID] == ev["id"]
        assert m.subject == names.event_subject(names.shard_of(ev.get("key"), ev["source"]))
        stored[ev["id"]] += 1
    lost = [i for i in sent if stored[i] == 0]
    dups = {i: n for i, n in stored.items() if n > 1}
    extra = set(stored) - set(sent)
    print(f"{label}: sent {len(sent)}, stored {sum(stored.values())}, lost {len(lost)}, duplicates {len(dups)}")
    assert not lost, f"lost {len(lost)}: {lost[:5]}"
    assert not dups, f"stored twice: {list(dups)[:5]}"
    assert not extra
    return stored


def test_confirmed_events_are_stored_once_each(nats_node, ingest):
    proc = ingest(nats_node.urls)
    cfg = proc.config
    with Producer(cfg.confirm, source="comp") as p:
        sent = [p.send("test.item", {"i": i}, key=f"k{i % 13}") for i in range(2000)]
        p.flush(30)
    check_once(sent, read_events(nats_node.urls), "confirm")
    stats = proc.intake_stats()
    assert stats["accepted"] == stats["stored"] == 2000
    assert stats["pending"] == 0 and stats["producers"] == 1
    accepted = stats["metrics"]["counters"]["nexus_events_accepted_total"]  # counted once stored
    assert sum(value for _labels, value in accepted) == 2000


def test_a_resent_event_id_is_stored_once(nats_node, ingest):
    proc = ingest(nats_node.urls)
    with Producer(proc.config.confirm, source="dedup") as p:
        first = p.send("test.item", {"i": 1}, id="same-id")
        again = p.send("test.item", {"i": 1}, id="same-id")  # a new producer seq, the same event
        p.flush(10)
    with Producer(proc.config.confirm, source="dedup") as p:  # another producer resends it too
        p.send("test.item", {"i": 1}, id="same-id")
        p.flush(10)
    assert first == again == "same-id"
    check_once(["same-id"], read_events(nats_node.urls), "dedup")
    stats = proc.intake_stats()
    print("dedup stats", stats["accepted"], stats["duplicates_stored"])
    assert stats["accepted"] == 3 and stats["duplicates_stored"] == 2


def _event(type_: str, payload, id_: str, source: str = "raw", **extra) -> bytes:
    return msgspec.msgpack.encode(
        {"type": type_, "source": source, "payload": payload, "id": id_, "time": 1.0, **extra}
    )


def test_invalid_events_are_nacked_kept_and_counted(nats_node, ingest):
    proc = ingest(nats_node.urls, max_event_bytes=2000)
    events = [
        _event("test.ok", {"i": 1}, "good-1"),
        _event("file.created", {"path": 5}, "bad-contract"),  # path must be a string
        _event("other.kind", {}, "bad-type"),  # neither a contract nor untyped
        _event("test.big", "x" * 5000, "bad-size"),
        msgspec.msgpack.encode({"type": 7}),  # not an event
        _event("test.ok", {"i": 2}, "good-2"),
    ]
    frame = encoder.encode(ProducerBatch(events=[msgspec.Raw(e) for e in events], producer="raw-producer", seq=1))
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.config.confirm)
        sock.send(frame)
        assert sock.poll(10_000), "no reply"
        reply = reply_decoder.decode(sock.recv())
    finally:
        ctx.destroy(linger=0)
    reasons = {n.seq: n.reason.partition(":")[0] for n in reply.nacks}
    print("reply", reply.ack, reasons)
    assert reply.ack == 6
    assert reasons == {2: "contract", 3: "unknown_type", 4: "too_large", 5: "malformed"}
    check_once(["good-1", "good-2"], read_events(nats_node.urls), "valid part")
    wait_for(lambda: stream_count(nats_node.urls, f"{STREAM}_REJECTED") == 4, 10, message="4 rejected kept")
    kept = read_rejected(nats_node.urls)
    assert [m.headers[H_REASON].partition(":")[0] for m in kept] == [
        "contract",
        "unknown_type",
        "too_large",
        "malformed",
    ]
    assert {m.headers[H_SOURCE] for m in kept} == {"raw-producer"}
    assert kept[0].data == events[1] and kept[3].data == events[4]
    assert len(kept[2].data) == 2000  # cut at max_event_bytes
    stats = proc.intake_stats()
    assert stats["rejected"] == {"contract": 1, "unknown_type": 1, "too_large": 1, "malformed": 1}
    assert stats["rejected_kept"] == stats["rejected"]
    assert [r["reason"] for r in stats["recent_rejects"]] == ["contract", "unknown_type", "too_large", "malformed"]


def test_fire_mode(nats_node, ingest):
    proc = ingest(nats_node.urls)
    with Producer(proc.config.ingest, source="fire", confirm=False) as p:
        sent = [p.send("test.fire", {"i": i}, key=f"k{i % 5}") for i in range(1000)]
        p.flush(10)
    wait_for(lambda: stream_count(nats_node.urls) == 1000, 20, message="1000 fired events stored")
    check_once(sent, read_events(nats_node.urls), "fire")


def test_any_nats_client_may_produce(nats_node, ingest):
    proc = ingest(nats_node.urls)
    names = Names(STREAM, SHARDS)

    async def requests() -> list[dict]:
        nc = await nats.connect(servers=nats_node.urls)
        try:
            out = []
            for data in (
                _event("test.req", {"n": 1}, "req-1", source="client", key="a"),
                _event("test.req", {"n": 1}, "req-1", source="client", key="a"),  # resent
                _event("other.kind", {}, "req-bad", source="client"),
                b"\xc1not msgpack",
            ):
                msg = await nc.request(names.ingest_subject, data, timeout=10)
                out.append(msgspec.msgpack.decode(msg.data))
            return out
        finally:
            await nc.close()

    ok, resent, bad, garbage = asyncio.run(requests())
    print("replies", ok, resent, bad, garbage)
    assert ok["ok"] and ok["seq"] >= 1 and ok["error"] == ""
    assert resent == ok  # stored once: the PubAck names the first copy's seq
    assert not bad["ok"] and bad["error"].startswith("unknown_type:")
    assert not garbage["ok"] and garbage["error"].startswith("malformed:")
    check_once(["req-1"], read_events(nats_node.urls), "nats requests")
    wait_for(lambda: stream_count(nats_node.urls, f"{STREAM}_REJECTED") == 2, 10, message="2 rejected kept")
    kept = read_rejected(nats_node.urls)
    assert [m.headers[H_SOURCE] for m in kept] == ["nats", "nats"]
    assert proc.intake_stats()["nats_requests"] == 4


def test_back_pressure_loses_nothing_while_the_stream_stalls(nats_node, ingest):
    """The only node is stopped (SIGSTOP) while a producer sends: the ingest's publishes
    pile up to max_pending, then it stops reading; once the node runs again every
    event is stored once (the PubAck timeouts resent some: same msg id)."""
    import signal

    max_pending = 200
    proc = ingest(nats_node.urls, max_pending=max_pending)
    node = nats_node.nodes[0]
    sent: list[str] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with Producer(proc.config.confirm, source="bp", ack_timeout=2.0) as p:
                for i in range(3000):
                    sent.append(p.send("test.bp", {"i": i}, key=f"k{i % 11}"))
                p.flush(60)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    node.signal(signal.SIGSTOP)
    try:
        thread = threading.Thread(target=produce)
        thread.start()
        wait_for(lambda: proc.intake_stats()["pending"] >= max_pending, 20, message="publishes piled up")
        taken = proc.intake_stats()["accepted"]
        # (the readers paused: what was taken stays put while the stream is stalled)
        wait_for(lambda: proc.store.publisher.retries > 0, 20, message="a PubAck timeout")
        assert proc.intake_stats()["accepted"] == taken
        assert proc.store.publisher.peak <= max_pending + proc.config.router.max_batch
    finally:
        node.signal(signal.SIGCONT)
    thread.join(90)
    assert not thread.is_alive() and not errors, errors
    stats = proc.intake_stats()
    print(
        f"back-pressure: taken while stalled {taken}, peak pending {proc.store.publisher.peak}, "
        f"retries {stats['publish_retries']}, duplicates flagged {stats['duplicates_stored']}"
    )
    check_once(sent, read_events(nats_node.urls), "back-pressure")


def test_stream_leader_killed_while_a_confirmed_producer_sends(nats_cluster, ingest):
    """R3: SIGKILL the events stream's leader node mid-run; every ACKed event is stored.
    The producer sends at about 1,000 events/s (load shaping), so at the kill only a
    few are in flight and the times measured are the failover's."""
    urls = nats_cluster.urls
    proc = ingest(urls, replicas=3)
    total = 5000
    sent: list[str] = []
    errors: list[BaseException] = []
    producer_box: list[Producer] = []

    def produce() -> None:
        try:
            with Producer(proc.config.confirm, source="kill", ack_timeout=3.0) as p:
                producer_box.append(p)
                for i in range(total):
                    sent.append(p.send("test.kill", {"i": i}, key=f"k{i % 17}"))
                    if i % 50 == 49:
                        time.sleep(0.05)
                p.flush(90)
        except BaseException as exc:
            errors.append(exc)

    async def leader() -> str:
        nc = await nats.connect(servers=urls)
        try:
            return (await nc.jetstream().stream_info(STREAM)).cluster.leader
        finally:
            await nc.close()

    name = asyncio.run(leader())
    thread = threading.Thread(target=produce)
    thread.start()
    p = wait_for(lambda: producer_box and producer_box[0], 10, message="producer")
    wait_for(lambda: p._outbox.settled >= 1500, 30, message="1500 acked before the kill")
    acked_before, sent_before = p._outbox.settled, len(sent)
    killed = time.monotonic()
    nats_cluster.by_name(name).kill()
    wait_for(lambda: p._outbox.settled > acked_before, 60, message="an ACK after the kill")
    to_next_ack = time.monotonic() - killed
    # an event sent after the kill acked: the ingest publishes to the new leader
    wait_for(lambda: p._outbox.settled > sent_before, 60, message="events sent after the kill acked")
    to_new_acks = time.monotonic() - killed
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    live = [n.url for n in nats_cluster.nodes if n.alive()]
    stats = proc.intake_stats()
    print(
        f"leader {name} killed after {acked_before} acked ({sent_before} sent); next ACK {to_next_ack:.2f}s "
        f"after the kill, first ACK of an event sent after it {to_new_acks:.2f}s; publish retries "
        f"{stats['publish_retries']}, duplicates flagged {stats['duplicates_stored']}, "
        f"producer resends {p.stats['resent']}"
    )
    check_once(sent, read_events(live), "leader kill")
    assert asyncio.run(leader()) != name


def _coord_request(endpoint: str, msg) -> object:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(encoder.encode(msg))
        assert sock.poll(10_000), f"no answer to {type(msg).__name__}"
        return coord_decoder.decode(sock.recv())
    finally:
        ctx.destroy(linger=0)


def test_coord_answers_admin_requests_and_turns_members_away(nats_node, ingest):
    proc = ingest(nats_node.urls)
    status = _coord_request(proc.config.coord, StatusRequest())
    # answered by nexus.jsingest.admin (its body belongs to the ops side): not refused here
    assert isinstance(status, (Reply, Error)), status
    assert not (isinstance(status, Error) and status.code in ("wrong_engine", "bad_message", "internal", "recovering"))
    joined = _coord_request(proc.config.coord, Join(group="g", member="m"))
    assert isinstance(joined, Error) and joined.code == "wrong_engine", joined
    stats = proc.intake_stats()
    assert stats["engine"] == "nats" and stats["ready"]
    for key in ("accepted", "rejected", "duplicates", "publish_retries", "pending", "producers", "rate_limited"):
        assert key in stats


def test_an_ingest_restart_loses_nothing_and_stores_resends_once(nats_node, ingest):
    """The node stalls (SIGSTOP) while a confirmed producer sends; the ingest is stopped
    then, its publishes in flight given up after shutdown_timeout (never ACKed). A new
    ingest takes over the endpoints and the node runs again: the producer resends what
    was not ACKed, the new ingest (no producer state) accepts it, and JetStream drops the
    copies the old one's publishes had stored, by event id."""
    import signal

    first = ingest(nats_node.urls, shutdown_timeout="1s")
    node = nats_node.nodes[0]
    sent: list[str] = []
    errors: list[BaseException] = []
    box: list[Producer] = []

    def produce() -> None:
        try:
            with Producer(first.config.confirm, source="restart", ack_timeout=1.0) as p:
                box.append(p)
                for i in range(3000):
                    sent.append(p.send("test.restart", {"i": i}, key=f"k{i % 7}"))
                    if i % 100 == 99:
                        time.sleep(0.02)  # (load shaping: the restart lands mid-run)
                p.flush(60)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        wait_for(lambda: first.intake_stats()["stored"] >= 500, 20, message="500 stored")
        node.signal(signal.SIGSTOP)
        wait_for(lambda: first.intake_stats()["pending"] >= 50, 20, message="publishes in flight")
        first.stop()
        wait_for(lambda: first.stopped, 20, message="first ingest stopped")
    finally:
        node.signal(signal.SIGCONT)
    second = ingest(nats_node.urls)
    thread.join(90)
    assert not thread.is_alive() and not errors, errors
    s1, s2 = first.intake_stats(), second.intake_stats()
    print(
        f"restart: first stored {s1['stored']}, gave up {s1['dropped']}; second stored {s2['stored']}, "
        f"duplicates flagged {s2['duplicates_stored']}, producer resends {box[0].stats['resent']}"
    )
    assert s1["dropped"] >= 50
    check_once(sent, read_events(nats_node.urls), "restart")


def test_process_exits_0_on_sigterm_and_holds_the_router_lock(nats_node, config_factory):
    import signal
    import subprocess
    import sys

    path = config_factory(engine="nats", nats={"servers": nats_node.urls, "stream": STREAM, "shards": SHARDS})
    cfg = config.load(path)
    code = (
        "import sys; from nexus import config; from nexus.jsingest.process import main; main(config.load(sys.argv[1]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(cfg.confirm[len("ipc://") :]) or proc.poll() is not None, 30, message="bound")
        with Producer(cfg.confirm, source="sub") as p:
            sent = [p.send("test.sub", {"i": i}) for i in range(500)]
            p.flush(20)
        second = IngestProcess(cfg)  # the same data dir: refused, like a second router
        with pytest.raises(ConfigError, match="in use by another router"):
            second.run()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "ingest_stopped" in text
    check_once(sent, read_events(nats_node.urls), "subprocess")


def test_curve_keys_and_grants_apply_as_at_the_router(nats_node, config_factory, tmp_path):
    """tcp:// endpoints with CURVE: an authorized producer's events are stored; an event
    from a source its grant does not name is NACKed forbidden and kept."""
    import shutil

    import yaml

    from nexus.protocol.curve import ClientKeys, load_pair
    from nexus.testing import free_port

    root = tmp_path / "keys"
    authorized = root / "authorized"
    authorized.mkdir(parents=True)
    _, server_secret = zmq.auth.create_certificates(str(root), "router")
    os.chmod(server_secret, 0o600)
    _, secret = zmq.auth.create_certificates(str(root), "prod")
    os.chmod(secret, 0o600)
    (authorized / "prod.yaml").write_text(
        yaml.safe_dump({"role": "producer", "sources": ["comp*"], "types": ["test.*"]})
    )
    shutil.copy(root / "prod.key", authorized / "prod.key")
    prod = ClientKeys(load_pair(secret, "prod"), load_pair(server_secret, "server").public)
    tcp = [f"tcp://127.0.0.1:{free_port()}" for _ in range(4)]
    path = config_factory(
        engine="nats",
        nats={"servers": nats_node.urls, "stream": STREAM, "shards": SHARDS},
        router={"ingest": tcp[0], "confirm": tcp[1], "publish": tcp[2], "coord": tcp[3]},
        security={"curve": {"secret_key_file": server_secret, "authorized_keys_dir": str(authorized)}},
    )
    proc = IngestProcess(config.load(path))
    thread = threading.Thread(target=proc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: proc.ready, 30, message="ingest ready")
        with Producer(proc.config.confirm, source="comp", curve=prod) as p:
            sent = [p.send("test.item", {"i": i}) for i in range(200)]
            p.flush(20)
        with Producer(proc.config.ingest, source="comp-fire", confirm=False, curve=prod) as p:
            sent += [p.send("test.fire", {"i": i}) for i in range(100)]
            p.flush(10)
        with Producer(proc.config.confirm, source="elsewhere", curve=prod) as p:
            p.send("test.item", {"i": 0})
            settled, errors = p.settle(20)
        assert settled and len(errors) == 1 and "forbidden" in str(errors[0]), errors
        wait_for(lambda: stream_count(nats_node.urls) == 300, 20, message="300 stored")
        check_once(sent, read_events(nats_node.urls), "curve")
        wait_for(lambda: stream_count(nats_node.urls, f"{STREAM}_REJECTED") == 1, 10, message="forbidden kept")
        assert proc.intake_stats()["security"] == {"curve": True}
    finally:
        proc.stop()
        thread.join(30)
    assert not thread.is_alive()

"""Component tests: a real Router and real members in threads, real ZMQ sockets."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import msgspec
import pytest
import zmq
from conftest import recorder_group
from recorder import read_handled

from nexus import AsyncProducer, Producer, RejectedError, config
from nexus.protocol.wire import ProducerBatch, ProducerReply, StatusRequest, coord_decoder, encoder
from nexus.testing import wait_for


@pytest.fixture
def setup(tmp_path, config_factory, components):
    out = tmp_path / "out"

    def make(processes=1, **group):
        path = config_factory(workers={"rec": recorder_group(out, processes=processes, **group)})
        cfg = config.load(path)
        router = components.router(cfg)
        wait_for(lambda: os.path.exists(cfg.coord[len("ipc://") :]), 10, message="router bound")
        return cfg, router

    return make, out


def test_confirmed_events_reach_member_in_key_order(setup, components):
    make, out = setup
    cfg, router = make()
    components.member(cfg, "rec", "rec-0")
    sent = []
    with Producer(cfg.confirm, source="comp") as p:
        for i in range(2000):
            sent.append(p.send("test.item", {"i": i}, key=f"k{i % 13}"))
        p.flush(20)
    wait_for(lambda: len(read_handled(str(out))) == 2000, 20, message="2000 handled")
    rows = read_handled(str(out))
    assert [r[1] for r in sorted(rows, key=lambda r: r[2])] == sent  # journal order == send order
    assert router.intake.accepted_total == 2000


def test_fire_mode_and_async_producer(setup, components):
    make, out = setup
    cfg, router = make()
    components.member(cfg, "rec", "rec-0")
    with Producer(cfg.ingest, source="fire", confirm=False) as p:
        fired = {p.send("test.fire", {"i": i}) for i in range(300)}
        p.flush(10)

    async def send_async():
        async with AsyncProducer(cfg.confirm, source="async") as ap:
            ids = {await ap.send("test.async", {"i": i}) for i in range(300)}
            await ap.flush(10)
        return ids

    confirmed = asyncio.run(send_async())
    wait_for(lambda: len(read_handled(str(out))) == 600, 20, message="600 handled")
    assert {r[1] for r in read_handled(str(out))} == fired | confirmed


def test_nack_reason_reaches_flush(setup):
    make, _ = setup
    cfg, router = make()
    with Producer(cfg.confirm, source="nacked") as p:
        p.send("unknown.kind", {"x": 1})  # no contract, not allowed untyped
        with pytest.raises(RejectedError, match="unknown event type unknown.kind"):
            p.flush(10)
    assert router.intake.rejected["unknown_type"] == 1


def test_member_joining_late_catches_up_from_the_journal(setup, components):
    make, out = setup
    cfg, router = make()
    with Producer(cfg.confirm, source="early") as p:
        ids = [p.send("test.early", {"i": i}, key=str(i)) for i in range(5000)]
        p.flush(20)
    components.member(cfg, "rec", "rec-0")  # start: earliest, nothing seen live
    wait_for(lambda: len(read_handled(str(out))) == 5000, 30, message="catch-up of 5000")
    assert Counter(r[1] for r in read_handled(str(out))) == Counter(ids)


def test_garbage_on_every_socket_never_stops_the_router(setup, components):
    make, out = setup
    cfg, router = make()
    components.member(cfg, "rec", "rec-0")
    ctx = zmq.Context.instance()
    garbage = [
        b"",
        b"\x00",
        b"\xc1",
        b"\xff" * 100,
        encoder.encode({"events": "nope"}),
        encoder.encode(ProducerBatch([msgspec.Raw(b"\x93\x01\x02")], "p", 1)),
        encoder.encode(ProducerBatch([msgspec.Raw(encoder.encode({"type": 5}))], "p", 1)),
    ]
    push = ctx.socket(zmq.PUSH)
    push.connect(cfg.ingest)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(cfg.confirm)
    coord = ctx.socket(zmq.DEALER)
    coord.connect(cfg.coord)
    try:
        for g in garbage:
            push.send(g)
            push.send_multipart([g, b"extra"])
            dealer.send(g)
            coord.send(g)
        replies = []
        while len(replies) < len(garbage):
            assert dealer.poll(5000), "router did not answer the confirm socket"
            replies.append(msgspec.msgpack.decode(dealer.recv(), type=ProducerReply))
        assert all(r.error or r.nacks for r in replies), replies
        coord_errors = 0
        while coord_errors < len(garbage):
            assert coord.poll(5000), "router did not answer the coord socket"
            coord_decoder.decode(coord.recv())
            coord_errors += 1
        coord.send(encoder.encode(StatusRequest()))
        assert coord.poll(5000)
        status = coord_decoder.decode(coord.recv()).data
        assert status["router"]["rejected"] >= len(garbage)
    finally:
        for s in (push, dealer, coord):
            s.close(0)
    with Producer(cfg.confirm, source="after-garbage") as p:
        event_id = p.send("test.ok", {"fine": True})
    wait_for(lambda: any(r[1] == event_id for r in read_handled(str(out))), 10, message="valid event handled")


def test_handler_retries_then_succeeds(setup, components):
    make, out = setup
    cfg, router = make(options={"fail_first": 2})
    components.member(cfg, "rec", "rec-0")
    with Producer(cfg.confirm, source="retry") as p:
        event_id = p.send("test.flaky", {"n": 1})
    wait_for(lambda: read_handled(str(out)), 10, message="handled after retries")
    row = read_handled(str(out))[0]
    assert row[1] == event_id and row[5] == 3  # third attempt


def test_router_restart_keeps_cursor_and_dedups_resends(tmp_path, config_factory, components):
    out = tmp_path / "out"
    path = config_factory(workers={"rec": recorder_group(out)})
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(lambda: os.path.exists(cfg.coord[len("ipc://") :]), 10)
    _, stop_member, member_thread = components.member(cfg, "rec", "rec-0")
    with Producer(cfg.confirm, source="r1") as p:
        first = [p.send("test.a", {"i": i}) for i in range(100)]
    wait_for(lambda: len(read_handled(str(out))) == 100, 10)
    stop_member()
    member_thread.join(10)
    router.stop_event.set()
    wait_for(lambda: not any(t.is_alive() for _, t in components.stops[:1]), 10, message="router stopped")
    router2 = components.router(cfg)
    wait_for(lambda: router2.journal.last_seq == 100, 10, message="journal recovered")
    components.member(cfg, "rec", "rec-0")
    with Producer(cfg.confirm, source="r2") as p:
        second = [p.send("test.b", {"i": i}) for i in range(50)]
    wait_for(lambda: len(read_handled(str(out))) >= 150, 10)
    time_limit = time.monotonic() + 0.5
    wait_for(lambda: time.monotonic() > time_limit, 2)  # let any stray redelivery show up
    assert Counter(r[1] for r in read_handled(str(out))) == Counter(first + second)


def test_a_dlq_replay_while_the_store_is_locked_reports_success_once_journaled(setup, tmp_path):
    """Review #10: the replay journaled the events, then marking the rows hit a busy
    database and the answer was "busy; try again": a retry replayed them twice. Once
    journaled it succeeds; the rows are marked as soon as the lock is free."""
    import sqlite3

    from nexus.protocol import transport
    from nexus.protocol.events import Event, encode, new_id
    from nexus.protocol.wire import DlqRequest
    from nexus.router.deadletters import DeadLetterStore

    make, _ = setup
    cfg, _router = make()
    path = os.path.join(cfg.data_dir, "dlq.sqlite3")
    wait_for(lambda: os.path.exists(path), 10, message="dead-letter store created")
    store = DeadLetterStore(path)
    raw = encode(Event(type="test.item", source="s", payload={"n": 1}, id=new_id(), time=1.0))
    store.put(
        group="rec",
        event_id="e1",
        type="test.item",
        source="s",
        seq=1,
        partition=0,
        member="m",
        error_type="ValueError",
        error="bad",
        traceback="",
        attempts=3,
        first_failed=1.0,
        event=raw,
    )
    ctx = zmq.Context.instance()

    def replay() -> dict:
        answer = transport.request(ctx, cfg.coord, encoder.encode(DlqRequest(action="replay", group="rec")), 15)
        assert answer is not None, "no answer to the replay"
        return coord_decoder.decode(answer).data

    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
    try:
        first = replay()
    finally:
        other.execute("COMMIT")
        other.close()
    assert "error" not in first and [r["event_id"] for r in first["replayed"]] == ["e1"]
    wait_for(lambda: store.list(status="replayed"), 10, message="the row marked replayed")
    assert replay() == {"replayed": []}  # nothing left to replay: never twice
    store.close()


def test_a_dead_letter_keeps_the_journal_copy_of_the_event_not_the_members(setup):
    """A member (key) can send any bytes as a dead letter's event; `nexus dlq replay`
    journals what is stored, so the router stores its journal's copy: a member cannot
    journal an event it made up. A seq the journal does not hold is not stored."""
    from nexus.member.group import GroupClient
    from nexus.protocol import transport
    from nexus.protocol.client import CoordClient
    from nexus.protocol.events import WireEvent
    from nexus.protocol.wire import DeadLetterStored

    make, _out = setup
    cfg, router = make(processes=0)
    with Producer(cfg.confirm, source="honest") as p:
        real_id = p.send("test.real", {"n": 1})
        p.flush(10)
    forged = WireEvent(
        id="forged-1", type="test.forged", source="attacker", time=time.time(), payload=msgspec.msgpack.encode({})
    )
    client = GroupClient("rec", "mallory")
    sock = transport.connect(zmq.Context.instance(), zmq.DEALER, cfg.coord, linger_ms=0)
    try:
        stored = []
        for seq in (1, 999):  # in the journal (another event), and past its end
            sock.send(client.dead_letter(0, seq, forged, RuntimeError("boom"), 1, time.time()))
            assert sock.poll(5000), f"no answer to the dead letter for seq {seq}"
            stored.append(coord_decoder.decode(sock.recv()))
        assert all(isinstance(m, DeadLetterStored) for m in stored), stored
    finally:
        sock.close(0)
    rows = CoordClient(cfg.coord, 5).dead_letters("list")["dead_letters"]
    print(f"DLQ-FORGERY-REPORT sent 2 forged dead letters, stored {len(rows)}: {[(r['seq'], r['type']) for r in rows]}")
    assert [(r["seq"], r["event_id"], r["type"], r["source"]) for r in rows] == [(1, real_id, "test.real", "honest")]
    shown = CoordClient(cfg.coord, 5).dead_letters("show", ids=[rows[0]["id"]])["dead_letter"]
    assert shown["event"]["id"] == real_id and shown["event"]["payload"] == {"n": 1}

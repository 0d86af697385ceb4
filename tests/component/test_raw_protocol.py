"""Component test of docs/PROTOCOL.md: a producer written without the SDK.

Messages are built from plain dicts and lists with a bare msgpack encoder and sent
over plain pyzmq PUSH and DEALER sockets to a real Router running in a thread, exactly
as a producer in another language would. No nexus code builds or reads a message here.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter

import msgspec
import pytest
import zmq
from conftest import recorder_group

from nexus import config
from nexus.testing import wait_for

encode = msgspec.msgpack.encode  # stands in for any msgpack library
decode = msgspec.msgpack.decode

MAX_EVENT_BYTES = 4096
MAX_BATCH = 50


# -- the member's handler: records what was delivered, payload included -----------------
def record_payload(event, ctx) -> None:
    row = {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "key": event.key,
        "priority": event.priority,
        "payload": msgspec.to_builtins(event.payload),
        "seq": ctx.seq,
    }
    fd = os.open(os.path.join(ctx.options["out"], "payloads.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, msgspec.json.encode(row) + b"\n")
    finally:
        os.close(fd)


def delivered(out) -> list[dict]:
    path = out / "payloads.jsonl"
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


# -- a producer per docs/PROTOCOL.md ------------------------------------------------------
def uuid7() -> str:
    """RFC 9562 UUIDv7: 48-bit unix milliseconds, version 7, variant 10, random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & (2**62 - 1))
    return str(uuid.UUID(int=value))


def event(type_: str, payload, source: str = "raw", **fields) -> dict:
    return {"type": type_, "source": source, "payload": payload, "id": uuid7(), "time": time.time(), **fields}


def batch(events: list, producer: str | None = None, seq: int | None = None, floor: int | None = None) -> bytes:
    msg: dict = {"events": events}  # the events are embedded maps, not bin strings
    if producer is not None:
        msg["producer"] = producer
    if seq is not None:
        msg["seq"] = seq
    if floor is not None:
        msg["floor"] = floor
    return encode(msg)


def request(sock: zmq.Socket, frame: bytes, timeout: float = 5.0) -> dict:
    sock.send(frame)
    assert sock.poll(int(timeout * 1000), zmq.POLLIN), "no reply from the router's confirm socket"
    return decode(sock.recv())


def categories(reply: dict) -> dict[int, str]:
    return {seq: reason.split(": ", 1)[0] for seq, reason, _ in reply.get("nacks", [])}


def notification(kind: str, **extra) -> dict:
    payload = {
        "app_id": "Microsoft.Office.OUTLOOK.EXE.15",
        "app_name": "Outlook",
        "title": "Hello",
        "body": "Lunch at noon?",
        "notification_type": kind,
        "received_at": time.time(),
    }
    return {**payload, **extra}


# -- fixture --------------------------------------------------------------------------
class Pipeline:
    def __init__(self, cfg, router, out, components):
        self.cfg, self.router, self.out, self._components = cfg, router, out, components
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.cfg.confirm)
        self.sockets.append(sock)
        return sock

    def push(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.cfg.ingest)
        self.sockets.append(sock)
        return sock

    def member(self) -> None:
        self._components.member(self.cfg, "rec", "rec-0")

    def wait_delivered(self, ids, timeout: float = 15.0) -> dict[str, dict]:
        ids = set(ids)
        wait_for(lambda: ids <= {r["id"] for r in delivered(self.out)}, timeout, message=f"{len(ids)} events delivered")
        return {r["id"]: r for r in delivered(self.out) if r["id"] in ids}

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(0)
        self.ctx.term()


@pytest.fixture
def pipeline(tmp_path, config_factory, components):
    out = tmp_path / "out"
    group = recorder_group(out, subscribe=["test.*", "parrot.*"], handler="test_raw_protocol:record_payload")
    path = config_factory(
        router={
            "max_event_bytes": MAX_EVENT_BYTES,
            "max_batch": MAX_BATCH,
            "rate_limits": {"sources": {"slow": {"rate": 20, "burst": 1}}},
        },
        workers={"rec": group},
    )
    cfg = config.load(path)
    router = components.router(cfg)
    for endpoint in (cfg.ingest, cfg.confirm, cfg.coord):
        wait_for(lambda: os.path.exists(endpoint[len("ipc://") :]), 10, message=f"router bound {endpoint}")
    p = Pipeline(cfg, router, out, components)
    yield p
    p.close()
    stop_components(components, router)


def stop_components(components, router) -> None:
    """Stop the member and router threads now, then make sure the router's zmq context
    is gone: if Router.run's cleanup raises before `ctx.destroy(linger=0)`, the context is
    left to the garbage collector, whose Context.__del__ can block the test session."""
    components.close()
    sock = getattr(router, "ingest", None)
    if sock is not None and not sock.context.closed:
        sock.context.destroy(linger=0)


# -- confirm mode -------------------------------------------------------------------------
def test_confirmed_batch_is_acked_and_delivered_with_its_payload(pipeline):
    pipeline.member()
    dealer = pipeline.dealer()
    events = [
        event("test.raw", {"n": 1, "text": "héllo", "tags": ["a", "b"]}, key="k1", priority=2),
        event("test.raw", {"n": 2, "nested": {"x": 1.5, "ok": True, "none": None}}),
        event("test.other", [1, 2, 3], source="raw-2", priority=10),
    ]
    reply = request(dealer, batch(events, producer="raw-producer-1", seq=1, floor=1))
    assert reply == {"ack": 3}  # defaults (no nacks, no error) are omitted
    wait_for(lambda: pipeline.router.journal.last_seq == 3, 5, message="3 journaled")
    got = pipeline.wait_delivered(e["id"] for e in events)
    for e in events:
        row = got[e["id"]]
        assert (row["type"], row["source"], row["payload"]) == (e["type"], e["source"], e["payload"])
        assert row["key"] == e.get("key")
        assert row["priority"] == e.get("priority", 5)


def test_contract_violation_among_valid_events_is_nacked_with_seq_and_reason(pipeline):
    pipeline.member()
    dealer = pipeline.dealer()
    email = {"sender": "ana@example.com", "subject": "Q3 report", "preview": "Numbers attached"}
    good1 = event("parrot.notification", notification("message"), source="parrot", key="slack")
    bad = event("parrot.notification", notification("email"), source="parrot")  # no email_data
    good2 = event("parrot.notification", notification("email", email_data=email), source="parrot", priority=2)
    reply = request(dealer, batch([good1, bad, good2], producer="parrot-1", seq=1, floor=1))
    assert reply["ack"] == 3 and "error" not in reply
    assert len(reply["nacks"]) == 1
    seq, reason, retry_after = reply["nacks"][0]
    assert seq == 2 and retry_after == 0.0
    assert reason.startswith("contract: ") and "email_data is required" in reason
    wait_for(lambda: pipeline.router.journal.last_seq == 2, 5, message="2 journaled")
    assert pipeline.router.intake.rejected["contract"] == 1
    got = pipeline.wait_delivered([good1["id"], good2["id"]])
    for e in (good1, good2):
        payload = {k: v for k, v in got[e["id"]]["payload"].items() if v is not None}
        assert payload == e["payload"]
    assert bad["id"] not in {r["id"] for r in delivered(pipeline.out)}


def test_resent_seqs_are_acked_but_not_journaled_twice(pipeline):
    pipeline.member()
    dealer = pipeline.dealer()
    router = pipeline.router
    first = [event("test.dup", {"i": i}) for i in range(2)]
    frame = batch(first, producer="resender", seq=1, floor=1)
    assert request(dealer, frame) == {"ack": 2}
    assert router.journal.last_seq == 2
    assert request(dealer, frame) == {"ack": 2}  # a resend (same seqs): a duplicate
    assert router.journal.last_seq == 2 and router.intake.duplicates_total == 2
    # an overlapping resend: seq 2 is a duplicate, seq 3 is new
    third = event("test.dup", {"i": 2})
    assert request(dealer, batch([first[1], third], producer="resender", seq=2, floor=2)) == {"ack": 3}
    assert router.journal.last_seq == 3 and router.intake.duplicates_total == 3
    # a gap (seqs 4..9 never arrived): nothing accepted, the reply says where to resume
    late = event("test.dup", {"i": 9})
    gap = request(dealer, batch([late], producer="resender", seq=10, floor=4))
    assert gap["ack"] == 3 and categories(gap) == {10: "sequence_gap"}  # retryable: seq > ack
    assert router.journal.last_seq == 3
    # issue 10 #6: a known producer's floor never moves the router past seqs it has not
    # seen (a forged floor made it drop a producer's next events): still a gap
    gap = request(dealer, batch([late], producer="resender", seq=10, floor=10))
    assert gap["ack"] == 3 and categories(gap) == {10: "sequence_gap"}
    # the producer numbers on from ack + 1 (seqs 4..9 were settled for it by NACKs)
    assert request(dealer, batch([late], producer="resender", seq=4, floor=4)) == {"ack": 4}
    assert router.journal.last_seq == 4 and router.intake.accepted_total == 4
    ids = [e["id"] for e in first + [third, late]]
    pipeline.wait_delivered(ids)
    assert Counter(r["id"] for r in delivered(pipeline.out)) == Counter(ids)


def test_oversized_malformed_and_unknown_events_get_the_documented_nacks(pipeline):
    dealer = pipeline.dealer()
    fits = event("test.size", {"text": "x" * 1000})
    fits["payload"]["text"] = "x" * (1000 + MAX_EVENT_BYTES - len(encode(fits)))
    assert len(encode(fits)) == MAX_EVENT_BYTES  # exactly the limit is fine
    too_big = event("test.size", {"text": "x" * MAX_EVENT_BYTES})
    as_bin = encode(event("test.ok", {}))  # an encoded event as a bin string
    no_id = event("test.ok", {})
    del no_id["id"]
    events = [
        fits,  # seq 1: accepted
        too_big,  # 2: too_large
        as_bin,  # 3: malformed (not a map)
        no_id,  # 4: malformed (missing id)
        event("test.ok", {}, priority=11),  # 5: malformed (bound)
        event("test.ok", {}, time="now"),  # 6: malformed (type, no coercion)
        event("nope.kind", {}),  # 7: unknown_type
        event("Test.Upper", {}),  # 8: malformed (not dotted lowercase)
        event("parrot.notification", {"app_id": "x"}),  # 9: contract
        event("test.ok", {"fine": True}, unknown_field=1),  # 10: malformed, unknown envelope key
    ]
    reply = request(dealer, batch(events, producer="bad-input", seq=1, floor=1))
    assert reply["ack"] == 10 and "error" not in reply
    assert categories(reply) == {
        2: "too_large",
        3: "malformed",
        4: "malformed",
        5: "malformed",
        6: "malformed",
        7: "unknown_type",
        8: "malformed",
        9: "contract",
        10: "malformed",
    }
    assert all(retry_after == 0.0 for _, _, retry_after in reply["nacks"])
    reasons = {seq: reason for seq, reason, _ in reply["nacks"]}
    assert f"exceeds max_event_bytes {MAX_EVENT_BYTES}" in reasons[2]
    assert "unknown event type nope.kind" in reasons[7]
    assert pipeline.router.journal.last_seq == 1
    # resending the batch repeats the NACKs and journals nothing new
    assert categories(request(dealer, batch(events, producer="bad-input", seq=1, floor=1))) == categories(reply)
    assert pipeline.router.journal.last_seq == 1


def test_unusable_messages_get_an_error_reply_and_nothing_is_accepted(pipeline):
    dealer = pipeline.dealer()
    ok = event("test.ok", {})
    cases = [
        b"\xc1",  # not msgpack
        encode([ok]),  # not a map
        encode({"events": [ok], "producer": "e", "seq": 1, "extra": 1}),  # unknown batch key
        batch([event("test.ok", {}) for _ in range(MAX_BATCH + 1)], producer="e", seq=1),
        batch([ok], producer="p" * 129, seq=1),
    ]
    for frame in cases:
        reply = request(dealer, frame)
        assert reply.get("error") and "ack" not in reply and "nacks" not in reply, reply
    dealer.send_multipart([batch([ok], producer="e", seq=1), b"second frame"])
    assert dealer.poll(5000)
    assert decode(dealer.recv()) == {"error": "expected exactly one frame per message"}
    assert pipeline.router.journal.last_seq == 0
    # nothing was settled: the same seq is accepted afterwards
    assert request(dealer, batch([ok], producer="e", seq=1, floor=1)) == {"ack": 1}


def test_message_over_the_size_cap_gets_no_reply_and_the_connection_recovers(pipeline):
    from nexus.protocol.transport import MAX_MESSAGE_BYTES

    dealer = pipeline.dealer()
    assert request(dealer, batch([event("test.ok", {})], producer="cap", seq=1, floor=1)) == {"ack": 1}
    dealer.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert not dealer.poll(1000), "the router answered a message over MAXMSGSIZE"
    reply = request(dealer, batch([event("test.ok", {})], producer="cap", seq=2, floor=2), timeout=10)
    assert reply == {"ack": 2}


def test_rate_limited_event_is_accepted_when_resent_later_with_a_new_seq(pipeline):
    pipeline.member()
    dealer = pipeline.dealer()
    first, second = event("test.rl", {"i": 1}, source="slow"), event("test.rl", {"i": 2}, source="slow")
    reply = request(dealer, batch([first, second], producer="slow-1", seq=1, floor=1))
    assert reply["ack"] == 2
    [(seq, reason, retry_after)] = reply["nacks"]
    assert seq == 2 and reason.startswith("rate_limited: ") and 0 < retry_after <= 0.05 + 1e-9
    next_seq = [3]

    def resend() -> bool:  # the same event (same id) under a new seq, until the bucket has a token
        seq = next_seq[0]
        next_seq[0] += 1
        r = request(dealer, batch([second], producer="slow-1", seq=seq, floor=seq))
        assert r["ack"] == seq
        return not r.get("nacks")

    due = time.monotonic() + retry_after
    wait_for(lambda: time.monotonic() >= due, 5, message="retry_after elapsed")
    wait_for(resend, 5, message="rate-limited event accepted")
    got = pipeline.wait_delivered([first["id"], second["id"]])
    assert got[second["id"]]["payload"] == {"i": 2}
    assert Counter(r["id"] for r in delivered(pipeline.out))[second["id"]] == 1


# -- fire mode ----------------------------------------------------------------------------
def test_fire_mode_push_is_accepted_and_delivered(pipeline):
    pipeline.member()
    push = pipeline.push()
    router = pipeline.router
    events = [event("test.fire", {"i": i}, key=f"k{i % 3}") for i in range(20)]
    push.send(batch(events[:10]))  # no producer, no seq: fire mode
    push.send(batch(events[10:], producer="ignored", seq=77))  # producer and seq are ignored on ingest
    wait_for(lambda: router.intake.accepted_total == 20, 10, message="20 accepted")
    push.send(batch([event("nope.kind", {}), event("parrot.notification", {"app_id": "x"})]))
    push.send_multipart([batch([event("test.fire", {"i": 99})]), b"extra frame"])
    push.send(b"\xc1")
    wait_for(
        lambda: (
            router.intake.rejected["unknown_type"] == 1
            and router.intake.rejected["contract"] == 1
            and router.intake.rejected["bad_batch"] == 2
        ),
        10,
        message="fire-mode rejections counted",
    )
    assert router.intake.accepted_total == 20 and router.journal.last_seq == 20
    got = pipeline.wait_delivered(e["id"] for e in events)
    assert all(got[e["id"]]["payload"] == e["payload"] and got[e["id"]]["key"] == e["key"] for e in events)


def test_first_batch_of_unknown_producer_after_a_lost_batch_is_not_acked_past_the_gap(pipeline):
    dealer = pipeline.dealer()
    # seqs 1..4 (the producer's first batch) never reached the router; seqs 5 arrives, floor 1
    reply = request(dealer, batch([event("test.gap", {"i": 5})], producer="fresh", seq=5, floor=1))
    assert reply.get("ack", 0) < 1, f"seqs 1..4 were never journaled but the reply settles them: {reply}"

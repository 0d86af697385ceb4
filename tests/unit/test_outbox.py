"""Unit tests for nexus/producer/outbox.py: the producer's batching, window, acks, resends."""

from __future__ import annotations

import msgspec
import pytest

from nexus.errors import RejectedError
from nexus.producer.outbox import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, Outbox
from nexus.protocol.wire import Nack, ProducerReply, batch_decoder


def data(i: int, size: int = 0) -> bytes:
    """A msgpack value (the outbox embeds it verbatim in the batch)."""
    return msgspec.msgpack.encode(f"event-{i}" + "." * size)


def decode(frame: bytes):
    b = batch_decoder.decode(frame)
    return b.producer, b.seq, [bytes(e) for e in b.events]


def drain(ob: Outbox, now: float = 0.0) -> list[bytes]:
    out = []
    while (frame := ob.next_batch(now)) is not None:
        out.append(frame)
    return out


def reply(ack: int, *nacks: Nack, error: str = "") -> ProducerReply:
    return ProducerReply(ack=ack, nacks=list(nacks), error=error)


# -- batching ---------------------------------------------------------------------------
def test_nothing_pending():
    ob = Outbox("p", confirm=True, window=10, ack_timeout=1.0)
    assert ob.next_batch(0.0) is None
    assert ob.idle() and ob.in_flight() == 0


def test_batches_are_limited_by_event_count_and_numbered():
    ob = Outbox("prod", confirm=True, window=10_000, ack_timeout=1.0)
    n = 2 * MAX_BATCH_EVENTS + 500
    for i in range(n):
        ob.add(f"id{i}", data(i))
    frames = drain(ob)
    decoded = [decode(f) for f in frames]
    assert [len(ev) for _, _, ev in decoded] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 500]
    assert [seq for _, seq, _ in decoded] == [1, MAX_BATCH_EVENTS + 1, 2 * MAX_BATCH_EVENTS + 1]
    assert {p for p, _, _ in decoded} == {"prod"}
    assert [e for _, _, ev in decoded for e in ev] == [data(i) for i in range(n)]
    assert [u.pseq for u in ob.unacked] == list(range(1, n + 1))
    assert [u.event_id for u in ob.unacked][:2] == ["id0", "id1"]
    assert ob.next_pseq == n + 1
    assert ob.sent_events == n
    assert not ob.pending


def test_batches_are_limited_by_bytes():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    size = MAX_BATCH_BYTES // 3 + 1000  # three fit under the limit only barely not
    for i in range(7):
        ob.add(str(i), data(i, size))
    frames = drain(ob)
    counts = [len(decode(f)[2]) for f in frames]
    assert sum(counts) == 7
    assert len(frames) >= 3
    for f in frames:
        events = decode(f)[2]
        # the batch stops growing once it reached MAX_BATCH_BYTES
        assert sum(len(e) for e in events[:-1]) < MAX_BATCH_BYTES


def test_producer_seq_continues_across_batches():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    ob.add("a", data(1))
    ob.add("b", data(2))
    assert decode(ob.next_batch(0.0))[1] == 1
    ob.add("c", data(3))
    assert decode(ob.next_batch(0.0))[1] == 3
    ob.on_reply(reply(3), 0.0)
    ob.add("d", data(4))
    assert decode(ob.next_batch(0.0))[1] == 4


# -- acks and nacks ---------------------------------------------------------------------
def test_on_reply_acks_up_to_ack():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    for i in range(5):
        ob.add(f"e{i}", data(i))
    ob.next_batch(0.0)
    ob.on_reply(reply(3), 0.1)
    assert [u.pseq for u in ob.unacked] == [4, 5]
    assert ob.take_errors() == []
    ob.on_reply(reply(2), 0.2)  # an old reply changes nothing
    assert [u.pseq for u in ob.unacked] == [4, 5]
    ob.on_reply(reply(5), 0.3)
    assert ob.idle()


def test_nack_becomes_rejected_error():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    for i in range(3):
        ob.add(f"e{i}", data(i))
    ob.next_batch(0.0)
    ob.on_reply(reply(3, Nack(2, "contract: bad path")), 0.1)
    errors = ob.take_errors()
    assert len(errors) == 1
    err = errors[0]
    assert isinstance(err, RejectedError)
    assert err.event_id == "e1" and err.reason == "contract: bad path"
    assert "e1" in str(err)
    assert ob.take_errors() == []  # taken once
    assert ob.idle()


def test_nack_beyond_ack_is_not_applied_yet():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    for i in range(3):
        ob.add(f"e{i}", data(i))
    ob.next_batch(0.0)
    ob.on_reply(reply(1, Nack(3, "contract: x")), 0.1)
    assert ob.take_errors() == []
    assert [u.pseq for u in ob.unacked] == [2, 3]


def test_rate_limited_nack_is_retried_later_as_new_seq():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=5.0)
    for i in range(3):
        ob.add(f"e{i}", data(i))
    ob.next_batch(10.0)
    ob.on_reply(reply(3, Nack(3, "rate_limited: over", retry_after=2.0)), 10.5)
    assert ob.take_errors() == []  # not an error
    assert not ob.unacked
    assert ob.in_flight() == 1 and not ob.idle()
    assert ob.next_deadline(10.5) == pytest.approx(2.0)
    assert ob.next_batch(12.0) is None  # not yet: due at 12.5
    frame = ob.next_batch(12.5)
    assert frame is not None
    producer, seq, events = decode(frame)
    assert seq == 4 and events == [data(2)]
    assert [(u.pseq, u.event_id) for u in ob.unacked] == [(4, "e2")]
    assert ob.retry_later == []


def test_resend_after_ack_timeout_is_go_back_n_with_same_seqs():
    ob = Outbox("p", confirm=True, window=5000, ack_timeout=2.0)
    n = MAX_BATCH_EVENTS + 10
    for i in range(n):
        ob.add(f"e{i}", data(i))
    drain(ob, now=0.0)
    ob.on_reply(reply(5), 0.5)
    assert ob.resend_batches(1.9) == []
    assert ob.next_deadline(1.0) == pytest.approx(1.0)
    frames = ob.resend_batches(2.0)
    decoded = [decode(f) for f in frames]
    assert [seq for _, seq, _ in decoded] == [6, 6 + MAX_BATCH_EVENTS]
    assert [e for _, _, ev in decoded for e in ev] == [data(i) for i in range(5, n)]
    assert ob.resends == n - 5
    assert ob.next_pseq == n + 1  # resends use no new seqs
    # the timer restarts: no second resend right away
    assert ob.resend_batches(3.0) == []
    assert len(ob.resend_batches(4.0)) == 2


def test_resend_only_when_the_oldest_timed_out():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=2.0)
    ob.add("a", data(0))
    ob.next_batch(0.0)
    ob.add("b", data(1))
    ob.next_batch(1.5)
    ob.on_reply(reply(1), 1.6)
    assert ob.resend_batches(2.5) == []  # b was sent at 1.5
    assert decode(ob.resend_batches(3.5)[0])[1:] == (2, [data(1)])


def test_resend_batches_respect_the_byte_limit():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    size = MAX_BATCH_BYTES // 4
    for i in range(12):
        ob.add(str(i), data(i, size))
    first = drain(ob, now=0.0)
    assert all(len(f) <= MAX_BATCH_BYTES + size + 1024 for f in first)
    resent = ob.resend_batches(5.0)
    assert all(len(f) <= MAX_BATCH_BYTES + size + 1024 for f in resent), [len(f) for f in resent]


# -- window ------------------------------------------------------------------------------
def test_window_and_has_room():
    ob = Outbox("p", confirm=True, window=3, ack_timeout=1.0)
    ob.add("a", data(0))
    ob.add("b", data(1))
    assert ob.has_room()
    ob.add("c", data(2))
    assert not ob.has_room()  # pending counts
    ob.next_batch(0.0)
    assert not ob.has_room()  # unacked counts
    ob.on_reply(reply(1), 0.1)
    assert ob.has_room()
    ob.on_reply(reply(3, Nack(3, "rate_limited: x", retry_after=1.0)), 0.2)
    assert ob.in_flight() == 1  # waiting for its retry counts too
    ob.add("d", data(3))
    ob.add("e", data(4))
    assert not ob.has_room()


def test_idle():
    ob = Outbox("p", confirm=True, window=10, ack_timeout=1.0)
    assert ob.idle()
    ob.add("a", data(0))
    assert not ob.idle()
    ob.next_batch(0.0)
    assert not ob.idle()
    ob.on_reply(reply(1), 0.0)
    assert ob.idle()


# -- fire mode -----------------------------------------------------------------------------
def test_fire_mode_never_tracks_unacked():
    ob = Outbox("p", confirm=False, window=2, ack_timeout=1.0)
    for i in range(MAX_BATCH_EVENTS + 3):
        ob.add(str(i), data(i))
    assert not ob.has_room()  # fire mode: the window bounds pending events
    frames = drain(ob)
    assert ob.has_room()  # sent: room again
    assert [len(decode(f)[2]) for f in frames] == [MAX_BATCH_EVENTS, 3]
    assert {decode(f)[:2] for f in frames} == {("", 0)}  # no producer id, no seq
    assert not ob.unacked
    assert ob.idle()
    assert ob.next_pseq == 1
    assert ob.resend_batches(100.0) == []
    assert ob.next_deadline(0.0) == pytest.approx(0.05)


def test_a_refused_message_fails_the_unacked_events_instead_of_resending_forever():
    from nexus.producer.outbox import Outbox
    from nexus.protocol.wire import ProducerReply

    box = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    box.add("e1", b"\x80")
    box.add("e2", b"\x80")
    assert box.next_batch(0.0) is not None
    box.on_reply(ProducerReply(error="batch of 2 events exceeds max_batch 1"), 0.1)
    errors = box.take_errors()
    assert [e.event_id for e in errors] == ["e1", "e2"] and "max_batch" in errors[0].reason
    assert box.idle() and box.resend_batches(10.0) == []


# -- the in-flight count -------------------------------------------------------------------
@pytest.mark.parametrize("confirm", [True, False])
def test_in_flight_count_matches_the_queues_through_every_path(confirm):
    """in_flight() is kept as two counters (so the producer's I/O thread needs no lock); it
    must always equal pending + unacked + waiting for a retry, whatever happens."""
    import random

    rnd = random.Random(7)
    ob = Outbox("p", confirm=confirm, window=10_000, ack_timeout=1.0)
    now = 0.0
    for step in range(3000):
        op = rnd.random()
        if op < 0.45:
            for _ in range(rnd.randint(1, 30)):
                ob.add(f"e{step}", data(step))
        elif op < 0.65:
            ob.next_batch(now)
        elif op < 0.85 and ob.unacked:
            last = ob.unacked[-1].pseq
            ack = rnd.randint(ob.unacked[0].pseq - 1, last)
            nacks = [
                Nack(
                    u.pseq,
                    "rate_limited: x" if rnd.random() < 0.5 else "contract: x",
                    retry_after=rnd.choice([0.0, 0.5]),
                )
                for u in ob.unacked
                if u.pseq <= ack and rnd.random() < 0.2
            ]
            ob.on_reply(reply(ack, *nacks), now)
        elif op < 0.88 and ob.unacked:
            ob.on_reply(reply(0, error="refused"), now)
        elif op < 0.95:
            ob.resend_batches(now)
        else:
            now += rnd.choice([0.1, 0.6, 1.5])
        assert ob.in_flight() == len(ob.pending) + len(ob.unacked) + len(ob.retry_later), step
        assert ob.idle() == (ob.in_flight() == 0)
    # and it drains to zero
    for _ in range(100):
        now += 1.0
        drain(ob, now)
        if ob.unacked:
            ob.on_reply(reply(ob.unacked[-1].pseq), now)
    assert ob.idle() and ob.in_flight() == 0


# -- issue 10 #6: sequence_gap NACKs ------------------------------------------------------------
def gap(seq: int, expected: int) -> Nack:
    return Nack(seq, f"sequence_gap: expected producer seq {expected}, got {seq}")


def test_gap_after_a_lost_batch_waits_for_the_resend_with_the_same_seqs():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    for i in range(4):
        ob.add(f"e{i}", data(i))
        ob.next_batch(0.0)  # four batches of one: seqs 1..4
    ob.on_reply(reply(0, gap(2, 1)), 0.1)  # seq 1 was lost: 2 is a gap
    assert [u.pseq for u in ob.unacked] == [1, 2, 3, 4] and ob.take_errors() == []
    assert ob.renumbered == 0 and ob.resend_batches(0.5) == []  # not renumbered, not early
    assert [decode(f)[1] for f in ob.resend_batches(1.0)] == [1]  # go-back-N from seq 1


def test_gap_below_the_floor_renumbers_the_unacked_window_and_resends_at_once():
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    ob.next_pseq = 8  # seqs 1..7 settled (some by NACKs)
    for i in range(3):
        ob.add(f"e{i}", data(i))
    ob.next_batch(0.0)  # seqs 8..10, floor 8
    ob.on_reply(reply(4, gap(8, 5), gap(9, 5), gap(10, 5)), 0.1)  # the router has 1..4 only
    assert [u.pseq for u in ob.unacked] == [5, 6, 7] and ob.next_pseq == 8
    assert ob.take_errors() == [] and ob.renumbered == 1
    [frame] = ob.resend_batches(0.1)
    b = batch_decoder.decode(frame)
    assert (b.seq, b.floor, len(b.events)) == (5, 5, 3)
    # a second gap reply (to a batch sent before the renumbering) changes nothing
    ob.on_reply(reply(4, gap(11, 5)), 0.2)
    assert [u.pseq for u in ob.unacked] == [5, 6, 7] and ob.renumbered == 1
    ob.add("e3", data(3))
    assert decode(ob.next_batch(0.3))[1] == 8
    ob.on_reply(reply(8), 0.4)
    assert ob.idle()


def test_storage_unavailable_is_retried_and_named():
    """Issue 10 #3: a storage_unavailable NACK (retry_after > 0) is resent later as a new
    sequence, not failed; its reason is kept for a flush that gives up."""
    ob = Outbox("p", confirm=True, window=10, ack_timeout=5.0)
    for i in range(3):
        ob.add(f"e{i}", data(i))
    drain(ob, 0.0)
    ob.on_reply(reply(3, *(Nack(s, "storage_unavailable: No space left on device", 1.0) for s in (1, 2, 3))), 0.1)
    assert ob.take_errors() == [] and ob.in_flight() == 3
    assert ob.retry_reason.startswith("storage_unavailable")
    assert drain(ob, 0.5) == []  # not before retry_after
    frames = drain(ob, 1.2)
    assert [decode(f)[1] for f in frames] == [4]  # resent as seqs 4, 5, 6
    ob.on_reply(reply(6), 1.3)
    assert ob.idle() and ob.retry_reason == "" and ob.take_errors() == []

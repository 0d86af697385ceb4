"""Unit tests for nexus/router/intake.py: batch decoding, validation, dedup, rate limits."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nexus.contracts  # noqa: F401  (registers the built-in contracts)
from nexus.config import RateLimit, RateLimits
from nexus.producer.outbox import Outbox
from nexus.protocol.events import Contracts, Event, encode, new_id
from nexus.protocol.partitions import key_hash
from nexus.protocol.wire import Nack, ProducerBatch, ProducerReply, encoder
from nexus.router.intake import Intake
from nexus.router.journal import entry_decoder
from nexus.router.ratelimit import RateLimiter

MAX_EVENT = 2000
MAX_BATCH = 50
FILE_OK = {"path": "/tmp/x", "watcher": "w"}


def make_intake(limits: RateLimits | None = None) -> Intake:
    return Intake(Contracts(untyped=["test.*"]), RateLimiter(limits or RateLimits()), MAX_EVENT, MAX_BATCH)


def ev(type_: str = "test.thing", payload=None, source: str = "src", **kw) -> bytes:
    return encode(
        Event(
            type=type_,
            source=source,
            payload={"n": 1} if payload is None else payload,
            id=kw.pop("id", new_id()),
            time=1.0,
            **kw,
        )
    )


def batch(events: list[bytes], producer: str = "", seq: int = 0, floor: int | None = None) -> bytes:
    """By default the producer's oldest unacked event is this batch's first (`floor`)."""
    return encoder.encode(
        ProducerBatch([msgspec.Raw(e) for e in events], producer, seq, seq if floor is None else floor)
    )


def reasons(out) -> dict[int, str]:
    return {n.seq: n.reason for n in out.nacks}


# -- valid input ----------------------------------------------------------------------
def test_valid_events_become_journal_entries():
    intake = make_intake()
    events = [ev(), ev("file.created", FILE_OK, source="files", key="k1"), ev(priority=1)]
    out = intake.take(batch(events, "p1", 1), confirm=True, now=0.0)
    assert out.error == "" and out.nacks == [] and out.duplicates == 0
    assert out.ack == 3
    acc = out.accepted
    assert acc.types == ["test.thing", "file.created", "test.thing"]
    assert [bytes(e) for e in acc.events] == events
    assert acc.khashes == [key_hash("src"), key_hash("k1"), key_hash("src")]
    entries = [entry_decoder.decode(b) for b in acc.bodies]
    assert [(e.type, e.khash, e.producer, e.pseq) for e in entries] == [
        ("test.thing", key_hash("src"), "p1", 1),
        ("file.created", key_hash("k1"), "p1", 2),
        ("test.thing", key_hash("src"), "p1", 3),
    ]
    assert [bytes(e.event) for e in entries] == events
    assert all(e.time > 0 for e in entries)
    assert intake.accepted_total == 3
    assert sum(intake.rejected.values()) == 0


def test_fire_mode_has_no_producer_and_no_dedup():
    intake = make_intake()
    data = batch([ev(), ev()], "p1", 1)
    a = intake.take(data, confirm=False, now=0.0)
    b = intake.take(data, confirm=False, now=0.0)
    assert len(a.accepted.events) == 2 and len(b.accepted.events) == 2
    assert b.duplicates == 0
    assert {entry_decoder.decode(x).producer for x in a.accepted.bodies} == {""}
    assert intake.high == {}


def test_empty_batch():
    intake = make_intake()
    out = intake.take(batch([], "p1", 5), confirm=True, now=0.0)
    assert out.error == "" and out.accepted.events == [] and out.ack == 4
    assert "p1" not in intake.high


# -- unusable batches ------------------------------------------------------------------
@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"garbage bytes",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"events": "nope"}),
        msgspec.msgpack.encode({"events": [], "extra": 1}),
    ],
)
def test_garbage_is_a_bad_batch(frame):
    intake = make_intake()
    out = intake.take(frame, confirm=True, now=0.0)
    assert out.error.startswith("unreadable batch")
    assert out.accepted.events == [] and out.nacks == []
    assert intake.rejected["bad_batch"] == 1
    assert intake.reject_log[-1]["reason"] == "bad_batch"


def test_too_many_events_is_a_bad_batch():
    intake = make_intake()
    out = intake.take(batch([ev()] * (MAX_BATCH + 1), "p", 1), confirm=True, now=0.0)
    assert "exceeds max_batch" in out.error
    assert out.accepted.events == []
    assert intake.rejected["bad_batch"] == 1
    ok = intake.take(batch([ev()] * MAX_BATCH, "p", 1), confirm=True, now=0.0)
    assert ok.error == "" and len(ok.accepted.events) == MAX_BATCH


@pytest.mark.parametrize("producer,seq", [("p" * 129, 1), ("p", -1)])
def test_bad_producer_or_seq_is_a_bad_batch(producer, seq):
    intake = make_intake()
    out = intake.take(batch([ev()], producer, seq), confirm=True, now=0.0)
    assert out.error and intake.rejected["bad_batch"] == 1


# -- per-event rejections -----------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        msgspec.msgpack.encode({"x": 1}),
        msgspec.msgpack.encode(5),
        msgspec.msgpack.encode({"type": "test.x", "source": "s", "payload": 1, "id": "i", "time": "now"}),
        msgspec.msgpack.encode({"type": "test.x", "source": "", "payload": 1, "id": "i", "time": 1.0}),
        msgspec.msgpack.encode({"type": "test.x", "source": "s", "payload": 1, "id": "i", "time": 1.0, "priority": 11}),
    ],
)
def test_one_malformed_event_among_good_ones(bad):
    intake = make_intake()
    out = intake.take(batch([ev(), bad, ev()], "p", 10), confirm=True, now=0.0)
    assert list(reasons(out)) == [11]
    assert reasons(out)[11].startswith("malformed: ")
    assert out.nacks[0].retry_after == 0.0
    assert [entry_decoder.decode(b).pseq for b in out.accepted.bodies] == [10, 12]
    assert out.ack == 12
    assert intake.rejected["malformed"] == 1


def test_oversize_event_is_too_large():
    intake = make_intake()
    big = ev(payload={"blob": "x" * MAX_EVENT})
    assert len(big) > MAX_EVENT
    out = intake.take(batch([big, ev()], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[1].startswith("too_large: ")
    assert str(MAX_EVENT) in reasons(out)[1]
    assert len(out.accepted.events) == 1
    assert intake.rejected["too_large"] == 1


def test_event_exactly_at_the_limit_is_accepted():
    intake = Intake(Contracts(untyped=["test.*"]), RateLimiter(RateLimits()), 0, MAX_BATCH)
    e = ev()
    intake.max_event_bytes = len(e)
    assert len(intake.take(batch([e]), confirm=False, now=0.0).accepted.events) == 1
    intake.max_event_bytes = len(e) - 1
    assert intake.take(batch([e]), confirm=False, now=0.0).nacks[0].reason.startswith("too_large")


@pytest.mark.parametrize(
    "payload",
    [
        {"path": "", "watcher": "w"},
        {"path": "/x", "watcher": "w", "unknown": 1},
        {"path": "/x"},
        {"path": 5, "watcher": "w"},
    ],
)
def test_contract_violation(payload):
    intake = make_intake()
    e = ev("file.created", payload, source="files", id="ev-1")
    out = intake.take(batch([e], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[1].startswith("contract: payload does not match contract file.created v1")
    assert out.accepted.events == []
    assert intake.rejected["contract"] == 1
    entry = intake.reject_log[-1]
    assert entry["reason"] == "contract" and entry["source"] == "files" and entry["id"] == "ev-1"


@pytest.mark.parametrize("type_,v", [("other.thing", 1), ("file.created", 2)])
def test_unknown_type(type_, v):
    intake = make_intake()
    out = intake.take(batch([ev(type_, FILE_OK, v=v)], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[1].startswith("unknown_type: ")
    assert intake.rejected["unknown_type"] == 1
    assert out.accepted.events == []


def test_untyped_allowed_types_pass_with_any_payload():
    intake = make_intake()
    out = intake.take(batch([ev("test.anything", [1, "two", {"three": 3}])], "p", 1), confirm=True, now=0.0)
    assert out.nacks == [] and len(out.accepted.events) == 1


# -- confirm-mode dedup -----------------------------------------------------------------------
def test_resent_batch_is_skipped_and_nacks_repeated():
    intake = make_intake()
    bad = ev("file.created", {"path": ""})
    data = batch([ev(), bad, ev()], "p", 1)
    first = intake.take(data, confirm=True, now=0.0)
    assert len(first.accepted.events) == 2 and list(reasons(first)) == [2]
    again = intake.take(data, confirm=True, now=0.0)
    assert again.accepted.events == []
    assert again.duplicates == 3
    assert again.ack == 3
    assert again.nacks == first.nacks
    assert intake.duplicates_total == 3
    assert intake.rejected["contract"] == 1  # not counted twice


def test_partly_overlapping_resend_accepts_only_new():
    intake = make_intake()
    intake.take(batch([ev(), ev(), ev()], "p", 1), confirm=True, now=0.0)  # 1..3
    out = intake.take(batch([ev(), ev(), ev()], "p", 2), confirm=True, now=0.0)  # 2..4
    assert out.duplicates == 2
    assert [entry_decoder.decode(b).pseq for b in out.accepted.bodies] == [4]
    assert out.ack == 4
    assert intake.high["p"] == 4


def test_dedup_is_per_producer():
    intake = make_intake()
    intake.take(batch([ev()], "p1", 1), confirm=True, now=0.0)
    out = intake.take(batch([ev()], "p2", 1), confirm=True, now=0.0)
    assert len(out.accepted.events) == 1 and out.duplicates == 0


def test_batch_skipping_ahead_is_not_accepted():
    intake = make_intake()
    intake.take(batch([ev(), ev()], "p", 1), confirm=True, now=0.0)  # high = 2
    out = intake.take(batch([ev(), ev()], "p", 5, floor=3), confirm=True, now=0.0)  # 3, 4 missing
    assert out.accepted.events == []
    # issue 10 #6: a gap is NACKed as retryable (`sequence_gap`, seqs above `ack`)
    assert [(n.seq, n.reason.split(":")[0], n.retry_after) for n in out.nacks] == [
        (5, "sequence_gap", 0.0),
        (6, "sequence_gap", 0.0),
    ]
    assert out.ack == 2
    assert intake.high["p"] == 2
    # the producer goes back to 3: accepted
    out = intake.take(batch([ev(), ev(), ev(), ev()], "p", 3), confirm=True, now=0.0)
    assert [entry_decoder.decode(b).pseq for b in out.accepted.bodies] == [3, 4, 5, 6]


def test_remember_rebuilds_dedup_state():
    intake = make_intake()
    for pseq in (1, 2, 5, 3):  # journal order, with a lower one late
        intake.remember("p", pseq)
    intake.remember("", 99)  # fire-mode entries have no producer
    assert intake.high == {"p": 5}
    out = intake.take(batch([ev() for _ in range(6)], "p", 1), confirm=True, now=0.0)
    assert out.duplicates == 5
    assert [entry_decoder.decode(b).pseq for b in out.accepted.bodies] == [6]
    assert out.ack == 6


def test_remember_from_journal_entries_round_trip():
    one = make_intake()
    out = one.take(batch([ev(), ev(), ev()], "p", 1), confirm=True, now=0.0)
    two = make_intake()
    for body in out.accepted.bodies:
        e = entry_decoder.decode(body)
        two.remember(e.producer, e.pseq)
    again = two.take(batch([ev(), ev(), ev()], "p", 1), confirm=True, now=0.0)
    assert again.accepted.events == [] and again.duplicates == 3 and again.ack == 3


def test_producer_recovers_after_restart_when_last_events_were_nacked():
    ob = Outbox("p1", confirm=True, window=100, ack_timeout=1.0)
    ob.add("good", ev())
    ob.add("bad", ev("file.created", {"path": ""}))
    router = make_intake()
    out = router.take(ob.next_batch(0.0), confirm=True, now=0.0)
    ob.on_reply(ProducerReply(ack=out.ack, nacks=out.nacks), 0.0)
    assert [e.event_id for e in ob.take_errors()] == ["bad"]
    assert ob.idle()
    # router restart: dedup state comes back from the journal (only the accepted entry)
    restarted = make_intake()
    for body in out.accepted.bodies:
        e = entry_decoder.decode(body)
        restarted.remember(e.producer, e.pseq)
    ob.add("next", ev())
    sent = [ob.next_batch(1.0)]
    accepted = 0
    for t in range(2, 8):
        for frame in sent:
            o = restarted.take(frame, confirm=True, now=float(t))
            accepted += len(o.accepted.events)
            ob.on_reply(ProducerReply(ack=o.ack, nacks=o.nacks), float(t))
        sent = ob.resend_batches(float(t) + 10)
    assert accepted == 1 and ob.idle()


# -- rate limits -----------------------------------------------------------------------------------
def test_rate_limited_event_is_nacked_with_retry_after():
    intake = make_intake(RateLimits(default=RateLimit(rate=1, burst=2)))
    out = intake.take(batch([ev(), ev(), ev()], "p", 1), confirm=True, now=100.0)
    assert len(out.accepted.events) == 2
    assert list(reasons(out)) == [3]
    assert reasons(out)[3].startswith("rate_limited: ")
    assert out.nacks[0].retry_after == pytest.approx(1.0)
    assert out.ack == 3
    assert intake.rejected["rate_limited"] == 1
    # after the retry-after, the next event (new seq) passes
    later = intake.take(batch([ev()], "p", 4), confirm=True, now=101.0)
    assert len(later.accepted.events) == 1 and later.nacks == []


def test_rate_limits_are_per_source():
    intake = make_intake(RateLimits(default=RateLimit(rate=1, burst=1), sources={"vip": RateLimit(rate=100, burst=3)}))
    out = intake.take(
        batch(
            [
                ev(source="a"),
                ev(source="a"),
                ev(source="b"),
                ev(source="vip"),
                ev(source="vip"),
                ev(source="vip"),
                ev(source="vip"),
            ]
        ),
        confirm=False,
        now=0.0,
    )
    assert [n.seq for n in out.nacks] == [1, 6]  # fire mode: seq is the index from 0
    assert all(n.retry_after > 0 for n in out.nacks)
    assert len(out.accepted.events) == 5


def test_invalid_events_do_not_use_rate_tokens():
    intake = make_intake(RateLimits(default=RateLimit(rate=1, burst=1)))
    out = intake.take(batch([ev("file.created", {"path": ""}), ev()]), confirm=False, now=0.0)
    assert len(out.accepted.events) == 1
    assert [n.reason.split(":")[0] for n in out.nacks] == ["contract"]


def test_recent_nacks_are_bounded(monkeypatch):
    import nexus.router.intake as intake_mod

    monkeypatch.setattr(intake_mod, "RECENT_NACKS", 3)
    intake = make_intake()
    bad = ev("file.created", {"path": ""})
    intake.take(batch([bad] * 5, "p", 1), confirm=True, now=0.0)
    assert list(intake.recent_nacks["p"]) == [3, 4, 5]
    again = intake.take(batch([bad] * 5, "p", 1), confirm=True, now=0.0)
    assert [n.seq for n in again.nacks] == [3, 4, 5]


# -- nothing raises ------------------------------------------------------------------------------
def _with_bad_utf8(data: bytes, marker: bytes) -> bytes:
    assert marker in data
    return data.replace(marker, b"\xff\xfe\xfd"[: len(marker)])


def test_invalid_utf8_in_batch_is_a_bad_batch():
    intake = make_intake()
    frame = _with_bad_utf8(batch([ev()], "PRD", 1), b"PRD")
    out = intake.take(frame, confirm=True, now=0.0)
    assert out.error and intake.rejected["bad_batch"] == 1


def test_invalid_utf8_in_event_envelope_is_malformed():
    intake = make_intake()
    bad = _with_bad_utf8(ev(source="SRC"), b"SRC")
    out = intake.take(batch([ev(), bad], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[2].startswith("malformed: ")
    assert len(out.accepted.events) == 1


def test_invalid_utf8_in_typed_payload_is_a_contract_nack():
    intake = make_intake()
    bad = _with_bad_utf8(ev("file.created", {"path": "PTH", "watcher": "w"}), b"PTH")
    out = intake.take(batch([bad, ev()], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[1].split(":")[0] in ("contract", "malformed")
    assert len(out.accepted.events) == 1


@settings(max_examples=200, deadline=None, database=None)
@example(frame=b"\x81\xa2\x00\x80", confirm=False)
@given(frame=st.binary(max_size=200), confirm=st.booleans())
def test_property_no_byte_string_raises(frame, confirm):
    intake = make_intake()
    out = intake.take(frame, confirm=confirm, now=0.0)
    assert out.error or out.nacks or out.accepted.events or frame


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=5,
)


@settings(max_examples=80, deadline=None, database=None)
@given(
    items=st.lists(
        st.one_of(
            msgpack_values.map(msgspec.msgpack.encode),
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["test.a", "file.created", "x", "Bad.Type"]),
                    "source": st.text(max_size=5),
                    "payload": msgpack_values,
                    "id": st.text(max_size=5),
                    "time": st.floats(),
                },
                optional={"key": msgpack_values, "priority": st.integers(-5, 15), "v": st.integers(-1, 3)},
            ).map(msgspec.msgpack.encode),
        ),
        max_size=6,
    ),
    seq=st.integers(min_value=1, max_value=10),
)
def test_property_random_events_never_raise_and_every_event_is_settled(items, seq):
    intake = make_intake()
    out = intake.take(batch(items, "p", seq), confirm=True, now=0.0)
    assert out.error == ""
    nacked = {n.seq for n in out.nacks}
    accepted = {entry_decoder.decode(b).pseq for b in out.accepted.bodies}
    assert nacked.isdisjoint(accepted)
    assert nacked | accepted == set(range(seq, seq + len(items)))
    assert all(
        isinstance(n, Nack)
        and n.reason.split(":")[0] in {"malformed", "contract", "unknown_type", "too_large", "rate_limited"}
        for n in out.nacks
    )


# -- nexus/router/ratelimit.py ------------------------------------------------------------------------------
from nexus.router.ratelimit import TokenBucket  # noqa: E402


def test_token_bucket_burst_then_rate():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(0.0)
    assert wait == pytest.approx(0.5)  # one token at 2/s
    # the token due at 0.5 is promised to the first rejected event: the next one
    # rejected is told to come at 1.0
    assert b.take(0.25) == pytest.approx(0.75)
    assert b.take(0.5) == 0.0  # the first one, back on time
    assert b.take(0.5) == pytest.approx(1.0)  # after the one promised 1.0
    # a long pause refills only up to the burst
    assert [b.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert b.take(100.0) > 0


def test_token_bucket_steady_rate():
    b = TokenBucket(rate=8.0, burst=1, now=0.0)
    # 8 s, trying 64 times a second (binary-exact times): one pass every 8 tries
    passed = [i for i in range(512) if b.take(i / 64) == 0.0]
    assert passed == list(range(0, 512, 8))


def test_rate_limiter_default_and_sources():
    limits = RateLimits(default=RateLimit(rate=1, burst=2), sources={"vip": RateLimit(rate=1, burst=5)})
    rl = RateLimiter(limits)
    assert rl.enabled
    assert [rl.check("anon", 0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert rl.check("anon", 0.0) == pytest.approx(2.0)  # queued behind the third
    assert all(rl.check("vip", 0.0) == 0.0 for _ in range(5))
    assert rl.check("vip", 0.0) > 0
    assert rl.check("other", 0.0) == 0.0  # own bucket
    assert rl.describe() == {"default": {"rate": 1, "burst": 2}, "vip": {"rate": 1, "burst": 5}}


def test_rate_limiter_without_default_limits_only_listed_sources():
    rl = RateLimiter(RateLimits(sources={"noisy": RateLimit(rate=1, burst=1)}))
    assert rl.enabled
    assert all(rl.check("quiet", 0.0) == 0.0 for _ in range(100))
    assert "quiet" not in rl.buckets
    assert rl.check("noisy", 0.0) == 0.0
    assert rl.check("noisy", 0.0) == pytest.approx(1.0)


def test_rate_limiter_disabled():
    rl = RateLimiter(RateLimits())
    assert not rl.enabled
    assert rl.check("x", 0.0) == 0.0
    assert rl.describe() == {}


def test_rate_limiter_bounds_its_table():
    rl = RateLimiter(RateLimits(default=RateLimit(rate=1, burst=1)))
    n = RateLimiter.MAX_SOURCES + 50
    for i in range(n):
        rl.check(f"s{i}", 0.0)
    assert len(rl.buckets) == RateLimiter.MAX_SOURCES
    assert "s0" not in rl.buckets and f"s{n - 1}" in rl.buckets
    assert rl.check(f"s{n - 1}", 0.0) > 0  # the newest keeps its state


def test_unknown_producer_cannot_claim_seqs_it_never_sent():
    intake = make_intake()
    out = intake.take(batch([ev()], "fresh", seq=5, floor=1), confirm=True, now=0.0)
    assert out.ack == 0 and out.accepted.events == []  # 1..4 were never received
    out = intake.take(batch([ev()] * 5, "fresh", seq=1, floor=1), confirm=True, now=0.0)
    assert out.ack == 5 and len(out.accepted.events) == 5


def test_confirm_seq_zero_is_refused():
    intake = make_intake()
    out = intake.take(batch([ev()], "p0", seq=0, floor=0), confirm=True, now=0.0)
    assert "seq >= 1" in out.error and intake.rejected["bad_batch"] == 1


def test_repeated_nacks_stay_within_the_resent_message():
    intake = make_intake()
    bad = ev("file.created", payload={"path": "/x"})  # misses `watcher`: contract NACK
    intake.take(batch([ev(), bad, ev(), bad], "p2", seq=1), confirm=True, now=0.0)
    out = intake.take(batch([ev(), bad], "p2", seq=1), confirm=True, now=0.0)
    assert sorted(reasons(out)) == [2]


def test_unknown_envelope_fields_and_bad_times_are_malformed():
    intake = make_intake()
    extra = encoder.encode({"type": "test.x", "source": "s", "payload": 1, "id": "i", "time": 1.0, "colour": "red"})
    nan = encoder.encode({"type": "test.x", "source": "s", "payload": 1, "id": "i", "time": float("nan")})
    badtype = encoder.encode({"type": "Not A Type", "source": "s", "payload": 1, "id": "i", "time": 1.0})
    out = intake.take(batch([extra, nan, badtype], "p3", seq=1), confirm=True, now=0.0)
    assert [r.split(":")[0] for _, r in sorted(reasons(out).items())] == ["malformed"] * 3


def test_rejected_events_retrying_at_their_turn_all_pass():
    b = TokenBucket(rate=10.0, burst=5, now=0.0)
    turns = [b.take(0.0) for _ in range(25)]
    assert turns[:5] == [0.0] * 5
    comebacks = sorted(t for t in turns if t > 0)
    assert comebacks == pytest.approx([k / 10 for k in range(1, 21)])
    assert all(b.take(t) == 0.0 for t in comebacks)  # each finds its token


# -- issue 10 #6: the sequence rule ---------------------------------------------------------------
def gap_seqs(out) -> list[int]:
    return [n.seq for n in out.nacks if n.reason.startswith("sequence_gap: ")]


def test_empty_batch_with_a_forged_floor_moves_nothing():
    intake = make_intake()
    intake.take(batch([ev()] * 10, "victim", 1), confirm=True, now=0.0)
    out = intake.take(batch([], "victim", 11, floor=10**12), confirm=True, now=0.0)
    assert out.ack == 10 and out.nacks == [] and intake.high["victim"] == 10
    nxt = intake.take(batch([ev()] * 3, "victim", 11), confirm=True, now=0.0)
    assert [entry_decoder.decode(b).pseq for b in nxt.accepted.bodies] == [11, 12, 13]


def test_known_producer_floor_never_jumps_ahead():
    intake = make_intake()
    intake.take(batch([ev()] * 10, "victim", 1), confirm=True, now=0.0)
    spoof = intake.take(batch([ev()], "victim", 10**12, floor=10**12), confirm=True, now=0.0)
    assert spoof.accepted.events == [] and spoof.ack == 10 and gap_seqs(spoof) == [10**12]
    assert all(n.retry_after == 0.0 and n.seq > spoof.ack for n in spoof.nacks)  # not settled
    assert intake.high["victim"] == 10 and intake.rejected["sequence_gap"] == 1
    assert "victim" not in intake.recent_nacks  # a gap NACK is never repeated as final
    nxt = intake.take(batch([ev()] * MAX_BATCH, "victim", 11), confirm=True, now=0.0)
    assert len(nxt.accepted.events) == MAX_BATCH and nxt.duplicates == 0 and nxt.ack == 10 + MAX_BATCH


def test_unknown_producer_floor_is_trusted_only_up_to_the_first_seq():
    intake = make_intake()
    out = intake.take(batch([ev()], "fresh", 5, floor=10**12), confirm=True, now=0.0)
    assert out.ack == 5 and [entry_decoder.decode(b).pseq for b in out.accepted.bodies] == [5]
    assert intake.high["fresh"] == 5
    empty = intake.take(batch([], "other", 7, floor=10**12), confirm=True, now=0.0)
    assert empty.ack == 6 and "other" not in intake.high


def test_gap_nacks_every_event_of_the_batch():
    intake = make_intake()
    out = intake.take(batch([ev()] * 3, "p", 4, floor=1), confirm=True, now=0.0)
    assert gap_seqs(out) == [4, 5, 6] and out.ack == 0
    assert "expected producer seq 1, got 4" in out.nacks[0].reason


def test_sdk_renumbers_after_a_restart_forgot_its_nacked_tail():
    """Seqs 2..4 were NACKed before the router restarted (not in the journal): the router
    refuses seq 5 as a gap and the SDK numbers its unacked events on from 2."""
    ob = Outbox("p", confirm=True, window=100, ack_timeout=1.0)
    ob.add("ok", ev())
    for i in range(3):
        ob.add(f"bad{i}", ev("file.created", {"path": ""}))
    router = make_intake()
    first = router.take(ob.next_batch(0.0), confirm=True, now=0.0)
    ob.on_reply(ProducerReply(ack=first.ack, nacks=first.nacks), 0.0)
    assert len(ob.take_errors()) == 3 and ob.idle()
    restarted = make_intake()
    restarted.remember("p", 1)
    for i in range(5):
        ob.add(f"next{i}", ev())
    frames = [ob.next_batch(1.0)]
    journaled: list[int] = []
    for t in range(2, 6):
        for frame in frames:
            o = restarted.take(frame, confirm=True, now=float(t))
            journaled += [entry_decoder.decode(b).pseq for b in o.accepted.bodies]
            ob.on_reply(ProducerReply(ack=o.ack, nacks=o.nacks), float(t))
        frames = ob.resend_batches(float(t))
    assert journaled == [2, 3, 4, 5, 6] and ob.idle() and ob.renumbered == 1
    assert ob.take_errors() == []


# -- issue 10 #12: input edges ------------------------------------------------------------------
def test_type_with_a_trailing_newline_is_malformed():
    intake = make_intake()
    raw = encoder.encode({"type": "test.x\n", "source": "s", "payload": 1, "id": "i", "time": 1.0})
    out = intake.take(batch([raw], "p", 1), confirm=True, now=0.0)
    assert reasons(out)[1].startswith("malformed: ") and out.accepted.events == []


@pytest.mark.parametrize("field", ["source", "key", "correlation_id"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\x7f", "\x85", "\x9b"])
def test_control_characters_are_malformed_naming_the_field(field, char):
    intake = make_intake()
    fields = {"source": "s", field: f"a{char}b"}
    raw = encoder.encode({"type": "test.x", "payload": 1, "id": "i", "time": 1.0, **fields})
    out = intake.take(batch([ev(), raw, ev()], "p", 1), confirm=True, now=0.0)
    assert list(reasons(out)) == [2]
    assert reasons(out)[2] == f"malformed: malformed event: control characters are not allowed - at `$.{field}`"
    assert len(out.accepted.events) == 2


def test_a_cached_key_or_source_does_not_let_controls_through():
    intake = make_intake()
    intake.take(batch([ev(source="s", key="k")]), confirm=False, now=0.0)
    bad = [ev(source="s", key="k\x1b"), ev(source="s\x1b", key="k"), ev(source="k\n")]
    out = intake.take(batch(bad), confirm=False, now=0.0)
    assert [n.seq for n in out.nacks] == [0, 1, 2] and out.accepted.events == []


def test_printable_text_is_kept_non_ascii_included():
    intake = make_intake()
    out = intake.take(batch([ev(source="café ☕", key="ключ\u00a0x")]), confirm=False, now=0.0)
    assert out.nacks == [] and len(out.accepted.events) == 1


def test_resend_of_a_batch_the_journal_refused_gets_the_storage_nack_again():
    """Review #1: take() moved `high` over the batch before the journal write failed;
    if the storage NACK reply is lost, the producer resends the same seqs: they must be
    NACKed again (retryable), never ACKed as duplicates of events nobody wrote."""
    intake = make_intake()
    frame = batch([ev(), ev(), ev()], "p1", 1)
    out = intake.take(frame, confirm=True, now=0.0)
    assert len(out.accepted.bodies) == 3
    refused = intake.refuse(out.accepted, "storage_unavailable: No space left on device", 1.0)
    assert [n.seq for n in refused] == [1, 2, 3]
    again = intake.take(frame, confirm=True, now=0.0)  # the reply was lost: a resend
    assert again.accepted.bodies == []
    assert reasons(again) == {s: "storage_unavailable: No space left on device" for s in (1, 2, 3)}
    assert all(n.retry_after == 1.0 for n in again.nacks)


# -- the bulk path (a whole batch decoded and checked at once) ---------------------------
_KINDS = [
    ev(),
    ev(key="k1"),
    ev(key="k2", correlation_id="c1"),
    ev("file.created", FILE_OK, source="files"),
    ev(source="other", priority=1, v=2),
    ev("file.created", {"path": 1}, source="files"),  # breaks its contract
    ev(source="bad\x1b[31m"),
    ev(key="k\x07"),
    ev(correlation_id="c\n2"),
    ev("nope.unknown"),
    ev(payload={"pad": "x" * (MAX_EVENT + 10)}),  # too large
    b"\xc1",  # not msgpack
]


def _entries(out) -> list[tuple]:
    """The journal entries of an outcome, without the accept time (a wall clock)."""
    return [
        (e.type, e.khash, e.producer, e.pseq, bytes(e.event), e.group)
        for e in map(entry_decoder.decode, out.accepted.bodies)
    ]


@settings(max_examples=60, deadline=None, database=None)
@given(picks=st.lists(st.integers(min_value=0, max_value=len(_KINDS) - 1), min_size=1, max_size=MAX_BATCH))
def test_bulk_path_takes_exactly_what_the_per_event_path_takes(picks):
    """The bulk path (every event decoded in one call, the checks applied per distinct
    value) gives the same outcome as the per-event path, event by event, or hands the
    batch to it: journal entries, NACKs, counts and dedup state all equal."""
    frame = batch([_KINDS[i] for i in picks], "p1", 1)
    bulk, single = make_intake(), make_intake()
    single._bulk = lambda frame, events: None  # type: ignore[method-assign]
    a = bulk.take(frame, confirm=True, now=0.0)
    b = single.take(frame, confirm=True, now=0.0)
    assert _entries(a) == _entries(b)
    assert a.accepted.counts == b.accepted.counts and a.accepted.khashes == b.accepted.khashes
    assert (a.ack, a.nacks, a.error, a.duplicates) == (b.ack, b.nacks, b.error, b.duplicates)
    assert bulk.high == single.high and bulk.rejected == single.rejected


def test_bulk_path_is_taken_for_a_clean_batch_and_left_for_a_bad_one():
    intake = make_intake()
    clean = [ev(key="k1"), ev(correlation_id="c1"), ev("file.created", FILE_OK, source="files")]
    assert intake._bulk(batch(clean), [msgspec.Raw(e) for e in clean]) is not None
    for bad in (ev(source="bad\x1b"), ev(key="k\x07"), ev("file.created", {"path": 1}), ev("nope.unknown")):
        events = [*clean, bad]
        assert intake._bulk(batch(events), [msgspec.Raw(e) for e in events]) is None

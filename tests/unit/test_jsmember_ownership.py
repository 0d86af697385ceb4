"""The NATS member's pure policy: the balanced target, the take plan, validation."""

from __future__ import annotations

import time

from nexus.jetstream.records import OwnerRecord
from nexus.jsmember.intake import Intake, Rejected
from nexus.jsmember.leases import Roster
from nexus.jsmember.ownership import ConsumerState, member_id, released, take_plan, target
from nexus.protocol.events import Contracts, Event, encode, new_id


def counts(t: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in t.values():
        out[m] = out.get(m, 0) + 1
    return out


def test_member_id_is_sanitized():
    assert member_id("notify-0", "web.example.com", 42) == "notify-0-web_example_com-42"


def test_target_balances_and_keeps_what_members_own():
    t = target(["b", "a"], 16, {})
    assert counts(t) == {"a": 8, "b": 8} and sorted(t) == list(range(16))
    # a third member: each keeps 5 or 6 of its own; the newcomer gets only freed ones
    t3 = target(["a", "b", "c"], 16, t)
    assert sorted(counts(t3).values()) == [5, 5, 6]
    assert all(t3[p] == t[p] for p in t3 if t3[p] != "c")
    # the same view gives the same target, whatever the order members are listed in
    assert target(["c", "b", "a"], 16, t) == t3
    # a member leaves: its partitions are spread, the others keep theirs
    t2 = target(["a", "c"], 16, {p: m for p, m in t3.items() if m != "b"})
    assert counts(t2) == {"a": 8, "c": 8}
    assert all(t2[p] == m for p, m in t3.items() if m != "b")


def test_target_gives_the_ceilings_to_who_holds_most():
    owners = {0: "b", 1: "b", 2: "a"}
    assert counts(target(["a", "b"], 3, owners)) == {"a": 1, "b": 2}
    assert target([], 4, owners) == {}


def test_take_plan_after_a_crash_flags_what_was_delivered():
    old = OwnerRecord(member="dead", generation=3, consumer="g-p1-g3", start_seq=10)
    plan = take_plan("g", 1, "me", old, ConsumerState(ack_floor=40, start=10, delivered=55), 1)
    assert plan.member == "me" and plan.generation == 4 and plan.consumer == "g-p1-g4"
    assert plan.start_seq == 41 and plan.redeliver_upto == 55
    # released cleanly: nothing is flagged
    clean = released(plan, 60)
    assert clean.member == "" and clean.released and clean.start_seq == 61
    nxt = take_plan("g", 1, "other", clean, ConsumerState(60, 41, 70), 1)
    assert nxt.start_seq == 61 and nxt.redeliver_upto == 0
    # taken from a crashed owner, let go at once (the target gives it to another): what the
    # crashed owner may have handled is still flagged for the owner after
    early = released(plan, 40)
    assert early.released and early.redeliver_upto == 55
    after = take_plan("g", 1, "third", early, ConsumerState(40, 41, 41), 1)
    assert after.start_seq == 41 and after.redeliver_upto == 55
    # nothing acked yet: from the consumer's start
    assert take_plan("g", 1, "me", old, ConsumerState(0, 10, 12), 1).start_seq == 10
    # no consumer: the record's start, else the group's
    assert take_plan("g", 1, "me", None, None, 7).start_seq == 7
    assert take_plan("g", 1, "me", OwnerRecord(start_seq=9, generation=1), None, 7).start_seq == 9
    # a reset wins over the consumer's ack floor
    reset = OwnerRecord(member="x", generation=2, consumer="c", reset_to=3)
    assert take_plan("g", 1, "me", reset, ConsumerState(40, 1, 50), 1).start_seq == 3


def test_poison_to_pass_over_stays_with_the_partition():
    """OwnerRecord.skip (dead-lettered poison) outlives a crash, a take and a release."""
    old = OwnerRecord(member="dead", generation=3, consumer="g-p1-g3", start_seq=10, skip=[12, 30])
    plan = take_plan("g", 1, "me", old, ConsumerState(ack_floor=11, start=10, delivered=12), 1)
    assert plan.skip == [12, 30]
    assert released(plan, 20).skip == [12, 30]


def test_roster_by_our_own_clock():
    r = Roster(dead_after=2.0)
    r.seen("a", 100.0, revision=1)
    r.seen("b", 101.5, revision=2)
    assert r.alive(102.0) == {"a", "b"}
    assert r.alive(102.5) == {"b"} and r.suspects(102.5) == ["a"]
    r.seen("a", 102.5, revision=1)  # read again, unchanged: still suspect
    assert r.suspects(102.5) == ["a"]
    r.confirmed_dead("a")  # (not read again until it beats)
    assert r.suspects(103.0) == [] and r.alive(103.0) == {"b"}
    r.seen("a", 102.5, revision=3)  # it did beat: we were the ones not looking
    assert r.alive(102.5) == {"a", "b"}
    r.gone("b")
    assert r.alive(102.5) == {"a"}


def test_intake_rejects_garbage_and_contract_breaks_and_passes_over_other_types():
    intake = Intake(Contracts.from_modules(["nexus.contracts"], ["test.*"]), ["test.*", "schedule.tick"])
    ok = Event("test.ping", "t", {"n": 1}, new_id(), time.time())
    assert intake.check(encode(ok)).id == ok.id
    assert isinstance(intake.check(b"\xc1"), Rejected)
    bad = Event("schedule.tick", "t", {"name": 5}, new_id(), time.time())
    assert isinstance(intake.check(encode(bad)), Rejected)
    assert intake.check(encode(Event("other.type", "t", {}, new_id(), time.time()))) is None

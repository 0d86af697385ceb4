"""Unit tests for nexus/router/coordinator.py: balanced() and the membership flows."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.protocol.wire import Assign
from nexus.router.coordinator import Coordinator, balanced

HB = 3.0
RELEASE = 30.0


# -- balanced() ------------------------------------------------------------------------------
def sizes(target, members):
    c = Counter(target)
    return [c.get(m, 0) for m in members]


def test_balanced_no_members():
    assert balanced(4, [], ["a", None, "b", None]) == [None] * 4


def test_balanced_from_scratch():
    t = balanced(16, ["b", "a"], [None] * 16)
    assert None not in t
    assert sizes(t, ["a", "b"]) == [8, 8]


def test_balanced_keeps_existing_holders():
    current = ["a"] * 6
    t = balanced(6, ["a", "b"], current)
    assert sizes(t, ["a", "b"]) == [3, 3]
    assert all(t[p] == "a" for p in range(6) if t[p] != "b")


def test_balanced_drops_unknown_holders():
    t = balanced(4, ["a"], ["x", "a", "y", None])
    assert t == ["a"] * 4


member_names = st.lists(st.text(alphabet="abcdefgh0123", min_size=1, max_size=3), min_size=1, max_size=12, unique=True)


@settings(max_examples=100, deadline=None, database=None)
@given(partitions=st.integers(min_value=1, max_value=64), members=member_names, data=st.data())
def test_property_balanced_is_balanced_and_complete(partitions, members, data):
    current = data.draw(st.lists(st.sampled_from(members + ["gone", None]), min_size=partitions, max_size=partitions))
    t = balanced(partitions, members, current)
    assert len(t) == partitions
    assert all(holder in members for holder in t)  # every partition has a live holder
    s = sizes(t, members)
    assert max(s) - min(s) <= 1
    assert sum(s) == partitions


@settings(max_examples=100, deadline=None, database=None)
@given(partitions=st.integers(min_value=1, max_value=64), members=member_names, data=st.data())
def test_property_balanced_is_deterministic(partitions, members, data):
    current = data.draw(st.lists(st.sampled_from(members + [None]), min_size=partitions, max_size=partitions))
    shuffled = data.draw(st.permutations(members))
    assert balanced(partitions, members, current) == balanced(partitions, list(shuffled), list(current))


@settings(max_examples=100, deadline=None, database=None)
@given(
    partitions=st.integers(min_value=1, max_value=64),
    members=member_names,
    newcomer=st.text(alphabet="abcdefgh0123", min_size=1, max_size=4),
)
def test_property_balanced_sticky_when_a_member_joins(partitions, members, newcomer):
    if newcomer in members:
        return
    before = balanced(partitions, members, [None] * partitions)
    after = balanced(partitions, members + [newcomer], before)
    moved = [p for p in range(partitions) if before[p] != after[p]]
    # only partitions that go to the newcomer move; nobody else gains or swaps
    assert all(after[p] == newcomer for p in moved)
    assert len(moved) == Counter(after)[newcomer]
    # and the newcomer gets no more than its fair share, rounded up
    assert len(moved) <= -(-partitions // (len(members) + 1))
    # stable: running it again changes nothing
    assert balanced(partitions, members + [newcomer], after) == after


@settings(max_examples=100, deadline=None, database=None)
@given(partitions=st.integers(min_value=1, max_value=64), members=member_names, data=st.data())
def test_property_balanced_sticky_when_a_member_leaves(partitions, members, data):
    if len(members) < 2:
        return
    leaver = data.draw(st.sampled_from(members))
    before = balanced(partitions, members, [None] * partitions)
    rest = [m for m in members if m != leaver]
    after = balanced(partitions, rest, before)
    for p in range(partitions):
        if before[p] != leaver:
            # survivors keep their partitions unless they must give one up for balance
            if after[p] != before[p]:
                assert Counter(before)[before[p]] > Counter(after)[before[p]]


def test_balanced_join_moves_the_minimum():
    # a:3, b:2 (5 partitions). A third member needs only 1 partition (5 = 2+2+1),
    # but "0" sorts first and gets quota 2, so 2 partitions move.
    before = balanced(5, ["a", "b"], [None] * 5)
    assert sizes(before, ["a", "b"]) == [3, 2]
    after = balanced(5, ["0", "a", "b"], before)
    moved = sum(1 for p in range(5) if before[p] != after[p])
    assert moved == 5 // 3


# -- Coordinator flows -------------------------------------------------------------------------
def assigns(out) -> dict[bytes, Assign]:
    result = {}
    for ident, msg in out:
        assert isinstance(msg, Assign)
        assert ident not in result, "two assignments to one member in one step"
        result[ident] = msg
    return result


@pytest.fixture
def coord():
    return Coordinator(heartbeat_timeout=HB, release_timeout=RELEASE)


def setup_two(coord, partitions=4, cursors=None):
    g = coord.add_group("g", partitions, cursors or [10 * (p + 1) for p in range(partitions)])
    first = assigns(coord.join(g, "a", b"A", now=0.0))
    second = assigns(coord.join(g, "b", b"B", now=1.0))
    return g, first, second


def test_first_member_gets_everything_with_cursors(coord):
    g = coord.add_group("g", 4, [5, 6, 7, 8])
    out = assigns(coord.join(g, "a", b"A", now=0.0))
    assert set(out) == {b"A"}
    assert out[b"A"].group == "g"
    assert out[b"A"].partitions == [0, 1, 2, 3]
    assert out[b"A"].grants == {0: 5, 1: 6, 2: 7, 3: 8}
    assert g.owner == ["a"] * 4


def test_second_member_waits_for_release(coord):
    g, _, second = setup_two(coord)
    kept = second[b"A"].partitions
    assert len(kept) == 2
    assert second[b"A"].grants == {}
    moving = [p for p in range(4) if p not in kept]
    # the newcomer is told about the group but gets nothing yet
    assert second[b"B"].partitions == [] and second[b"B"].grants == {}
    assert all(g.owner[p] == "a" for p in range(4))
    # acks and heartbeats in between do not grant anything
    coord.ack(g, "a", {p: 100 for p in moving})
    assert coord.expire(now=2.0) == []


def test_release_grants_to_newcomer_with_acked_cursor(coord):
    g, _, second = setup_two(coord)
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    out = assigns(coord.released(g, "a", {p: 500 + p for p in moving}, now=2.0))
    assert set(out) == {b"B"}
    assert sorted(out[b"B"].partitions) == moving
    assert out[b"B"].grants == {p: 500 + p for p in moving}
    assert all(g.owner[p] == "b" for p in moving)
    assert g.revoked_at == {}


def test_partial_release_grants_only_released(coord):
    g, _, second = setup_two(coord)
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    out = assigns(coord.released(g, "a", {moving[0]: 77}, now=2.0))
    assert out[b"B"].grants == {moving[0]: 77}
    assert out[b"B"].partitions == [moving[0]]
    assert g.owner[moving[1]] == "a"
    out = assigns(coord.released(g, "a", {moving[1]: 88}, now=3.0))
    assert out[b"B"].grants == {moving[1]: 88}
    assert sorted(out[b"B"].partitions) == moving


def test_release_of_a_kept_partition_does_not_free_it(coord):
    g, _, second = setup_two(coord)
    kept = second[b"A"].partitions
    coord.released(g, "a", {kept[0]: 99}, now=2.0)
    assert g.owner[kept[0]] == "a"
    assert g.cursors[kept[0]] == 99


def test_acks_from_non_owner_are_ignored(coord):
    g = coord.add_group("g", 2, [10, 20])
    coord.join(g, "a", b"A", now=0.0)
    coord.ack(g, "stranger", {0: 1000})
    assert g.cursors == [10, 20]
    coord.ack(g, "a", {0: 15, 1: 25, 7: 99, -1: 5})
    assert g.cursors == [15, 25]


def test_cursors_never_go_backwards(coord):
    g = coord.add_group("g", 2, [10, 20])
    coord.join(g, "a", b"A", now=0.0)
    coord.ack(g, "a", {0: 50})
    coord.ack(g, "a", {0: 40, 1: 19})
    assert g.cursors == [50, 20]
    coord.leave(g, "a", {0: 30}, now=1.0)
    assert g.cursors == [50, 20]


def test_newcomer_acks_before_grant_are_ignored(coord):
    g, _, second = setup_two(coord)
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    before = list(g.cursors)
    coord.ack(g, "b", {p: 9999 for p in moving})
    assert g.cursors == before


def test_leave_frees_partitions_at_once_with_final_acks(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    coord.join(g, "a", b"A", now=0.0)
    second = assigns(coord.join(g, "b", b"B", now=1.0))
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    coord.released(g, "a", {p: 3 for p in moving}, now=1.5)
    b_parts = [p for p in range(4) if g.owner[p] == "b"]
    a_parts = [p for p in range(4) if g.owner[p] == "a"]
    out = assigns(coord.leave(g, "a", {p: 40 + p for p in a_parts}, now=2.0))
    assert set(out) == {b"B"}
    assert out[b"B"].partitions == [0, 1, 2, 3]
    assert out[b"B"].grants == {p: 40 + p for p in a_parts}
    assert "a" not in g.members
    assert g.owner == ["b"] * 4
    assert all(g.cursors[p] == 3 for p in b_parts)


def test_leave_while_revoking_hands_over_at_once(coord):
    g, _, second = setup_two(coord)
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    out = assigns(coord.leave(g, "a", {p: 123 for p in range(4)}, now=2.0))
    assert out[b"B"].partitions == [0, 1, 2, 3]
    assert out[b"B"].grants == {p: 123 for p in range(4)}
    assert g.revoked_at == {}
    assert moving


def test_leave_unknown_member(coord):
    g = coord.add_group("g", 2, [0, 0])
    assert coord.leave(g, "nobody", {0: 5}, now=0.0) == []
    assert g.cursors == [0, 0]


def test_last_member_leaving_leaves_partitions_unowned(coord):
    g = coord.add_group("g", 2, [0, 0])
    coord.join(g, "a", b"A", now=0.0)
    assert coord.leave(g, "a", {0: 9}, now=1.0) == []
    assert g.owner == [None, None]
    assert g.cursors == [9, 0]
    out = assigns(coord.join(g, "b", b"B", now=2.0))
    assert out[b"B"].grants == {0: 9, 1: 0}


def test_expire_drops_silent_member_and_reassigns(coord):
    g = coord.add_group("g", 4, [1, 2, 3, 4])
    coord.join(g, "a", b"A", now=0.0)
    coord.join(g, "b", b"B", now=0.0)
    coord.released(g, "a", {p: 10 + p for p in range(4) if g.target[p] == "b"}, now=0.5)
    a_parts = [p for p in range(4) if g.owner[p] == "a"]
    assert coord.seen(g, "b", None, now=2.0)
    assert coord.expire(now=HB) == []  # a: silent for exactly the timeout: still alive
    assert "a" in g.members
    out = assigns(coord.expire(now=HB + 0.5))
    assert "a" not in g.members
    assert set(out) == {b"B"}
    assert out[b"B"].partitions == [0, 1, 2, 3]
    assert out[b"B"].grants == {p: g.cursors[p] for p in a_parts}
    assert {p: out[b"B"].grants[p] for p in a_parts} == {p: p + 1 for p in a_parts}


def test_heartbeat_keeps_member_alive_and_updates_identity(coord):
    g = coord.add_group("g", 2, [0, 0])
    coord.join(g, "a", b"A", now=0.0)
    for t in (2.0, 4.0, 6.0):
        assert coord.seen(g, "a", None, now=t)
        assert coord.expire(now=t + 1.0) == []
    assert coord.seen(g, "a", b"A2", now=7.0)
    assert g.members["a"].identity == b"A2"
    members = [(grp, m) for grp in coord.groups.values() for m in grp.members.values()]
    assert [(grp, m) for grp, m in members if m.identity == b"A2"] == [(g, g.members["a"])]
    assert not [m for _, m in members if m.identity == b"A"]
    assert coord.seen(g, "ghost", None, now=7.0) is False


def test_unreleased_revoke_is_forced_after_release_timeout(coord):
    g, _, second = setup_two(coord, cursors=[1, 2, 3, 4])
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    coord.ack(g, "a", {p: 50 for p in moving})
    for t in (5.0, 10.0, 20.0, 30.0):
        coord.seen(g, "a", None, now=t)
        coord.seen(g, "b", None, now=t)
        assert coord.expire(now=t) == []
    assert all(g.owner[p] == "a" for p in moving)
    coord.seen(g, "a", None, now=31.5)
    coord.seen(g, "b", None, now=31.5)
    out = assigns(coord.expire(now=RELEASE + 1.0 + 0.01))
    assert set(out) == {b"B"}
    assert out[b"B"].grants == {p: 50 for p in moving}
    assert sorted(out[b"B"].partitions) == moving
    assert g.revoked_at == {}


def test_join_with_existing_name_replaces_old_member(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    coord.join(g, "a", b"A-old", now=0.0)
    coord.join(g, "b", b"B", now=0.0)
    coord.released(g, "a", {p: 5 for p in range(4) if g.target[p] == "b"}, now=0.5)
    coord.ack(g, "a", {p: 7 for p in range(4) if g.owner[p] == "a"})
    out = assigns(coord.join(g, "a", b"A-new", now=1.0))
    assert b"A-old" not in out
    assert set(g.members) == {"a", "b"}
    assert g.members["a"].identity == b"A-new"
    assert len(out[b"A-new"].partitions) == 2
    assert out[b"A-new"].grants == {p: 7 for p in out[b"A-new"].partitions}
    assert sorted(out[b"A-new"].partitions + [p for p in range(4) if g.owner[p] == "b"]) == [0, 1, 2, 3]


def test_join_with_existing_name_while_revoking(coord):
    g, _, second = setup_two(coord)
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    out = assigns(coord.join(g, "a", b"A2", now=2.0))
    # the old incarnation held everything; its revokes are void and b gets its share now
    assert sorted(out[b"B"].grants) == moving
    assert sorted(out[b"A2"].grants) == sorted(second[b"A"].partitions)
    assert g.revoked_at == {}


def test_member_in_two_groups_is_independent(coord):
    g1 = coord.add_group("g1", 2, [0, 0])
    g2 = coord.add_group("g2", 2, [0, 0])
    coord.join(g1, "a", b"A1", now=0.0)
    coord.join(g2, "a", b"A2", now=0.0)
    out = assigns(coord.leave(g1, "a", {}, now=1.0))
    assert out == {}
    assert "a" in g2.members and g2.owner == ["a", "a"]


def test_cancelled_revoke_is_not_forced_later(coord):
    g, _, second = setup_two(coord, cursors=[0, 0, 0, 0])
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    # b leaves before a released anything: a keeps all partitions
    out = assigns(coord.leave(g, "b", {}, now=2.0))
    assert out[b"A"].partitions == [0, 1, 2, 3] and out[b"A"].grants == {}
    assert g.owner == ["a"] * 4
    coord.ack(g, "a", {p: 100 for p in range(4)})
    coord.seen(g, "a", None, now=RELEASE + 5.0)
    # nothing is pending: nothing should be forced, nothing re-granted (actual: a is
    # "granted" the partitions it already runs, from cursor 100, via a forced release)
    out = coord.expire(now=RELEASE + 5.0)
    assert out == [], f"spurious forced release of {moving}: {out}"


def test_release_racing_a_cancelled_revoke_is_granted_back(coord):
    g, _, second = setup_two(coord, cursors=[0, 0, 0, 0])
    moving = [p for p in range(4) if p not in second[b"A"].partitions]
    coord.leave(g, "b", {}, now=2.0)  # the revoke is cancelled ...
    # ... but a had already dropped the partitions and its Released was on the wire
    out = assigns(coord.released(g, "a", {p: 5 for p in moving}, now=2.1))
    assert b"A" in out, "nobody runs the released partitions"
    assert out[b"A"].grants == {p: 5 for p in moving}


# -- property: random join/leave/release sequences keep invariants --------------------------------
@settings(max_examples=100, deadline=None, database=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["join", "leave", "release", "ack", "expire"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(min_value=0, max_value=1000),
        ),
        max_size=40,
    ),
    partitions=st.integers(min_value=1, max_value=12),
)
def test_property_no_partition_has_two_runners(ops, partitions):
    coord = Coordinator(heartbeat_timeout=1e9, release_timeout=1e9)
    g = coord.add_group("g", partitions, [0] * partitions)
    # what each member believes it runs, from the Assign messages it got
    running: dict[str, set[int]] = {}
    ident = {m: m.encode() for m in "abcd"}
    by_ident = {v: k for k, v in ident.items()}
    high = [0] * partitions
    t = 0.0

    def apply(out):
        for who, msg in out:
            name = by_ident[who]
            if name not in g.members:
                continue
            running[name] = set(msg.partitions)

    for op, m, n in ops:
        t += 1.0
        if op == "join":
            if m in g.members:
                continue
            apply(coord.join(g, m, ident[m], now=t))
            running.setdefault(m, set())
        elif op == "leave":
            if m in g.members:
                apply(coord.leave(g, m, {}, now=t))
                running.pop(m, None)
        elif op == "release":
            if m in g.members:
                to_release = [p for p in range(partitions) if g.owner[p] == m and g.target[p] != m]
                apply(coord.released(g, m, {p: high[p] for p in to_release}, now=t))
        elif op == "ack":
            if m in g.members:
                for p in running.get(m, ()):
                    high[p] = max(high[p], g.cursors[p]) + n
                coord.ack(g, m, {p: high[p] for p in running.get(m, ())})
        else:
            apply(coord.expire(now=t))
        # invariants
        for p in range(partitions):
            runners = [name for name, parts in running.items() if p in parts]
            assert len(runners) <= 1, (p, runners)
            if runners:
                assert g.owner[p] == runners[0]
        if g.members:
            s = sizes(g.target, list(g.members))
            assert max(s) - min(s) <= 1 and sum(s) == partitions


# -- redelivery marks, process exits, rejoin after a router restart (issue 10, defect 7) ----------------
def test_unclean_mark_flags_every_grant_until_the_cursor_passes_it():
    heads = {"g": [100]}
    coord = Coordinator(heartbeat_timeout=HB, release_timeout=RELEASE, heads=heads)
    g = coord.add_group("g", 1, [10])  # a router start: whatever was handled is unknown
    assert assigns(coord.join(g, "a", b"A", now=0.0))[b"A"].redelivered == {0: 100}
    coord.join(g, "b", b"B", now=1.0)  # a keeps the only partition
    # a hands it over (a clean leave) before it got to 100: b must flag up to 100 too
    out = assigns(coord.leave(g, "a", {0: 50}, now=2.0))
    assert out[b"B"].grants == {0: 50} and out[b"B"].redelivered == {0: 100}
    coord.ack(g, "b", {0: 120})
    heads["g"][0] = 130
    coord.exited(g, "b", 0, {}, now=3.0)  # the launcher saw b die at head 130
    out = assigns(coord.join(g, "c", b"C", now=4.0))
    assert out[b"C"].grants == {0: 120} and out[b"C"].redelivered == {0: 130}
    coord.ack(g, "c", {0: 130})
    coord.leave(g, "c", {}, now=5.0)
    out = assigns(coord.join(g, "d", b"D", now=6.0))
    assert out[b"D"].grants == {0: 130} and out[b"D"].redelivered == {}
    assert g.unclean == {}


def test_a_forced_release_flags_the_new_owner_up_to_the_head():
    # the old owner never released (a stuck handler): it may have handled events past
    # its last ack, so the new owner must see them as possible repeats (ctx.redelivered)
    heads = {"g": [100, 100]}
    coord = Coordinator(heartbeat_timeout=HB, release_timeout=RELEASE, heads=heads)
    g = coord.add_group("g", 2, [10, 10])
    assigns(coord.join(g, "a", b"A", now=0.0))
    coord.ack(g, "a", {0: 100, 1: 100})  # a handled everything so far
    coord.join(g, "b", b"B", now=1.0)  # b waits for the partition a must hand over
    moving = [p for p in range(2) if g.target[p] == "b"]
    assert len(moving) == 1
    heads["g"] = [180, 180]  # more arrived; a holds it and never releases
    for t in (5.0, 10.0, 20.0, 30.0, 31.5):
        coord.seen(g, "a", None, now=t)
        coord.seen(g, "b", None, now=t)
    out = assigns(coord.expire(now=RELEASE + 1.0 + 0.01))
    assert out[b"B"].grants == {moving[0]: 100}
    assert out[b"B"].redelivered == {moving[0]: 180}


def test_lost_frees_the_partitions_at_once(coord):
    g, _, _ = setup_two(coord)
    out = assigns(coord.exited(g, "b", 0, {}, now=2.0))
    assert "b" not in g.members and set(out) == {b"A"}
    assert coord.exited(g, "b", 0, {}, now=2.0) == []  # told twice: nothing more


def test_members_surviving_a_router_restart_get_their_partitions_back(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    a = assigns(coord.join(g, "a", b"A", now=0.0, holding={0: 20, 1: 30}))
    # only what it holds: the others wait for their holder to rejoin
    assert a[b"A"].partitions == [0, 1] and a[b"A"].grants == {0: 20, 1: 30}
    b = assigns(coord.join(g, "b", b"B", now=0.5, holding={2: 5, 3: 7}))
    assert b[b"B"].partitions == [2, 3] and b[b"B"].grants == {2: 5, 3: 7}
    assert b"A" not in b  # nothing moved for a
    assert g.settle_until == 0.0  # every partition back: settled early
    c = assigns(coord.join(g, "c", b"C", now=1.0))  # a fresh member later: an ordinary rebalance
    assert c[b"C"].partitions == [] and (c.get(b"A") or c.get(b"B")).partitions


def test_unclaimed_partitions_wait_for_the_rejoin_grace(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    a = assigns(coord.join(g, "a", b"A", now=0.0, holding={0: 3}))
    assert a[b"A"].partitions == [0]
    assert coord.expire(now=HB / 2) == []  # still waiting for the other holders
    coord.seen(g, "a", None, now=HB / 2)
    late = assigns(coord.expire(now=HB + 0.1))
    assert late[b"A"].partitions == [0, 1, 2, 3]


def test_a_fresh_start_does_not_wait(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    a = assigns(coord.join(g, "a", b"A", now=0.0, holding={}))
    assert a[b"A"].partitions == [0, 1, 2, 3] and g.settle_until == 0.0


def test_a_router_restarted_under_live_members_holds_back_for_them(coord):
    g = coord.add_group("g", 4, [0, 0, 0, 0])
    coord.expect_rejoin(now=0.0)
    fresh = assigns(coord.join(g, "new", b"N", now=0.1))  # a restarted member is back first
    assert fresh[b"N"].partitions == []
    old = assigns(coord.join(g, "old", b"O", now=0.2, holding={1: 9, 2: 9}))
    assert old[b"O"].partitions == [1, 2]
    coord.seen(g, "new", None, now=HB)
    coord.seen(g, "old", None, now=HB)
    out = assigns(coord.expire(now=HB + 0.1))
    assert sorted(out[b"N"].partitions) == [0, 3]


def test_an_ack_past_the_journal_end_is_clamped():
    """Review #2: an ack (a fetch's upto from a misread, or any coord peer) never moves a
    cursor past the journal's last seq: events accepted later would count as handled."""
    last = [100]
    coord = Coordinator(heartbeat_timeout=HB, release_timeout=RELEASE, end=lambda: last[0])
    g = coord.add_group("g", 2, [10, 200])  # partition 1: a cursor already past the end
    assigns(coord.join(g, "a", b"A", now=0.0))
    coord.ack(g, "a", {0: 1 << 62, 1: 1 << 62})
    assert g.cursors == [100, 200]  # clamped; one past the end is not moved back
    last[0] = 150
    coord.ack(g, "a", {0: 120})
    assert g.cursors[0] == 120


def test_a_rejoin_claim_past_the_journal_end_is_clamped():
    """Review #4: after a torn tail was cut on router restart, a surviving member claims a
    handled position past the journal's last seq: the cursor stops at the last seq, so
    events accepted from now on (seqs above it) are delivered, not counted as handled."""
    coord = Coordinator(heartbeat_timeout=HB, release_timeout=RELEASE, end=lambda: 50)
    g = coord.add_group("g", 2, [40, 0])
    a = assigns(coord.join(g, "a", b"A", now=0.0, holding={0: 80, 1: 30}))
    assert a[b"A"].grants == {0: 50, 1: 30}
    assert g.cursors == [50, 30]

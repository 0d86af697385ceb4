"""Unit tests for nexus/member/stream.py: one partition stream as a member sees it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.member.stream import PartitionStream


def test_new_stream_starts_at_cursor():
    s = PartitionStream(3, cursor=10)
    assert s.partition == 3
    assert s.watermark == 10
    assert s.handled_upto() == 10  # acked up to the cursor
    assert not s.queue


def test_take_queues_newer_and_moves_watermark():
    s = PartitionStream(0, cursor=10)
    n = s.take([11, 14, 20], ["a", "b", "c"], upto=20)
    assert n == 3
    assert list(s.queue) == [(11, "a"), (14, "b"), (20, "c")]
    assert s.watermark == 20


def test_take_drops_seqs_at_or_below_watermark():
    s = PartitionStream(0, cursor=10)
    n = s.take([8, 10, 12, 13], ["x", "y", "a", "b"], upto=13)
    assert n == 2
    assert list(s.queue) == [(12, "a"), (13, "b")]
    assert s.take([12, 13], ["a", "b"], upto=13) == 0  # a live duplicate of a fetched range
    assert len(s.queue) == 2


def test_take_all_old_changes_nothing():
    s = PartitionStream(0, cursor=50)
    assert s.take([10, 20, 50], ["a", "b", "c"], upto=50) == 0
    assert s.watermark == 50 and not s.queue


def test_watermark_moves_to_upto_even_without_events():
    s = PartitionStream(0, cursor=10)
    assert s.take([], [], upto=40) == 0
    assert s.watermark == 40
    assert s.handled_upto() == 40
    s.take([41], ["a"], upto=60)  # a fetch reply covering up to 60
    assert s.watermark == 60


def test_watermark_never_goes_back():
    s = PartitionStream(0, cursor=10)
    s.take([15], ["a"], upto=15)
    s.take([], [], upto=12)
    assert s.watermark == 15
    s.take([], [], upto=3)
    assert s.watermark == 15


def test_handled_upto_with_queue():
    s = PartitionStream(0, cursor=10)
    s.take([15, 18], ["a", "b"], upto=18)
    assert s.handled_upto() == 14
    s.queue.popleft()  # 15 handled
    assert s.handled_upto() == 17
    s.queue.popleft()
    assert s.handled_upto() == 18


def test_needs_fetch():
    s = PartitionStream(0, cursor=10)
    assert not s.needs_fetch(0)
    assert not s.needs_fetch(9)
    assert not s.needs_fetch(10)  # prev == what we have seen: contiguous
    assert s.needs_fetch(11)  # an event between 10 and this delivery was missed
    s.take([12], ["a"], upto=12)
    assert not s.needs_fetch(12)
    assert s.needs_fetch(13)


@settings(max_examples=100, deadline=None, database=None)
@given(
    cursor=st.integers(min_value=0, max_value=50),
    deliveries=st.lists(st.lists(st.integers(min_value=0, max_value=120), max_size=6, unique=True), max_size=10),
)
def test_property_queue_is_increasing_and_above_cursor(cursor, deliveries):
    s = PartitionStream(0, cursor=cursor)
    seen = set()
    for seqs in deliveries:
        seqs = sorted(seqs)
        upto = seqs[-1] if seqs else 0
        before = s.watermark
        n = s.take(seqs, [f"e{x}" for x in seqs], upto=upto)
        assert n == len([x for x in seqs if x > before])
        assert s.watermark == max(before, upto)
        seen.update(x for x in seqs if x > before)
    queued = [q for q, _ in s.queue]
    assert queued == sorted(set(queued))  # strictly increasing: no duplicates
    assert all(q > cursor for q in queued)
    assert set(queued) == seen
    assert s.handled_upto() == (queued[0] - 1 if queued else s.watermark)


def test_drop_queued_moves_the_watermark_back_to_what_was_handled():
    from nexus.member.stream import PartitionStream

    st = PartitionStream(0, cursor=10)
    st.take([11, 12, 13], ["a", "b", "c"], 13)
    assert st.drop_queued() == 3
    assert st.watermark == 10 and not st.queue  # 11..13 will be fetched again


def test_drop_queued_keeps_the_event_in_flight():
    from nexus.member.stream import PartitionStream

    st = PartitionStream(0, cursor=10)
    st.take([11, 12, 13], ["a", "b", "c"], 13)
    st.busy = True
    assert st.drop_queued() == 2
    assert list(st.queue) == [(11, "a")] and st.watermark == 11

"""The member's dedup window (nexus.member.stream.RecentIds): one add per handled event.

Measured in steady state, i.e. once the window is full and adds evict old ids, next to
two reference implementations of the same bounded FIFO set (one evicting per add).
"""

from __future__ import annotations

import collections
import itertools

import pytest

from nexus.member.stream import RecentIds

from .conftest import per_event

CAPACITY = 100_000  # WorkerGroupConfig.dedup_window default
ADDS = 50_000  # per round


class DequeRecent:
    """Reference (the previous RecentIds): a set plus a FIFO deque, one eviction per add."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: set[str] = set()
        self._order: collections.deque[str] = collections.deque()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        if event_id in self._ids:
            return
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())


class OrderedRecent:
    """Reference: OrderedDict FIFO, O(1) eviction."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


@pytest.mark.parametrize(
    "impl",
    [RecentIds, DequeRecent, OrderedRecent],
    ids=["nexus.RecentIds (set, generations)", "ref-set+deque", "ref-OrderedDict"],
)
def test_dedup_add_steady_state(benchmark, impl):
    """ADDS adds (+ a membership check each, as the dispatcher does) on a full window."""
    recent = impl(CAPACITY)
    counter = itertools.count()
    for _ in range(CAPACITY):
        recent.add(f"{next(counter):036d}")
    ids = [[f"{next(counter):036d}" for _ in range(ADDS)] for _ in range(4)]
    rounds = iter(ids)

    def run():
        for event_id in next(rounds):
            if event_id not in recent:
                recent.add(event_id)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    per_event(benchmark, ADDS)

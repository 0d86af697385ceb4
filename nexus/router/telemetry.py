"""The router's metrics: its registry, the instruments the loop records into, and what
is read from the router's parts when a snapshot is taken.

Recorded as things happen (each a dict add, per batch or per loop turn, never per
event): accepted and rejected events (intake, counted per batch), journal append and
fsync times (journal), fetches served, the loop tick's lateness. Read at snapshot time
(once per scrape, in the router loop): journal size, lag and cursors per partition from
the incremental backlog (no journal read), dead letters stored, connections, storage
state, intake duplicates. Names and help: nexus/common/metricnames.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from nexus.common import metricnames as names
from nexus.common.metrics import Key, Registry
from nexus.router.backlog import Backlog
from nexus.router.coordinator import Coordinator
from nexus.router.intake import Intake
from nexus.router.journal import Journal
from nexus.router.storage import StorageState

LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RouterTelemetry:
    def __init__(
        self,
        intake: Intake,
        journal: Journal,
        backlog: Backlog,
        coordinator: Coordinator,
        storage: StorageState,
        dead_letters: Callable[[], dict[str, int]],
        producers: Callable[[], int],
    ) -> None:
        self.intake, self.journal, self.backlog = intake, journal, backlog
        self.coordinator, self.storage = coordinator, storage
        self.dead_letters, self.producers = dead_letters, producers
        reg = self.registry = Registry()
        reg.add(intake.accepted_by)
        reg.add(intake.rejected_by)
        reg.add(journal.append_seconds)
        reg.add(journal.fsync_seconds)
        self.fetches = reg.counter(names.FETCHES, ("group",))
        self.loop_lag = reg.histogram(names.LOOP_LAG, LOOP_LAG_BUCKETS)
        self.loop_lag.cell()
        self._duplicates = reg.counter(names.DUPLICATES, ("stage",))
        self._bytes = reg.gauge(names.JOURNAL_BYTES)
        self._segments = reg.gauge(names.JOURNAL_SEGMENTS)
        self._last_seq = reg.gauge(names.JOURNAL_LAST_SEQ)
        self._group_lag = reg.gauge(names.GROUP_LAG, ("group",))
        self._partition_lag = reg.gauge(names.PARTITION_LAG, ("group", "partition"))
        self._cursor = reg.gauge(names.PARTITION_CURSOR, ("group", "partition"))
        self._dead = reg.gauge(names.DEAD_LETTERS, ("group",))
        self._producers = reg.gauge(names.PRODUCERS)
        self._storage_ok = reg.gauge(names.STORAGE_OK)
        reg.on_collect(self._collect)

    def snapshot(self) -> dict:
        return self.registry.snapshot()

    def _collect(self) -> None:
        journal = self.journal
        self._duplicates.set(self.intake.duplicates_total, ("intake",))
        self._bytes.set(sum(s.size for s in journal.segments))
        self._segments.set(len(journal.segments))
        self._last_seq.set(journal.last_seq)
        self._storage_ok.set(1 if self.storage.ok else 0)
        self._producers.set(self.producers())
        group_lag: dict[Key, float] = {}
        partition_lag: dict[Key, float] = {}
        cursor: dict[Key, float] = {}
        for name, group in self.coordinator.groups.items():
            streams = self.backlog.streams.get(name, [])
            total = 0
            for p, (st, at) in enumerate(zip(streams, group.cursors, strict=False)):
                n, _exact = st.after(at)  # (inexact: at least n; status shows ">=n")
                total += n
                partition_lag[(name, str(p))] = n
                cursor[(name, str(p))] = at
            group_lag[(name,)] = total
        self._group_lag.replace(group_lag)
        self._partition_lag.replace(partition_lag)
        self._cursor.replace(cursor)
        try:
            dead = self.dead_letters()
        except sqlite3.OperationalError:  # locked by another process: keep the last counts
            return
        self._dead.replace({(g,): float(dead.get(g, 0)) for g in self.coordinator.groups})

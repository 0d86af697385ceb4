"""A member's metrics: its registry, sent with every heartbeat (the router keeps the
latest for scrapes, nexus/router/admin.py `metrics`).

The per-call histograms (handler duration, event latency) are the scheduler's, observed
inline on the call's own clock reads; everything else is a count the member keeps
anyway (for `nexus status`), read when the heartbeat thread takes a snapshot. Series
carry no group or member label: the exposition adds both (nexus/http/exposition.py).
"""

from __future__ import annotations

from nexus.common import metricnames as names
from nexus.common.metrics import Registry
from nexus.member.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from nexus.member.fetcher import Fetcher
from nexus.member.handlers import Handler
from nexus.member.outcomes import OutcomePolicy
from nexus.member.scheduler import Scheduler

BREAKER_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class MemberTelemetry:
    def __init__(
        self,
        scheduler: Scheduler,
        outcomes: OutcomePolicy,
        fetcher: Fetcher,
        handler: Handler,
        breaker: CircuitBreaker,
    ) -> None:
        self.scheduler, self.outcomes, self.fetcher = scheduler, outcomes, fetcher
        self.handler, self.breaker = handler, breaker
        reg = self.registry = Registry()
        reg.add(scheduler.duration)
        reg.add(scheduler.latency)
        self._outcomes = reg.counter(names.OUTCOMES, ("outcome",))
        self._redeliveries = reg.counter(names.REDELIVERIES)
        self._gap_repairs = reg.counter(names.GAP_REPAIRS)
        self._duplicates = reg.counter(names.DUPLICATES, ("stage",))
        self._breaker = reg.gauge(names.BREAKER)
        reg.on_collect(self._collect)

    def snapshot(self) -> dict:
        """(From the heartbeat thread: it reads counts the loop writes; each read is whole.)"""
        return self.registry.snapshot()

    def _collect(self) -> None:
        sched, outcomes = self.scheduler, self.outcomes
        out = self._outcomes
        out.set(sched.handled, ("ok",))
        out.set(outcomes.retried, ("retried",))
        out.set(outcomes.dead_lettered, ("dead_lettered",))
        out.set(sched.timeouts, ("timed_out",))
        self._redeliveries.set(self.handler.redeliveries)
        self._gap_repairs.set(self.fetcher.gap_repairs)
        self._duplicates.set(sched.duplicates_dropped, ("member",))
        self._breaker.set(BREAKER_VALUE.get(self.breaker.state, 0))

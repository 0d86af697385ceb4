"""The ingest's metrics, in the router's names (nexus/common/metricnames.py), so a
dashboard reads both engines alike: events accepted (counted once stored, as the router
counts them once journaled) and rejected by reason, type and source, and duplicates
dropped per stage ("intake": a resent producer seq; "stream": a msg id JetStream had)."""

from __future__ import annotations

from nexus.common import metricnames as names
from nexus.common.metrics import Registry
from nexus.jsingest.publisher import Publisher
from nexus.router.intake import Intake


class IngestTelemetry:
    def __init__(self, intake: Intake, publisher: Publisher):
        self.intake, self.publisher = intake, publisher
        reg = self.registry = Registry()
        reg.add(intake.accepted_by)
        reg.add(intake.rejected_by)
        self._duplicates = reg.counter(names.DUPLICATES, ("stage",))
        reg.on_collect(self._collect)

    def snapshot(self) -> dict:
        return self.registry.snapshot()

    def _collect(self) -> None:
        self._duplicates.set(self.intake.duplicates_total, ("intake",))
        self._duplicates.set(self.publisher.duplicates, ("stream",))

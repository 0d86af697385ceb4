"""Placeholder of the METRICS helper's module (issue 13): the pipeline's metrics
snapshot and its Prometheus text. Only `nexus_ready` and `nexus_process_up` here;
the full version (router and member series, histograms) replaces this file."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


def merge(router_reply: dict | None, launcher_status: dict | None) -> dict:
    """One snapshot of the pipeline (here: the launcher's series only)."""
    gauges: dict[str, list] = {}
    if launcher_status is not None:
        gauges["nexus_ready"] = [[{}, 1.0 if launcher_status.get("ready") else 0.0]]
        gauges["nexus_process_up"] = [
            [
                {"name": p["name"], "role": p["role"], "group": p.get("group", "")},
                1.0 if p.get("state") == "running" else 0.0,
            ]
            for p in launcher_status.get("processes", [])
        ]
    return {"counters": {}, "gauges": gauges, "histograms": {}}


class _Snapshot:
    def __init__(self, snapshot: dict[str, Any]):
        self.snapshot = snapshot

    def collect(self):
        for name, series in self.snapshot.get("gauges", {}).items():
            labels = sorted({k for lbl, _ in series for k in lbl})
            family = GaugeMetricFamily(name, name, labels=labels)
            for lbl, value in series:
                family.add_metric([str(lbl.get(k, "")) for k in labels], value)
            yield family


def render(snapshot: dict) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST

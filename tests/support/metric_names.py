"""The metric names of the pipeline's /metrics, as the tests need them, taken from the one
table Nexus itself renders from (nexus/common/metricnames.py CATALOGUE):
tests/unit/test_deploy.py checks that every name the Grafana dashboard
(deploy/grafana/nexus-dashboard.json) queries is one of these."""

from __future__ import annotations

from nexus.common.metricnames import CATALOGUE

COUNTERS = {name: spec.labels for name, spec in CATALOGUE.items() if spec.kind == "counter"}
GAUGES = {name: spec.labels for name, spec in CATALOGUE.items() if spec.kind == "gauge"}
HISTOGRAMS = {name: spec.labels for name, spec in CATALOGUE.items() if spec.kind == "histogram"}
METRICS = {**COUNTERS, **GAUGES, **HISTOGRAMS}  # name -> its labels


def series_names() -> set[str]:
    """Every name a Prometheus query may use: histograms as _bucket, _sum and _count."""
    names = set(COUNTERS) | set(GAUGES)
    for name in HISTOGRAMS:
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names

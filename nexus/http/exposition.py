"""One Prometheus scrape for the whole pipeline: `merge` the router's metrics reply
(its own snapshot and its members', CoordClient.metrics) with the launcher's status
reply (ControlClient.status) into one snapshot, and `render` it as Prometheus text.

Snapshots are the format of nexus/common/metrics.py. Member series get `group` and
`member` labels here (a member records none). Launcher series are built from its status:
processes up and restarts, members desired and running per group, ready, and the
autoscaler's decisions when the status has them ("scale", "autoscale": optional keys).

Rendering goes through prometheus_client: a Collector yielding the metric families of
one snapshot, on a fresh CollectorRegistry, through generate_latest (escaping, number
formats and the content type are the library's). A member's snapshot is its own
process's word: a series that does not read as one is left out, never an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nexus.common import metricnames as names
from nexus.common.metrics import empty_snapshot

KINDS = ("counters", "gauges", "histograms")


# -- merge ------------------------------------------------------------------------------
def merge(router_reply: dict | None, launcher_status: dict | None) -> dict:
    """One snapshot of the pipeline; either part may be missing (None: not answering)."""
    out = empty_snapshot()
    if router_reply:
        _add(out, router_reply.get("router") or {}, {})
        members = router_reply.get("members") or {}
        for whose in sorted(members):
            group, _, member = str(whose).partition("/")
            _add(out, members[whose] or {}, {"group": group, "member": member})
    if launcher_status:
        _add(out, launcher_snapshot(launcher_status), {})
    return out


def _add(out: dict, snapshot: dict, extra: dict[str, str]) -> None:
    """Copy `snapshot`'s well-formed series into `out`, with `extra` labels first."""
    if not isinstance(snapshot, dict):
        return
    for kind in KINDS:
        metrics = snapshot.get(kind)
        if not isinstance(metrics, dict):
            continue
        for name, series in metrics.items():
            if not isinstance(name, str) or not isinstance(series, list):
                continue
            kept = out[kind].setdefault(name, [])
            for item in series:
                checked = _series(kind, item)
                if checked is not None:
                    labels, value = checked
                    kept.append([{**extra, **labels}, value])


def _series(kind: str, item: Any) -> tuple[dict[str, str], Any] | None:
    try:
        labels, value = item
        labels = {str(k): str(v) for k, v in labels.items()}
        if kind != "histograms":
            return labels, float(value)
        buckets = [[float(le), float(n)] for le, n in value["buckets"]]
        return labels, {"buckets": buckets, "sum": float(value["sum"]), "count": float(value["count"])}
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def launcher_snapshot(status: dict) -> dict:
    """The launcher's series, from its status reply."""
    counters: dict[str, list] = {names.PROCESS_RESTARTS: [], names.AUTOSCALE_DECISIONS: []}
    gauges: dict[str, list] = {names.PROCESS_UP: [], names.MEMBERS_DESIRED: [], names.MEMBERS: []}
    desired: dict[str, int] = {}
    running: dict[str, int] = {}
    for proc in status.get("processes") or []:
        labels = {
            "name": str(proc.get("name", "")),
            "role": str(proc.get("role", "")),
            "group": str(proc.get("group") or ""),
        }
        up = proc.get("state") == "running"
        gauges[names.PROCESS_UP].append([labels, 1.0 if up else 0.0])
        counters[names.PROCESS_RESTARTS].append([labels, float(proc.get("restarts") or 0)])
        if labels["role"] == "worker" and labels["group"]:
            group = labels["group"]
            desired[group] = desired.get(group, 0) + (proc.get("state") not in ("stopped", "stopping"))
            running[group] = running.get(group, 0) + up
    launcher = status.get("launcher")
    if isinstance(launcher, dict):  # it answered: it is up
        gauges[names.PROCESS_UP].append([{"name": "launcher", "role": "launcher", "group": ""}, 1.0])
    scale = status.get("scale")
    if isinstance(scale, dict):  # the autoscaler's (or `nexus scale`'s) target wins over a count
        desired.update({str(g): int(n) for g, n in scale.items()})
    for group in sorted(set(desired) | set(running)):
        gauges[names.MEMBERS_DESIRED].append([{"group": group}, float(desired.get(group, 0))])
        gauges[names.MEMBERS].append([{"group": group}, float(running.get(group, 0))])
    for group, auto in sorted((status.get("autoscale") or {}).items()):
        decisions = auto.get("decisions") if isinstance(auto, dict) else None
        for direction in ("up", "down"):
            n = (decisions or {}).get(direction, 0)
            counters[names.AUTOSCALE_DECISIONS].append([{"group": str(group), "direction": direction}, float(n)])
    if "ready" in status:
        gauges[names.READY] = [[{}, 1.0 if status.get("ready") else 0.0]]
    return {"counters": counters, "gauges": gauges, "histograms": {}}


# -- render -----------------------------------------------------------------------------
def render(snapshot: dict) -> tuple[bytes, str]:
    """Prometheus text of a (merged) snapshot, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: dict):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for kind in KINDS:
            for name, series in sorted((self.snapshot.get(kind) or {}).items()):
                yield _family(kind, name, series)


def _help(name: str) -> str:
    spec = names.CATALOGUE.get(name)
    return spec.help if spec is not None else f"Nexus metric {name}."


def _family(kind: str, name: str, series: list) -> Metric:
    """One family; its series may differ in label names (a router's and a member's
    nexus_duplicates_dropped_total), so samples are added with their own labels."""
    doc = _help(name)
    if kind == "counters":
        counter = CounterMetricFamily(name, doc)
        for labels, value in series:
            counter.add_sample(counter.name + "_total", labels, value)
        return counter
    if kind == "gauges":
        gauge = GaugeMetricFamily(name, doc)
        for labels, value in series:
            gauge.add_sample(name, labels, value)
        return gauge
    hist = HistogramMetricFamily(name, doc)
    for labels, value in series:
        for le, n in value["buckets"]:
            hist.add_sample(name + "_bucket", {**labels, "le": floatToGoString(le)}, n)
        hist.add_sample(name + "_count", labels, value["count"])
        hist.add_sample(name + "_sum", labels, value["sum"])
    return hist

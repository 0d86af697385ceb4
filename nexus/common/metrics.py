"""A tiny in-process metrics registry: counters, gauges and fixed-bucket histograms kept
as plain Python numbers in dicts (label tuple -> value), and `snapshot()`, a msgpack-able
dict the router and members send over coord (the format is in docs/operations.md).

Why not prometheus_client here: the router takes ~150k events/s on one thread, and a
member calls its handler per event; their instruments must cost a dict lookup and an
add, with no lock (CPython's GIL keeps a single `+=` on a list item or dict value whole;
a snapshot taken from another thread copies each value at once, so it may lag an
observation by one, never tear it). prometheus_client renders the merged snapshots in
the launcher's HTTP process (nexus/http/exposition.py).

Label values a producer controls (an event's type and source) are capped: past `CAP`
distinct values per label of a metric, new ones count under "other"; and past
`SERIES_CAP` label tuples (200 types x 200 sources would still be 40,000), every capped
label of a new tuple reads "other". So a producer cannot grow the router's memory or the
scrape without bound.

Values kept elsewhere (a journal's size, a stream's lag, counts a component keeps for
`nexus status`) are read when a snapshot is taken, by the callbacks given to
`Registry.on_collect`: nothing is paid for them on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

CAP = 200  # distinct values per capped label of a metric
SERIES_CAP = 2000  # label tuples of a metric with capped labels; past it they all read OTHER
OTHER = "other"

Key = tuple[str, ...]

# seconds; the last bucket (+Inf) is implied
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DISK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HANDLER_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metric:
    """One metric: its label names and, per label tuple, its value."""

    kind = ""

    def __init__(self, name: str, labels: Sequence[str] = (), capped: Iterable[str] = ()):
        self.name = name
        self.labels = tuple(labels)
        self.values: dict[Key, Any] = {}
        self._capped = tuple(self.labels.index(label) for label in capped)  # positions
        self._seen: tuple[set[str], ...] = tuple(set() for _ in self._capped)

    def _admit(self, key: Key) -> Key:
        """A label tuple not seen before: a capped label's value past CAP distinct ones
        becomes OTHER (the key to count under)."""
        if len(key) != len(self.labels):
            raise ValueError(f"{self.name}: labels {self.labels}, got {key!r}")
        if not self._capped:
            return key
        out = list(key)
        full = len(self.values) >= SERIES_CAP
        for seen, i in zip(self._seen, self._capped, strict=True):
            value = out[i]
            if full:
                out[i] = OTHER
            elif value not in seen:
                if len(seen) >= CAP:
                    out[i] = OTHER
                else:
                    seen.add(value)
        return tuple(out)

    def clear(self) -> None:
        """Forget every label tuple (a gauge whose set of series is rebuilt per collect)."""
        self.values = {}

    def samples(self) -> list[list]:
        names = self.labels
        return [[dict(zip(names, key, strict=True)), value] for key, value in list(self.values.items())]


class Counter(Metric):
    kind = "counters"

    def inc(self, key: Key = (), n: float = 1) -> None:
        values = self.values
        if key in values:
            values[key] += n
        else:
            key = self._admit(key)
            values[key] = values.get(key, 0) + n

    def set(self, value: float, key: Key = ()) -> None:
        """A total kept elsewhere (read by a collect callback; it only grows)."""
        self.values[key] = value


class Gauge(Metric):
    kind = "gauges"

    def set(self, value: float, key: Key = ()) -> None:
        self.values[key] = value

    def replace(self, values: Mapping[Key, float]) -> None:
        """The whole set of series now (those not in `values` are gone)."""
        self.values = dict(values)


class Histogram(Metric):
    """Fixed buckets. Per label tuple a `cell`: a list of one count per bucket (the last
    for +Inf) and the sum of observations at the end. Hot code may hold a cell and
    `bounds` and observe inline: `cell[bisect_left(bounds, v)] += 1; cell[-1] += v`."""

    kind = "histograms"

    def __init__(
        self, name: str, buckets: Sequence[float], labels: Sequence[str] = (), capped: Iterable[str] = ()
    ) -> None:
        super().__init__(name, labels, capped)
        self.bounds = tuple(sorted(float(b) for b in buckets))

    def cell(self, key: Key = ()) -> list:
        cell = self.values.get(key)
        if cell is None:
            key = self._admit(key)
            cell = self.values.get(key)
            if cell is None:
                cell = self.values[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return cell

    def observe(self, value: float, key: Key = ()) -> None:
        cell = self.values.get(key) or self.cell(key)
        cell[bisect_left(self.bounds, value)] += 1
        cell[-1] += value

    def samples(self) -> list[list]:
        names, les = self.labels, (*self.bounds, float("inf"))
        out = []
        for key, cell in list(self.values.items()):
            cell = list(cell)  # one copy: counts and sum of the same moment
            buckets, total = [], 0
            for le, n in zip(les, cell, strict=False):
                total += n
                buckets.append([le, total])
            out.append([dict(zip(names, key, strict=True)), {"buckets": buckets, "sum": cell[-1], "count": total}])
        return out


class Registry:
    """The metrics of one process (or one component in tests: nothing is global)."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def add(self, metric: Metric) -> Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, labels: Sequence[str] = (), capped: Iterable[str] = ()) -> Counter:
        return self.add(Counter(name, labels, capped))  # type: ignore[return-value]

    def gauge(self, name: str, labels: Sequence[str] = ()) -> Gauge:
        return self.add(Gauge(name, labels))  # type: ignore[return-value]

    def histogram(
        self, name: str, buckets: Sequence[float], labels: Sequence[str] = (), capped: Iterable[str] = ()
    ) -> Histogram:
        return self.add(Histogram(name, buckets, labels, capped))  # type: ignore[return-value]

    def on_collect(self, collect: Callable[[], None]) -> None:
        """`collect()` runs before each snapshot: it sets values read from elsewhere."""
        self._collectors.append(collect)

    def snapshot(self) -> dict:
        for collect in self._collectors:
            collect()
        out: dict[str, dict[str, list]] = {"counters": {}, "gauges": {}, "histograms": {}}
        for name, metric in list(self.metrics.items()):
            out[metric.kind][name] = metric.samples()
        return out


def empty_snapshot() -> dict:
    return {"counters": {}, "gauges": {}, "histograms": {}}

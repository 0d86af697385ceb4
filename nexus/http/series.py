"""The dashboard's chart data: one point a second (accepted events/s, event latency
p50/p99, lag per group) kept for the last ten minutes. Pure bookkeeping over the
status and metrics replies the sampler fetched; no sockets here."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

HISTORY = 600  # points: ten minutes at one a second
LATENCY = "nexus_event_latency_seconds"  # member histogram: producer's event time -> handler start

Buckets = list[tuple[float, float]]  # (le, cumulative count), le ascending, the last inf


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding the rank; the
    +Inf bucket answers its lower bound. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


class LatencyDelta:
    """Event latency over the last interval, from the members' cumulative histograms:
    the difference to the previous sample, per member (a restarted member's counts
    start again from zero: then its whole histogram is the interval's)."""

    def __init__(self) -> None:
        self.previous: dict[str, dict[float, float]] = {}

    def step(self, metrics_reply: dict[str, Any] | None) -> Buckets | None:
        if not metrics_reply:
            return None
        current: dict[str, dict[float, float]] = {}
        for member, snapshot in (metrics_reply.get("members") or {}).items():
            for labels, hist in (snapshot.get("histograms") or {}).get(LATENCY, []):
                key = f"{member}|{sorted(labels.items())}"
                current[key] = {float(le): float(c) for le, c in hist.get("buckets", [])}
        total: dict[float, float] = {}
        for key, counts in current.items():
            before = self.previous.get(key, {})
            reset = any(counts.get(le, 0.0) < c for le, c in before.items())
            for le, c in counts.items():
                total[le] = total.get(le, 0.0) + (c if reset else c - before.get(le, 0.0))
        self.previous = current
        return sorted(total.items()) if total else None


class Series:
    """The ring of points the charts draw."""

    def __init__(self, size: int = HISTORY) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=size)
        self.latency = LatencyDelta()
        self.last: tuple[float, int] | None = None  # (monotonic time, router's accepted total)

    def add(
        self, now: float, wall: float, router: dict[str, Any] | None, metrics: dict | None, latency: bool = True
    ) -> dict[str, Any]:
        """One point. Without `latency` (the metrics were not asked for this time) the
        point has no p50/p99 keys at all: the chart joins the points around it, where
        None (asked, no answer or no events) breaks the line."""
        point: dict[str, Any] = {"t": round(wall, 3), "rate": None, "lag": {}}
        if router is not None:
            accepted = int(router.get("router", {}).get("accepted", 0))
            if self.last is not None and accepted >= self.last[1] and now > self.last[0]:
                point["rate"] = round((accepted - self.last[1]) / (now - self.last[0]), 2)
            self.last = (now, accepted)  # (a restarted router counts from 0: one gap)
            point["lag"] = {
                name: g["lag"] for name, g in router.get("groups", {}).items() if isinstance(g.get("lag"), int)
            }
        if latency:
            buckets = self.latency.step(metrics)
            point["p50"], point["p99"] = (quantile(0.5, buckets), quantile(0.99, buckets)) if buckets else (None, None)
        self.points.append(point)
        return point

    def history(self) -> list[dict[str, Any]]:
        return list(self.points)

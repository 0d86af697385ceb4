"""`--scrape-metrics`: scrape the pipeline's metrics once a second during a benchmark run,
as Prometheus would through the launcher's HTTP port (the router's metrics request and
the launcher's status, merged and rendered by nexus/http/exposition.py), so the cost of
being scraped shows in the run's own figures."""

from __future__ import annotations

import threading
import time

from nexus.errors import NexusError
from nexus.http import exposition
from nexus.protocol.client import ControlClient, CoordClient
from nexus.protocol.curve import client_keys


class Scraper:
    def __init__(self, cfg, every: float = 1.0):
        keys = client_keys(cfg)
        self.coord = CoordClient(cfg.coord, 5.0, curve=keys)
        self.control = ControlClient(cfg.control_endpoint, 5.0, curve=keys)
        self.every = every
        self.took: list[float] = []  # seconds per scrape (request, merge, render)
        self.bytes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(10)
        took = sorted(self.took)
        return {
            "scrapes": len(took),
            "mean_ms": round(sum(took) / len(took) * 1000, 2) if took else None,
            "max_ms": round(took[-1] * 1000, 2) if took else None,
            "bytes": self.bytes,
            "errors": self.errors[:5],
        }

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.every
            started = time.perf_counter()
            try:
                text, _ = exposition.render(exposition.merge(self.coord.metrics(), self.control.status()))
            except NexusError as exc:
                self.errors.append(str(exc))
                continue
            self.took.append(time.perf_counter() - started)
            self.bytes = len(text)

"""`--scrape-metrics`: scrape the pipeline's `/metrics` once a second during a benchmark
run, as Prometheus would: a real HTTP GET on the launcher's HTTP port (the run then has
its `http` process, which the run without scraping does not), so the cost of the port
and of being scraped shows in the run's own figures."""

from __future__ import annotations

import secrets
import threading
import time
import urllib.error
import urllib.request

TOKEN = secrets.token_hex(16)  # the benchmark config's http.token


class Scraper:
    def __init__(self, listen: str, every: float = 1.0):
        self.url = f"http://{listen}/metrics"
        self.every = every
        self.took: list[float] = []  # seconds per scrape (the whole HTTP request)
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
        request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {TOKEN}"})
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.every
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    text = answer.read()
            except (OSError, urllib.error.URLError) as exc:
                self.errors.append(str(exc))
                continue
            self.took.append(time.perf_counter() - started)
            self.bytes = len(text)

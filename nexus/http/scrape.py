"""The /metrics answer, off the event loop and shared: the router's metrics reply and
the launcher's status are fetched, merged and rendered in a worker thread (a big
pipeline's scrape is megabytes of text and a quarter second of CPU, during which
/healthz must still answer), and every scrape that arrives while one is being made, or
within MAX_AGE of its start, gets that same answer (six Prometheus servers, or a
reload storm, cost the router one snapshot a second)."""

from __future__ import annotations

import asyncio

from nexus.http import exposition
from nexus.http.peers import Peers

MAX_AGE = 1.0  # seconds an answer is served again


class SharedScrape:
    def __init__(self, peers: Peers):
        self.peers = peers
        self.answer: tuple[bytes, str] | None = None
        self.started = 0.0  # loop time the answer's fetch began
        self.pending: asyncio.Task[tuple[bytes, str]] | None = None

    async def get(self) -> tuple[bytes, str]:
        """(body, content type) of one Prometheus text scrape."""
        loop = asyncio.get_running_loop()
        if self.answer is not None and loop.time() - self.started < MAX_AGE:
            return self.answer
        if self.pending is None:
            self.pending = loop.create_task(self._make(loop.time()))
        # shielded: a scraper that hangs up does not cancel the answer the others wait for
        return await asyncio.shield(self.pending)

    async def _make(self, started: float) -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        try:
            reply, launcher = await asyncio.gather(
                loop.run_in_executor(None, self.peers.router_metrics),
                loop.run_in_executor(None, self.peers.launcher_status),
            )
            answer = await loop.run_in_executor(None, _render, reply, launcher)
        finally:
            self.pending = None
        self.answer, self.started = answer, started
        return answer


def _render(reply: dict | None, launcher: dict | None) -> tuple[bytes, str]:
    return exposition.render(exposition.merge(reply, launcher))

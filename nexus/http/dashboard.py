"""The dashboard's server side: the sampler (one look at the pipeline a second, kept
for the charts), the server-sent-events stream each open page reads, and the
dead-letter actions (list, show, replay, purge, as `nexus dlq` does them)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import structlog
from aiohttp import web

from nexus.errors import NexusError
from nexus.http import health
from nexus.http.peers import Peers
from nexus.http.series import Series
from nexus.http.tail import TailFeed

log = structlog.get_logger("nexus.http")

SAMPLE_EVERY = 1.0  # seconds
# The metrics snapshot (for the latency chart) is the router's most expensive answer
# (every partition's series): asked every sample only while a page is open, else every
# METRICS_IDLE_EVERY, so a page that opens still finds ten minutes of (coarser) latency.
METRICS_IDLE_EVERY = 10.0  # seconds
MAX_STREAMS = 32  # open pages (/api/stream); each holds a connection and a tail watcher
KEEPALIVE = 15.0  # seconds of silence on a stream before a comment line (proxies close idle ones)
MAX_IDS = 1000  # dead letters per action from the page


class Sampler:
    """Every second: the launcher's and the router's status (cheap), and the metrics
    while a page is open (else every METRICS_IDLE_EVERY), to one `state` the pages
    show and one chart point."""

    def __init__(self, peers: Peers, feed: TailFeed):
        self.peers = peers
        self.feed = feed
        self.series = Series()
        self.state: dict[str, Any] = {}
        self.version = 0
        self.metrics_at = -math.inf  # monotonic time metrics were last asked for

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                await self.sample(loop)
            except Exception as exc:  # one bad sample must not end the dashboard
                log.error("dashboard_sample_failed", error=str(exc))
            delay = max(0.05, SAMPLE_EVERY - (loop.time() - started))
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    async def sample(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        latency = bool(self.feed.watchers) or now - self.metrics_at >= METRICS_IDLE_EVERY - SAMPLE_EVERY / 2
        asks = [self.peers.launcher_status, self.peers.router_status]
        if latency:
            self.metrics_at = now
            asks.append(self.peers.router_metrics)
        replies = await asyncio.gather(*(loop.run_in_executor(None, ask) for ask in asks))
        launcher, router = replies[0], replies[1]
        point = self.series.add(now, time.time(), router, replies[2] if latency else None, latency=latency)
        self.state = describe(launcher, router, point)
        self.version += 1
        for w in list(self.feed.watchers):
            w.wake.set()


def describe(launcher: dict | None, router: dict | None, point: dict) -> dict[str, Any]:
    """What a page shows, from the two status replies."""
    r = (router or {}).get("router", {})
    groups = {}
    for name, g in (router or {}).get("groups", {}).items():
        groups[name] = {
            "partitions": g.get("partitions", 0),
            "unassigned": g.get("unassigned", 0),
            "lag": g.get("lag", 0),
            "dead_letters": g.get("dead_letters", 0),
            "members": [
                {k: m.get(k) for k in ("name", "host", "pid", "handled", "failed", "dead_lettered", "breaker")}
                | {"partitions": len(m.get("partitions", []))}
                for m in g.get("members", [])
            ],
        }
    return {
        "t": point["t"],
        "health": health.verdict(launcher, router),
        "processes": (launcher or {}).get("processes", []),
        "groups": groups,
        "router": {k: r.get(k) for k in ("accepted", "rejected", "duplicates", "seq", "uptime", "tail_subscribers")}
        | {"journal_bytes": r.get("journal", {}).get("bytes")},
        "point": point,
    }


def _event(name: str, data: Any) -> bytes:
    # json.dumps escapes newlines: the data stays on its one `data:` line
    return f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /api/stream?tail=GLOB: `history` (the chart points) once, then `state` every
    sample and `tail` with the new events whose type matches GLOB."""
    app = request.app
    sampler: Sampler = app["sampler"]
    feed: TailFeed = app["feed"]
    stopping: asyncio.Event = app["stopping"]
    if len(feed.watchers) >= MAX_STREAMS:
        return web.Response(status=503, text=f"too many open dashboard pages ({MAX_STREAMS}): close one\n")
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    # watching before the headers go out: once the page sees the stream open, no event is missed
    watcher = feed.watch(request.query.get("tail", "*")[:200])
    seen = sampler.version
    try:
        await resp.prepare(request)
        await resp.write(_event("history", {"points": sampler.series.history()}))
        if sampler.state:
            await resp.write(_event("state", sampler.state))
        dropped = 0
        while not stopping.is_set():
            try:
                await asyncio.wait_for(watcher.wake.wait(), KEEPALIVE)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            watcher.wake.clear()
            lines = watcher.take()
            if lines or watcher.dropped != dropped:
                dropped = watcher.dropped
                await resp.write(_event("tail", {"lines": lines, "dropped": dropped}))
            if sampler.version != seen:
                seen = sampler.version
                await resp.write(_event("state", sampler.state))
    except ConnectionError:
        pass  # the page went away
    finally:
        feed.unwatch(watcher)
    return resp


# -- dead letters ---------------------------------------------------------------------------
async def _ask(request: web.Request, action: str, ids: list[int] | None = None) -> web.Response:
    peers: Peers = request.app["peers"]
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, peers.dead_letters, action, ids)
    except NexusError as exc:
        return web.json_response({"ok": False, "error": str(exc)}, status=502)
    if "error" in result:
        return web.json_response({"ok": False, "error": result["error"]}, status=400)
    return web.json_response({"ok": True, **result}, dumps=lambda d: json.dumps(d, default=str))


async def dead_letters(request: web.Request) -> web.Response:
    return await _ask(request, "list")


async def dead_letter(request: web.Request) -> web.Response:
    try:
        row_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"ok": False, "error": "a dead letter id is a number"}, status=400)
    return await _ask(request, "show", [row_id])


async def dead_letter_action(request: web.Request) -> web.Response:
    """POST /api/deadletters/{replay,purge} {"ids": [...]}: the ones named, never all."""
    action = request.match_info["action"]
    try:
        body = await request.json()
        ids = body["ids"]
        if not (isinstance(ids, list) and 0 < len(ids) <= MAX_IDS and all(type(i) is int for i in ids)):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return web.json_response(
            {"ok": False, "error": f'expected {{"ids": [1 to {MAX_IDS} dead letter ids]}}'}, status=400
        )
    log.warning("dashboard_dead_letters", action=action, ids=ids[:20], count=len(ids))
    return await _ask(request, action, ids)

"""`POST /v1/events`: one event or an array, JSON or msgpack, answered per event after
the router journaled (or refused) each one.

Status codes (docs/http-api.yaml):
- 200: every event accepted (journaled now, or earlier: `duplicate`);
- 207: at least one event rejected (each result says why: the router's NACK reason, or
  `malformed: ...` for an element that is not an event); the others were accepted;
- 400 malformed body, 401 no or bad token, 403 a source or type the token may not send
  (nothing of the request was sent), 413 body over `gateway.max_body` or more than
  `gateway.max_batch` events, 415 neither JSON nor msgpack, 429 over the token's rate
  (Retry-After), each with a one-line `{"error": ...}`;
- 503: the router gave no verdict for some events within SETTLE_TIMEOUT (down or
  restarting); the body has the results known so far and `pending` for the rest.
  Retrying with the same ids is safe: an id is never journaled twice (ledger.py).
"""

from __future__ import annotations

import asyncio
import math

import aiohttp
import msgspec
from aiohttp import web

from nexus.config import GatewayConfig
from nexus.gateway import events
from nexus.gateway.access import Access, refuse
from nexus.gateway.upstream import Result, Upstream

SETTLE_TIMEOUT = 10.0  # seconds a request waits for the router's verdicts before its 503
ROUTE = "events"


class Ingest:
    def __init__(self, gw: GatewayConfig, access: Access, upstream: Upstream):
        self.max_body = gw.max_body
        self.max_batch = gw.max_batch
        self.access = access
        self.upstream = upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._handle(request)
        self.access.metrics.requests.labels(ROUTE, str(response.status)).inc()
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        grant = self.access.authenticate(request)
        if isinstance(grant, web.Response):
            return grant
        msgpack = events.is_msgpack(request.content_type)
        if not msgpack and request.content_type != events.JSON:
            return refuse(415, "send Content-Type: application/json or application/msgpack")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            # (a compressed body would be inflated past max_body before the check could count it)
            return refuse(415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the body uncompressed")
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        try:
            parsed, _ = events.split(body, msgpack)
        except events.BodyError as exc:
            return refuse(400, str(exc))
        if not parsed:
            return refuse(400, "an empty array: send at least one event")
        if len(parsed) > self.max_batch:
            return refuse(413, f"{len(parsed)} events in one request: at most {self.max_batch} (gateway.max_batch)")
        for p in parsed:
            if p.event is not None and (why := self.access.forbidden(grant, p.event.source, p.event.type)):
                return self.access.refuse_forbidden(why)
        wait = self.access.rate(grant, sum(p.event is not None for p in parsed))
        if wait:
            if math.isinf(wait):
                return refuse(413, f"more events in one request than token {grant.name!r} may send per second")
            return refuse(429, f"rate limited: token {grant.name!r}", **{"Retry-After": str(math.ceil(wait))})
        return await self._send(parsed, grant.name)

    async def _read(self, request: web.Request) -> bytes | web.Response:
        """The body, refused (413) as soon as it is longer than max_body."""
        if request.content_length is not None and request.content_length > self.max_body:
            return self._too_big()
        chunks, size = [], 0
        try:
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > self.max_body:
                    return self._too_big()
                chunks.append(chunk)
        except (aiohttp.ClientPayloadError, web.HTTPException, ValueError) as exc:
            return refuse(400, f"unreadable body: {' '.join(str(exc).split())[:200]}")
        return b"".join(chunks)

    def _too_big(self) -> web.Response:
        return refuse(413, f"body over {self.max_body} bytes (gateway.max_body)")

    async def _send(self, parsed: list[events.Parsed], token: str) -> web.Response:
        upstream = self.upstream
        if not upstream.has_room():
            try:
                async with asyncio.timeout(SETTLE_TIMEOUT):
                    await upstream.wait_room()
            except TimeoutError:
                return refuse(503, "router unavailable: too many events wait for it", **{"Retry-After": "1"})
        slots: list[tuple[str, Result | asyncio.Future[Result]]] = []
        for p in parsed:
            if p.event is None:
                slots.append((p.id, Result(p.id, "rejected", p.error)))
                continue
            event_id, data, error = events.wire(p.event)
            slots.append(
                (event_id, Result(event_id, "rejected", error) if error else upstream.submit(event_id, data, token))
            )
        futures = {s for _, s in slots if isinstance(s, asyncio.Future)}
        if futures:
            await asyncio.wait(futures, timeout=SETTLE_TIMEOUT)
        results = [_result(event_id, slot) for event_id, slot in slots]
        metric = self.access.metrics.events
        for r in results:
            metric.labels("duplicate" if r.duplicate else r.status).inc()
        if any(r.status == "pending" for r in results):
            text = "router unavailable: no verdict in time; retry with the same ids"
            body = {"error": text, "results": results}
            return _json(503, body, {"Retry-After": "1"})
        status = 200 if all(r.status == "accepted" for r in results) else 207
        return _json(status, {"results": results})


def _result(event_id: str, slot: Result | asyncio.Future[Result]) -> Result:
    if isinstance(slot, Result):
        return slot
    return slot.result() if slot.done() else Result(event_id, "pending")


_encode = msgspec.json.Encoder().encode


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json", headers=headers)

"""WebSocket `/v1/stream`: a long-lived producer sends events and gets one ack per event,
in the order it sent them.

- A message is one event or an array of them: a text frame is JSON, a binary frame
  msgpack (the fields of `POST /v1/events`). Each event gets one ack, in the same
  encoding as the frame it came in: `{"id", "status": "accepted"|"rejected", "reason"?,
  "duplicate"?, "retry_after"?}`. A message that cannot be read at all gets one ack
  with `"id": ""` and the reason (it held no event we could count).
- An ack is sent once the router journaled (or refused) the event: `accepted` means
  stored, exactly as a confirmed ZeroMQ producer's ACK.
- Back-pressure: while MAX_UNACKED events of this connection wait for their ack (the
  router is slow or down), the gateway stops reading the socket; TCP's window then
  stops the client. Nothing is dropped and nothing times out: the gateway resends to
  the router until it answers.
- The token is checked at the upgrade (401: no upgrade); a source or type it may not
  send, or its rate, rejects that event (`forbidden: ...`, `rate_limited: ...` with
  retry_after) and the stream goes on.
- The token is re-checked while the stream is open (regrant.py): revoked, the stream is
  closed with 1008 and a one-line reason; a narrowed grant applies to the next event.
"""

from __future__ import annotations

import asyncio
import math

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from nexus.config import GatewayConfig
from nexus.gateway import events
from nexus.gateway.access import Access
from nexus.gateway.regrant import LiveGrant
from nexus.gateway.upstream import Result, Upstream

MAX_UNACKED = 2000  # events of one connection waiting for their ack before reading stops
HEARTBEAT = 20.0  # seconds between WebSocket pings (a dead peer is noticed)
ROUTE = "stream"

_json = msgspec.json.Encoder().encode
_msgpack = msgspec.msgpack.Encoder().encode


class _Socket(web.WebSocketResponse):
    """aiohttp closes a connection whose frame is over max_msg_size with 1009 and no
    reason: this says why, in one line."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = f"a message over gateway.max_body ({self._max_msg_size} bytes): send smaller ones".encode()
        return await super().close(code=code, message=message, drain=drain)


class Stream:
    def __init__(self, gw: GatewayConfig, access: Access, upstream: Upstream):
        self.max_message = gw.max_body
        self.access = access
        self.upstream = upstream
        self.open: set[web.WebSocketResponse] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        metrics = self.access.metrics
        grant = self.access.authenticate(request)
        if isinstance(grant, web.Response):
            metrics.requests.labels(ROUTE, str(grant.status)).inc()
            return grant
        ws = _Socket(max_msg_size=self.max_message, heartbeat=HEARTBEAT)
        await ws.prepare(request)
        header = request.headers.get("Authorization")
        live = LiveGrant(grant, lambda: self.access.store.authenticate(header))
        watch = asyncio.ensure_future(live.watch(ws, ROUTE))
        metrics.requests.labels(ROUTE, "101").inc()
        metrics.streams.inc()
        self.open.add(ws)
        acks: asyncio.Queue[tuple[bool, str, Result | asyncio.Future[Result]]] = asyncio.Queue()
        unacked = _Counter()
        writer = asyncio.ensure_future(self._write(ws, acks, unacked))
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                binary = msg.type == WSMsgType.BINARY
                body = msg.data if binary else msg.data.encode()
                for event_id, slot in self._events(body, binary, live.grant):
                    unacked.n += 1
                    acks.put_nowait((binary, event_id, slot))
                # back-pressure: no further read while too many wait for the router
                while unacked.n >= MAX_UNACKED or not self.upstream.has_room():
                    if writer.done():
                        break
                    unacked.changed.clear()
                    await unacked.changed.wait()
                if writer.done():
                    break
        finally:
            # the socket is closed (or failed): acks can no longer go out; what is in
            # flight still settles, and the client's retry of those ids is answered
            # from the ledger (duplicate) or waits for the same verdict
            writer.cancel()
            watch.cancel()
            await asyncio.gather(writer, watch, return_exceptions=True)
            self.open.discard(ws)
            metrics.streams.dec()
            await ws.close()
        return ws

    def _events(self, body: bytes, binary: bool, grant) -> list[tuple[str, Result | asyncio.Future[Result]]]:
        try:
            parsed, _ = events.split(body, binary)
        except events.BodyError as exc:
            return [("", Result("", "rejected", str(exc)))]
        out: list[tuple[str, Result | asyncio.Future[Result]]] = []
        for p in parsed:
            if p.event is None:
                out.append((p.id, Result(p.id, "rejected", p.error)))
                continue
            event_id, data, error = events.wire(p.event)
            if error:
                out.append((event_id, Result(event_id, "rejected", error)))
            elif why := self.access.forbidden(grant, p.event.source, p.event.type):
                self.access.metrics.auth.labels("403").inc()
                out.append((event_id, Result(event_id, "rejected", why)))
            elif wait := self.access.rate(grant, 1):
                why, retry = f"rate_limited: token {grant.name!r}", 1.0 if math.isinf(wait) else wait
                out.append((event_id, Result(event_id, "rejected", why, retry_after=retry)))
            else:
                out.append((event_id, self.upstream.submit(event_id, data, grant.name)))
        return out

    async def _write(self, ws: web.WebSocketResponse, acks: asyncio.Queue, unacked: _Counter) -> None:
        metric = self.access.metrics.events
        while True:
            binary, _event_id, slot = await acks.get()
            # shielded: the future may be shared with a retry of the same id elsewhere
            result = slot if isinstance(slot, Result) else await asyncio.shield(slot)
            metric.labels("duplicate" if result.duplicate else result.status).inc()
            if binary:
                await ws.send_bytes(_msgpack(result))
            else:
                await ws.send_str(_json(result).decode())
            unacked.n -= 1
            unacked.changed.set()


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.changed = asyncio.Event()

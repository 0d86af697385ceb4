"""WebSocket `/v1/subscribe?types=GLOB[,GLOB...]&from=SEQ`: journaled events for live
consumers (a browser, an agent UI), read from the journal so a client that reconnects
with `from=<the last seq it got>` misses nothing the journal still holds.

Wiring (the gateway's server does it once)::

    subscribe.add_routes(app, cfg, authenticate)

`authenticate(request)` returns the request's grant (nexus/gateway/tokens.py
`TokenGrant`: anything with `name`, `subscribe` and `may_read(type)`), or None for no or
a bad token. The connection then gets:

1. one start message: `{"from", "first_seq", "last_seq", "types"}`, plus `"gap":
   {"from", "to", "events"}` when `from` is older than the journal's first retained seq
   (those events were removed by retention; the stream goes on after them);
2. then one message per event, in journal order: `{"seq", "id", "type", "source", "time",
   "key", "priority", "correlation_id", "v", "payload"}` (payload as JSON; msgpack
   binary as base64), only types matching `types` and the token's `subscribe` globs;
3. a `{"gap": ...}` message if retention removes events the client had not read yet
   (a client far behind), and `{"error": ...}` before a close the server decides.

The token is re-checked while the connection is open (regrant.py): revoked, or no longer
allowed to subscribe, the connection is closed with 1008 and a one-line reason; narrowed
`subscribe` globs apply from the next event on.

A browser, which cannot set headers on a WebSocket, offers its token as a subprotocol:
`new WebSocket(url, ["nexus.v1", "bearer." + token])` (the server selects "nexus.v1").

No `from`: the stream starts after the journal's last seq (from now). Answers before the
upgrade: 401 (no or bad token), 403 (the token may not subscribe, or a glob asks for types
beyond its `subscribe` globs), 400 (a bad parameter, not a WebSocket request), 503 (too
many subscribers), each with a one-line `{"error": ...}` body.

Back-pressure: a subscriber holds at most one bounded read (`BATCH` events, `BATCH_BYTES`)
and each send waits for the socket to drain, so a slow client stops reading the journal
for itself only, and goes on from where it was; it costs the router nothing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import structlog
from aiohttp import WSMsgType, web

from nexus.config import Config
from nexus.errors import NexusError
from nexus.gateway.journalfeed import JournalReader, TailWake
from nexus.gateway.regrant import LiveGrant
from nexus.protocol.events import DECODE_ERRORS, decode_wire_event

log = structlog.get_logger("nexus.gateway")

PATH = "/v1/subscribe"
BATCH = 500  # events per journal read for one subscriber
BATCH_BYTES = 1 << 20  # event bytes per journal read for one subscriber
MAX_SUBSCRIBERS = 64  # open /v1/subscribe connections per gateway
MAX_GLOBS = 16
MAX_GLOB_CHARS = 200
RETRY = 1.0  # seconds before reading again after the router did not answer
HEARTBEAT = 20.0  # WebSocket ping interval (a dead client is noticed)
PROTOCOL = "nexus.v1"  # the WebSocket subprotocol the server selects
TOKEN_PROTOCOL = "bearer."  # a browser's token: offered as the subprotocol "bearer.<token>"


class ReadGrant(Protocol):
    """What /v1/subscribe needs of a token's grant (tokens.TokenGrant has it)."""

    @property
    def name(self) -> str: ...

    @property
    def subscribe(self) -> tuple[str, ...]: ...

    def may_read(self, type_: str) -> bool: ...


Authenticate = Callable[[web.Request], ReadGrant | None]


class Connection:
    """One open subscription, for status and metrics: where it is and what it got."""

    def __init__(self, name: str, globs: list[str]):
        self.name = name  # the token's name
        self.globs = globs
        self.after = 0  # the journal position it has been sent up to
        self.sent = 0  # events sent to it

    def describe(self) -> dict[str, Any]:
        return {"token": self.name, "types": self.globs, "after": self.after, "sent": self.sent}


class Subscriptions:
    """The route's shared state: the tail wake-up, the open connections, the counts."""

    def __init__(self, cfg: Config, authenticate: Authenticate):
        self.cfg = cfg
        self.authenticate = authenticate
        self.connections: set[Connection] = set()
        self.refused: Counter[int] = Counter()  # HTTP status -> count (401, 403, 400, 503)
        self.sent = 0  # events sent to subscribers
        self.wake: TailWake | None = None

    async def close(self, _app: web.Application | None = None) -> None:
        if self.wake is not None:
            self.wake.close()

    def _refuse(self, status: int, error: str) -> web.Response:
        self.refused[status] += 1
        return web.json_response({"error": error}, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        credentials = _protocol_token(request)  # re-checked while the connection is open
        grant = self.authenticate(credentials)
        if grant is None:
            return self._refuse(401, "a valid bearer token is required (Authorization: Bearer <token>)")
        try:
            globs, start = parse_query(request.query)
        except ValueError as exc:
            return self._refuse(400, str(exc))
        refusal = forbidden(grant, globs)
        if refusal:
            return self._refuse(403, refusal)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=4096, protocols=(PROTOCOL,))
        if not ws.can_prepare(request).ok:
            return self._refuse(400, f"{PATH} is a WebSocket endpoint (send Upgrade: websocket)")
        if len(self.connections) >= MAX_SUBSCRIBERS:
            return self._refuse(503, f"too many subscribers (at most {MAX_SUBSCRIBERS}); try again later")
        if self.wake is None:
            self.wake = TailWake(self.cfg, asyncio.get_running_loop())
        conn = Connection(grant.name, globs)
        self.connections.add(conn)
        self.wake.attach()
        reader = JournalReader(self.cfg)
        try:
            await ws.prepare(request)
            live = LiveGrant(grant, lambda: self.authenticate(credentials), _may_not_subscribe)
            pump = asyncio.create_task(self._pump(ws, reader, live, conn, start))
            watch = asyncio.create_task(live.watch(ws, "subscribe"))
            try:
                async for msg in ws:  # the client sends nothing we need; this sees its close
                    if msg.type == WSMsgType.ERROR:
                        break
            finally:
                pump.cancel()
                watch.cancel()
                await asyncio.gather(pump, watch, return_exceptions=True)
        finally:
            reader.close()
            self.wake.detach()
            self.connections.discard(conn)
        return ws

    async def _pump(
        self,
        ws: web.WebSocketResponse,
        reader: JournalReader,
        live: LiveGrant[ReadGrant],
        conn: Connection,
        start: int | None,
    ) -> None:
        wake, globs = self.wake, conn.globs
        assert wake is not None
        try:
            head = await self._read(ws, reader, 0, [], 0)
            after = head.last if start is None else start
            hello: dict[str, Any] = {"from": after, "first_seq": head.first, "last_seq": head.last, "types": globs}
            if after < head.first - 1:
                hello["gap"] = _gap(after, head.first)
            await ws.send_str(_text(hello))
            after = conn.after = max(after, head.first - 1)
            while not ws.closed:
                got = await self._read(ws, reader, after, globs, BATCH)
                if got.first - 1 > after:  # retention removed what this client had not read
                    await ws.send_str(_text({"gap": _gap(after, got.first)}))
                for seq, raw in zip(got.seqs, got.events, strict=False):
                    message = event_message(seq, bytes(raw))
                    if message is None or not live.grant.may_read(message["type"]):
                        continue
                    await ws.send_str(_text(message))  # waits while the client's socket is full
                    self.sent += 1
                    conn.sent += 1
                after = conn.after = got.upto
                if after >= got.last:  # caught up: wait for the next journaled event
                    await wake.wait_past(after)
        except ConnectionResetError:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one subscriber's failure: tell it, close it
            log.error("subscribe_failed", error=str(exc))
            with contextlib.suppress(Exception):
                await ws.send_str(_text({"error": f"subscription ended: {exc}"}))
                await ws.close()

    async def _read(self, ws: web.WebSocketResponse, reader: JournalReader, after: int, globs: list[str], limit: int):
        """A Read, retried while the router does not answer (a restart): the client just
        waits; its position is kept."""
        told = False
        while True:
            try:
                return await reader.read(after, globs, limit, BATCH_BYTES)
            except NexusError as exc:  # PeerError included
                if not told:
                    log.warning("subscribe_router_unavailable", error=str(exc))
                    told = True
                if ws.closed:
                    raise ConnectionResetError from None
                await asyncio.sleep(RETRY)


def add_routes(app: web.Application, cfg: Config, authenticate: Authenticate) -> Subscriptions:
    """Mount GET /v1/subscribe on `app`; returns its state (counts for metrics)."""
    subs = Subscriptions(cfg, authenticate)
    app.router.add_get(PATH, subs.handle)
    app.on_cleanup.append(subs.close)
    return subs


def _protocol_token(request: web.Request) -> web.Request:
    """A browser's WebSocket cannot send an Authorization header: it offers the token as a
    subprotocol (`new WebSocket(url, ["nexus.v1", "bearer." + token])`), which keeps it out
    of URLs and access logs. Seen as the header, when there is none."""
    if "Authorization" in request.headers:
        return request
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    token = next((p[len(TOKEN_PROTOCOL) :] for p in offered if p.startswith(TOKEN_PROTOCOL)), "")
    if not token:
        return request
    return request.clone(headers={**request.headers, "Authorization": f"Bearer {token}"})


def parse_query(query) -> tuple[list[str], int | None]:
    """(type globs, start seq or None) from `types=a.*,b.*&from=SEQ`; ValueError: one line."""
    raw = query.get("types", "*")
    globs = [g.strip() for g in raw.split(",") if g.strip()]
    if not globs:
        raise ValueError("types: give one or more type globs, comma separated (e.g. types=email.*)")
    if len(globs) > MAX_GLOBS:
        raise ValueError(f"types: at most {MAX_GLOBS} globs")
    for g in globs:
        if len(g) > MAX_GLOB_CHARS or not g.isprintable():
            raise ValueError(f"types: a glob must be printable and at most {MAX_GLOB_CHARS} characters")
    start = query.get("from")
    if start is None or start == "":
        return globs, None
    if not start.isdigit() or len(start) > 19:
        raise ValueError("from: a journal seq (a whole number >= 0), the last seq the client received")
    return globs, int(start)


def _may_not_subscribe(grant: ReadGrant) -> str:
    """Why an open subscription ends when its token's grant changed ("" when it goes on:
    narrowed globs filter the next events instead)."""
    return "" if grant.subscribe else f"token {grant.name} may no longer subscribe"


def forbidden(grant: ReadGrant, globs: list[str]) -> str:
    """Why `grant` may not subscribe to `globs` ("" when it may). A glob is allowed when one
    of the token's `subscribe` globs matches it as a string ("email.*" under "email.*" or
    "*"): conservative, and every event is checked against `may_read` as well."""
    if not grant.subscribe:
        return f"token {grant.name} may not subscribe"
    for g in globs:
        if not any(fnmatch.fnmatchcase(g, allowed) for allowed in grant.subscribe):
            return f"token {grant.name} may not read types matching {g!r} (it may read {', '.join(grant.subscribe)})"
    return ""


def event_message(seq: int, raw: bytes) -> dict[str, Any] | None:
    """One journaled event as a subscriber gets it (None: unreadable, never written so)."""
    try:
        ev = decode_wire_event(raw)
        payload = msgspec.msgpack.decode(ev.payload)
    except DECODE_ERRORS:
        return None
    return {
        "seq": seq,
        "id": ev.id,
        "type": ev.type,
        "source": ev.source,
        "time": ev.time,
        "key": ev.key,
        "priority": ev.priority,
        "correlation_id": ev.correlation_id,
        "v": ev.v,
        "payload": payload,
    }


def _gap(after: int, first: int) -> dict[str, int]:
    return {"from": after + 1, "to": first - 1, "events": first - 1 - after}


_encoder = msgspec.json.Encoder()


def _text(message: dict[str, Any]) -> str:
    try:
        return _encoder.encode(message).decode()
    except (TypeError, msgspec.EncodeError):  # a payload JSON cannot hold (a msgpack ext type)
        return _encoder.encode({**message, "payload": None, "payload_error": "not representable in JSON"}).decode()

"""The gateway process (role "gateway", started by the launcher when `gateway.listen` is
set): HTTP and WebSocket producers and consumers on one aiohttp server.

Routes: `POST /v1/events` (nexus/gateway/ingest.py), WebSocket `/v1/stream`
(stream.py), WebSocket `/v1/subscribe` (subscribe.py), `GET /healthz` (open: whether
the router answers) and `GET /metrics` (the gateway's counters; any gateway token).

Why aiohttp: it is already the HTTP port's library (nexus/http/), and it has the server,
WebSockets and TLS (an ssl.SSLContext) in one well-kept package, on asyncio like the
pyzmq socket to the router, so one event loop serves both with no thread hand-over.

It is a confirmed producer (upstream.py): an answer goes out only after the router
journaled or refused the event. At SIGTERM it stops taking requests, gives those in
flight up to SHUTDOWN_GRACE to get their verdicts, and leaves what is unsettled in its
ledger for the next start.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import signal
from collections.abc import Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nexus.config import Config
from nexus.errors import ConfigError
from nexus.gateway import listen
from nexus.gateway.access import Access, Metrics
from nexus.gateway.ingest import Ingest
from nexus.gateway.ledger import Ledger
from nexus.gateway.stream import Stream
from nexus.gateway.tokens import TokenGrant, TokenStore
from nexus.gateway.upstream import Upstream
from nexus.protocol.curve import client_keys

log = structlog.get_logger("nexus.gateway")

SHUTDOWN_GRACE = 5.0  # seconds requests in flight get at stop to see their verdicts


def ledger_dir(cfg: Config) -> str:
    return os.path.join(cfg.data_dir, "gateway")


async def healthz(request: web.Request) -> web.Response:
    upstream: Upstream = request.app["upstream"]
    late = upstream.router_late()
    body: dict[str, object] = {"ok": not late, "unsettled": upstream.unsettled()}
    if late:
        body["reason"] = "the router has not answered for a while"
    return web.json_response(body, status=503 if late else 200)


async def metrics(request: web.Request) -> web.Response:
    access: Access = request.app["access"]
    grant = access.authenticate(request)
    if isinstance(grant, web.Response):
        access.metrics.requests.labels("metrics", "401").inc()
        return grant
    access.metrics.requests.labels("metrics", "200").inc()
    access.metrics.unsettled.set(request.app["upstream"].unsettled())
    resp = web.Response(body=generate_latest(access.metrics.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def build_app(cfg: Config, upstream: Upstream, store: TokenStore) -> web.Application:
    gw = cfg.gateway
    access = Access(store, Metrics())
    # (bodies are read by the handlers, each refusing past max_body with its one line)
    app = web.Application(client_max_size=gw.max_body)
    app["access"], app["upstream"] = access, upstream
    app["stream"] = stream = Stream(gw, access, upstream)
    app.router.add_post("/v1/events", Ingest(gw, access, upstream).handle)
    app.router.add_get("/v1/stream", stream.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_subscribe(app, cfg, _subscriber_auth(access))
    return app


def _subscriber_auth(access: Access) -> Callable[[web.Request], TokenGrant | None]:
    def authenticate(request: web.Request) -> TokenGrant | None:
        grant = access.store.authenticate(request.headers.get("Authorization"))
        if grant is None:
            access.metrics.auth.labels("401").inc()
        return grant

    return authenticate


def add_subscribe(app: web.Application, cfg: Config, authenticate: Callable) -> None:
    """`/v1/subscribe` (helper gwsub's nexus/gateway/subscribe.py), when present."""
    if importlib.util.find_spec("nexus.gateway.subscribe") is not None:
        importlib.import_module("nexus.gateway.subscribe").add_routes(app, cfg, authenticate)


async def serve(cfg: Config, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    tls = listen.ssl_context(cfg)
    upstream = Upstream(cfg.confirm, Ledger(ledger_dir(cfg)), client_keys(cfg))
    upstream.start()
    app = build_app(cfg, upstream, TokenStore(cfg.gateway.tokens_path(cfg)))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # auto_decompress off: a compressed body is refused with one line (ingest.py) instead of
    # aiohttp's plain-text error, and cannot be inflated past max_body before it is counted
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE, auto_decompress=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host or None, port, ssl_context=tls).start()
        except OSError as exc:
            raise ConfigError(f"gateway.listen {cfg.gateway.listen!r}: cannot bind: {exc.strerror or exc}") from None
        producer = upstream.ledger.producer_id
        log.info("gateway_listening", address=cfg.gateway.listen, tls=tls is not None, producer=producer)
        await stop.wait()
    finally:
        for ws in list(app["stream"].open):
            await ws.close()
        await runner.cleanup()  # open requests finish (up to SHUTDOWN_GRACE)
        await upstream.close(SHUTDOWN_GRACE)


def main(cfg: Config, name: str) -> None:
    """The child's entry (nexus/supervisor/child.py)."""
    host, port = listen.parse(cfg)
    asyncio.run(serve(cfg, host, port))
    log.info("gateway_stopped", name=name)

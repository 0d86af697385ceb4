"""The HTTP process (role "http", started by the launcher when `http.listen` is set):
/metrics, /healthz, /readyz and the dashboard on one aiohttp server.

It holds no pipeline state of its own: every answer is built from requests to the
launcher (control) and the router (coord) made as the request comes in (health,
metrics: nexus/http/scrape.py) or by the dashboard's sampler once a second. Nothing
here is on the event path, so a slow scrape or an open page cannot slow the pipeline
beyond those requests. Every route but /healthz and /readyz wants the token
(nexus/http/credential.py, nexus/http/guard.py).
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import structlog
from aiohttp import web

from nexus.common import redact
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.http import credential, dashboard, health
from nexus.http.guard import Guard
from nexus.http.listen import parse_listen
from nexus.http.peers import Peers
from nexus.http.scrape import SharedScrape
from nexus.http.tail import TailFeed

log = structlog.get_logger("nexus.http")

STATIC = {  # name -> content type; the page's only files (no CDN)
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
SECURITY_HEADERS = {
    # the page runs only its own script: even a payload that slipped into markup could not run
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the first URL may carry ?token=
    "Cache-Control": "no-store",
}
PEER_THREADS = 16
SHUTDOWN_GRACE = 2.0  # seconds open requests get at stop (pages reconnect to the next process)


def _load_static() -> dict[str, bytes]:
    folder = resources.files("nexus.http") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


async def _both(request: web.Request) -> tuple[dict | None, dict | None]:
    peers: Peers = request.app["peers"]
    loop = asyncio.get_running_loop()
    launcher, router = await asyncio.gather(
        loop.run_in_executor(None, peers.launcher_status), loop.run_in_executor(None, peers.router_status)
    )
    return launcher, router


async def healthz(request: web.Request) -> web.Response:
    launcher, router = await _both(request)
    ok, reasons = health.liveness(launcher, router)
    return web.json_response({"ok": ok, "reasons": reasons}, status=200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    launcher, router = await _both(request)
    ok, reasons = health.readiness(launcher, router)
    return web.json_response({"ok": ok, "reasons": reasons}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = await request.app["scrape"].get()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type  # with its version parameter, as Prometheus expects
    return resp


async def page(request: web.Request) -> web.Response:
    resp = _static_response(request, "dashboard.html")
    if request.get("open_session"):
        request.app["guard"].set_session(resp)
    return resp


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return _static_response(request, name)


def _static_response(request: web.Request, name: str) -> web.Response:
    resp = web.Response(body=request.app["static"][name], content_type=STATIC[name], charset="utf-8")
    resp.headers.update(SECURITY_HEADERS)
    return resp


async def state(request: web.Request) -> web.Response:
    return web.json_response(request.app["sampler"].state)


def build_app(cfg: Config, host: str, port: int, token: str) -> web.Application:
    guard = Guard(host, port, token)
    app = web.Application(middlewares=[guard.middleware], client_max_size=64 * 1024)
    peers = Peers(cfg)
    app["guard"], app["peers"], app["static"] = guard, peers, _load_static()
    app["scrape"] = SharedScrape(peers)
    app["stopping"] = asyncio.Event()
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/stream", dashboard.stream)
    app.router.add_get("/api/deadletters", dashboard.dead_letters)
    app.router.add_get("/api/deadletters/{id}", dashboard.dead_letter)
    app.router.add_post("/api/deadletters/{action:replay|purge}", dashboard.dead_letter_action)
    return app


async def serve(cfg: Config, host: str, port: int, token: str) -> None:
    loop = asyncio.get_running_loop()
    # the blocking requests to the launcher and the router: a probe, a scrape and a sample
    # may each wait out a 1 s timeout at once while the router is stopped
    loop.set_default_executor(ThreadPoolExecutor(PEER_THREADS, thread_name_prefix="peers"))
    app = build_app(cfg, host, port, token)
    app["feed"] = feed = TailFeed(cfg, loop)
    app["sampler"] = sampler = dashboard.Sampler(app["peers"], feed)
    stop: asyncio.Event = app["stopping"]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host or None, port).start()
        except OSError as exc:
            raise ConfigError(f"http.listen {cfg.http.listen!r}: cannot bind: {exc.strerror or exc}") from None
        log.info("http_listening", address=cfg.http.listen, token="http.token" if cfg.http.token else "generated")
        await sampler.run(stop)
    finally:
        stop.set()
        for w in list(feed.watchers):
            w.wake.set()  # open streams see `stopping` and end
        feed.close()
        await runner.cleanup()


def main(cfg: Config, name: str) -> None:
    """The child's entry (nexus/supervisor/child.py)."""
    host, port = parse_listen(cfg.http.listen)
    token = credential.load(cfg)  # the config's, or the one the launcher made in the data dir
    redact.register(token)  # (child.py registered the config's; once more is harmless)
    asyncio.run(serve(cfg, host, port, token))
    log.info("http_stopped", name=name)

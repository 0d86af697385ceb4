"""Who may use the HTTP port, as one aiohttp middleware.

- DNS rebinding: a page of another site whose name now resolves to 127.0.0.1 reaches
  the port with its own name in `Host`; unless the port listens on a wildcard address
  (then a token is required), `Host` must name the listen address or localhost.
- Token (`http.token`, or the one generated in the data dir: nexus/http/credential.py):
  every request but the probes carries `Authorization: Bearer TOKEN`, or the session
  cookie the dashboard gets by opening `/?token=TOKEN` once (HttpOnly, SameSite=Strict;
  its value is derived from the token, not the token itself). `/healthz` and `/readyz`
  are open: load balancers and Kubernetes httpGet probes send no header, and they tell
  only ok and the reasons (process, group and storage states; no event data).
- CSRF: a state-changing request (POST) must be JSON (another site's form cannot send
  that without a CORS preflight, which is never granted) and, when the browser names
  its origin, come from this server: the Origin's host:port must be the `Host` the
  request came to. The scheme is not compared: behind a TLS-terminating proxy the
  browser's origin is https:// while this port speaks http (the Host check and the
  JSON-only rule still hold either way).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from nexus.http.listen import is_wildcard

COOKIE = "nexus_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: no token
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refuse(status: int, reason: str, **headers: str) -> web.Response:
    return web.json_response({"ok": False, "error": reason}, status=status, headers=headers)


DEFAULT_PORTS = {"http": "80", "https": "443"}


def _host_port(text: str) -> tuple[str, str]:
    """("host", "port") of `host[:port]` or `[v6][:port]`; port "" when not given."""
    if text.startswith("["):
        host, _, rest = text.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else ""
    host, _, port = text.partition(":")
    return host, port


def same_host(origin: str, host: str) -> bool:
    """Whether a browser's `Origin` (scheme://host[:port]) names the `Host` the request
    came to, whichever of http and https the browser used (a TLS-terminating proxy in
    front: https:// to the proxy, plain http here)."""
    scheme, sep, rest = origin.lower().partition("://")
    if not sep or scheme not in DEFAULT_PORTS or not host:
        return False  # "null" (a sandboxed or file: page), or not an origin at all
    o_host, o_port = _host_port(rest)
    h_host, h_port = _host_port(host.lower())
    o_port = o_port or DEFAULT_PORTS[scheme]
    # a Host without a port: the default port of the scheme the browser used (unknown here)
    return o_host == h_host and (o_port == h_port or (not h_port and o_port in DEFAULT_PORTS.values()))


class Guard:
    def __init__(self, host: str, port: int, token: str):
        self.token = token
        self.session = hmac.new(token.encode(), b"nexus dashboard session", hashlib.sha256).hexdigest() if token else ""
        self.hosts: set[str] | None = None  # Host header values accepted; None: any (wildcard listen)
        if not is_wildcard(host):
            names = {host.lower(), "localhost", "127.0.0.1", "::1"}
            bracketed = {f"[{h}]" if ":" in h else h for h in names}
            self.hosts = {f"{h}:{port}" for h in bracketed} | (bracketed if port == 80 else set())

    def token_ok(self, request: web.Request) -> bool:
        """The bearer token or the session cookie (constant-time compares)."""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session.encode())

    def opens_session(self, request: web.Request) -> bool:
        """`GET /?token=TOKEN`: the dashboard link; the page answers with the cookie."""
        given = request.query.get("token", "")
        return (
            request.method == "GET"
            and request.path == "/"
            and bool(given)
            and hmac.compare_digest(given.encode(), self.token.encode())
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.hosts is not None and request.headers.get("Host", "").lower() not in self.hosts:
            return _refuse(403, "forbidden: the Host header does not name this server")
        if self.token and request.path not in OPEN_PATHS:
            if self.opens_session(request):
                request["open_session"] = True
            elif not self.token_ok(request):
                return _refuse(
                    401, "unauthorized: send Authorization: Bearer TOKEN (http.token)", **{"WWW-Authenticate": "Bearer"}
                )
        if request.method not in SAFE_METHODS:
            if request.content_type != "application/json":
                return _refuse(415, "actions take a JSON body (Content-Type: application/json)")
            origin = request.headers.get("Origin")
            if origin is not None and not same_host(origin, request.headers.get("Host", "")):
                return _refuse(403, "forbidden: cross-origin request")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _refuse(403, "forbidden: cross-site request")
        response = await handler(request)
        if not response.prepared:  # (a stream has sent its headers already)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def set_session(self, response: web.StreamResponse) -> None:
        response.set_cookie(COOKIE, self.session, httponly=True, samesite="Strict", path="/")

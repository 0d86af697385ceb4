"""Who may send through the gateway, how fast, and the gateway's counters.

Tokens are gwtok's TokenStore (nexus/gateway/tokens.py); this module turns its answer
into the HTTP refusals (401 no or bad token, 403 a source or type the token may not
send, 429 over the token's rate), each a one-line JSON body and a count in
`nexus_gateway_auth_refused_total` or `nexus_gateway_requests_total`.

The counters are prometheus_client's, in the gateway's own registry, rendered on the
gateway's `/metrics` (the router's and members' metrics stay on the launcher's HTTP port).
"""

from __future__ import annotations

import math
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from nexus.common import metricnames as names
from nexus.gateway.tokens import TokenGrant, TokenStore

BURST_SECONDS = 1.0  # a token's bucket holds this many seconds of its rate (at least one event)


def refuse(status: int, text: str, **headers: str) -> web.Response:
    """A whole-request refusal: one line, JSON."""
    return web.json_response({"error": text}, status=status, headers=headers or None)


class Bucket:
    def __init__(self, rate: float):
        self.rate = rate
        self.size = max(rate * BURST_SECONDS, 1.0)
        self.level = self.size
        self.at = time.monotonic()

    def take(self, n: int) -> float:
        """Take n events' worth; 0.0 when taken, else the seconds until there is room."""
        now = time.monotonic()
        self.level = min(self.size, self.level + (now - self.at) * self.rate)
        self.at = now
        if n <= self.level:
            self.level -= n
            return 0.0
        if n > self.size:  # never fits whole: the client must send smaller requests
            return math.inf
        return (n - self.level) / self.rate


class Metrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry(auto_describe=True)
        cat = names.CATALOGUE

        def counter(name: str) -> Counter:
            spec = cat[name]
            return Counter(name.removesuffix("_total"), spec.help, spec.labels, registry=reg)

        self.requests = counter(names.GW_REQUESTS)
        self.events = counter(names.GW_EVENTS)
        self.auth = counter(names.GW_AUTH_REFUSED)
        self.unsettled = Gauge(names.GW_UNSETTLED, cat[names.GW_UNSETTLED].help, registry=reg)
        self.streams = Gauge(names.GW_STREAMS, cat[names.GW_STREAMS].help, registry=reg)


class Access:
    def __init__(self, store: TokenStore, metrics: Metrics):
        self.store = store
        self.metrics = metrics
        self.buckets: dict[str, Bucket] = {}

    def authenticate(self, request: web.Request) -> TokenGrant | web.Response:
        grant = self.store.authenticate(request.headers.get("Authorization"))
        if grant is None:
            self.metrics.auth.labels("401").inc()
            return refuse(
                401,
                "unauthorized: send Authorization: Bearer TOKEN (a gateway token: nexus tokens create)",
                **{"WWW-Authenticate": "Bearer"},
            )
        return grant

    def forbidden(self, grant: TokenGrant, source: str, type_: str) -> str:
        """ "" when the token may send it, else the one line why not."""
        if grant.may_send(source, type_):
            return ""
        return f"forbidden: token {grant.name!r} may not send type {type_!r} as source {source!r}"

    def refuse_forbidden(self, text: str) -> web.Response:
        self.metrics.auth.labels("403").inc()
        return refuse(403, text)

    def rate(self, grant: TokenGrant, n: int) -> float:
        """0.0 when n events may go now; else seconds to wait (inf: never in one request)."""
        if grant.rate <= 0:
            return 0.0
        bucket = self.buckets.get(grant.name)
        if bucket is None or bucket.rate != grant.rate:
            bucket = self.buckets[grant.name] = Bucket(grant.rate)
        return bucket.take(n)

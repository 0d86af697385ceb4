"""The grant of an open WebSocket (/v1/stream, /v1/subscribe), re-checked while it is open.

A token is checked at the upgrade, but a connection can live for days: without a
re-check, `nexus tokens revoke` would leave every open stream of that token working.
So each connection re-authenticates its token every RECHECK seconds (a dict lookup; the
TokenStore re-reads the file within tokens.RECHECK_EVERY): a revoked token ends the
connection within about RECHECK + RECHECK_EVERY seconds, closed with 1008 (policy
violation) and a one-line reason; a changed grant (narrower globs, another rate)
replaces the connection's, so it applies from the next event on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog
from aiohttp import WSCloseCode, web

log = structlog.get_logger("nexus.gateway")

RECHECK = 0.5  # seconds between two re-checks of an open connection's token
REVOKED = "token revoked: it is no longer in the gateway's tokens file"
_MAX_REASON = 123  # bytes a WebSocket close reason may hold (RFC 6455 5.5)

G = TypeVar("G")


class LiveGrant(Generic[G]):
    """`grant`: the connection's current grant; `watch(ws)`: the re-check loop (a task)."""

    def __init__(self, grant: G, recheck: Callable[[], G | None], refuse: Callable[[G], str] | None = None):
        self.grant = grant
        self._recheck = recheck  # the grant of the connection's token now; None: not a token any more
        self._refuse = refuse  # "" when the new grant still allows the connection, else why not

    def check(self) -> str:
        """ "" when the connection may go on (its grant updated), else the one line why not."""
        grant = self._recheck()
        if grant is None:
            return REVOKED
        why = self._refuse(grant) if self._refuse is not None else ""
        if not why:
            self.grant = grant
        return why

    async def watch(self, ws: web.WebSocketResponse, route: str) -> None:
        while not ws.closed:
            await asyncio.sleep(RECHECK)  # (a polling period: the file has no change signal)
            why = self.check()
            if why:
                log.info("gateway_connection_refused", route=route, grant=getattr(self.grant, "name", ""), reason=why)
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=why.encode()[:_MAX_REASON])
                return

"""The HTTP process's requests to the launcher (control) and the router (coord), over
the same typed clients and CURVE client keys as the other children. The clients
block: the server calls these from its thread pool, never on the event loop."""

from __future__ import annotations

from typing import Any

from nexus.config import Config
from nexus.errors import NexusError
from nexus.protocol.client import ControlClient, CoordClient
from nexus.protocol.curve import client_keys

PROBE_TIMEOUT = 1.0  # seconds: a health probe must answer well within a prober's own timeout
ACTION_TIMEOUT = 5.0  # dead-letter actions may wait on SQLite a little


class Peers:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.keys = client_keys(cfg)

    def _router(self, timeout: float) -> CoordClient:
        return CoordClient(self.cfg.coord, timeout, probe=True, curve=self.keys)

    def launcher_status(self, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
        """The launcher's status reply; None when it does not answer."""
        try:
            reply = ControlClient(self.cfg.control_endpoint, timeout, probe=True, curve=self.keys).status()
        except NexusError:
            return None
        return dict(reply)

    def router_status(self, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
        try:
            return self._router(timeout).status()
        except NexusError:
            return None

    def router_metrics(self, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
        """{"router": snapshot, "members": {...}}; None when the router does not answer
        or (an older router) has no metrics request."""
        ask = getattr(self._router(timeout), "metrics", None)
        if ask is None:
            return None
        try:
            return ask(timeout)
        except NexusError:
            return None

    def dead_letters(self, action: str, ids: list[int] | None = None) -> dict[str, Any]:
        """list | show | replay | purge, as `nexus dlq`; raises NexusError (no answer,
        refused) and returns the router's {"error": ...} as it is."""
        return self._router(ACTION_TIMEOUT).dead_letters(action, ids)

"""Requests from the launcher, the CLI and the HTTP process (status, metrics, dead
letters, journal replay, tail reads, member exits, reload), answered from the cluster.

INTERFACE (fixed for the helpers building issue 16; the body is being written):
    admin = Admin(cfg, nc, js, names, intake_stats)   # intake_stats() -> dict of counters
    reply: Coord = await admin.answer(msg)             # Reply | Journaled | Error
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.js import JetStreamContext

from nexus.config import Config
from nexus.jetstream.names import Names
from nexus.protocol.wire import Coord, Error


class Admin:
    def __init__(self, cfg: Config, nc: Client, js: JetStreamContext, names: Names, intake_stats: Callable[[], dict]):
        self.cfg, self.nc, self.js, self.names, self.intake_stats = cfg, nc, js, names, intake_stats

    async def answer(self, msg: Coord) -> Coord:
        return Error(reason=f"{type(msg).__name__}: not answered by the nats engine yet", code="unsupported")

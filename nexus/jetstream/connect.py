"""Connecting to the cluster with the config's servers, credentials and TLS."""

from __future__ import annotations

import ssl
from typing import Any

import nats
from nats.aio.client import Client

from nexus.config import Config


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.nats.tls
    wants_tls = any(url.startswith("tls://") for url in cfg.nats.servers)
    if not (tls.ca or tls.cert or wants_tls):
        return None
    ctx = ssl.create_default_context(cafile=cfg.resolve(tls.ca) if tls.ca else None)
    if tls.cert:
        ctx.load_cert_chain(cfg.resolve(tls.cert), cfg.resolve(tls.key))
    return ctx


def options(cfg: Config, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments: reconnect forever (the cluster is the truth;
    a process that cannot reach it waits, it does not exit)."""
    n = cfg.nats
    opts: dict[str, Any] = {
        "servers": list(n.servers),
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "connect_timeout": 2,
        "allow_reconnect": True,
        # a server that stops answering (paused, a dead host without a RST) is noticed
        # after ping_interval x max_outstanding_pings = 3 s and another node is tried;
        # nats-py's default (2 min x 2) left a client stalled on a SIGSTOPped node
        "ping_interval": 1,
        "max_outstanding_pings": 3,
    }
    if n.credentials:
        opts["user_credentials"] = cfg.resolve(n.credentials)
    if n.token:
        opts["token"] = n.token
    if n.user:
        opts["user"], opts["password"] = n.user, n.password
    ctx = tls_context(cfg)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


async def connect(cfg: Config, name: str, **extra: Any) -> Client:
    return await nats.connect(**{**options(cfg, name), **extra})

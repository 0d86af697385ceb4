"""The gateway's address and TLS: checked by the launcher before anything starts (and by
a reload before it applies), so a malformed, taken or unprotected `gateway.listen` is
one line and exit 3 instead of a gateway child failing over and over.

Fail closed: every request carries a bearer token, so an address other hosts can reach
needs TLS (`gateway.tls.cert` and `.key`); plain HTTP is for loopback only.
"""

from __future__ import annotations

import ssl

from nexus.common import listen as rules
from nexus.common.tls import is_loopback
from nexus.config import Config
from nexus.errors import ConfigError


def parse(cfg: Config) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    return rules.parse(cfg.gateway.listen, "gateway.listen", 8080)


def ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """The server context of `gateway.tls` (TLS 1.2+), or None when it is not set."""
    tls = cfg.gateway.tls
    if not tls.cert and not tls.key:
        return None
    if not (tls.cert and tls.key):
        raise ConfigError("gateway.tls: set both cert and key (PEM files), or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = cfg.resolve(tls.cert), cfg.resolve(tls.key)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"gateway.tls: cannot load {cert} with {key}: {reason}") from None
    return ctx


def check(cfg: Config, bind: bool = True) -> tuple[str, int]:
    """Parse, load the TLS files, refuse plain HTTP other hosts can reach, probe the bind
    (`bind=False`: a reload keeping the address our own gateway holds)."""
    host, port = parse(cfg)
    tls = ssl_context(cfg)
    if not is_loopback(host) and tls is None:
        raise ConfigError(
            f"gateway.listen {cfg.gateway.listen!r} is reachable from other hosts: set gateway.tls.cert "
            "and gateway.tls.key (tokens travel in every request), or listen on 127.0.0.1"
        )
    if bind:
        rules.probe(host, port, cfg.gateway.listen, "gateway.listen")
    return host, port


def base_url(cfg: Config) -> str:
    """http(s)://HOST:PORT of the gateway as this host reaches it."""
    host, port = parse(cfg)
    return f"{'https' if cfg.gateway.tls.cert else 'http'}://{rules.url_host(host)}:{port}"

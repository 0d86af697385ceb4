"""The gateway's address and TLS: checked by the launcher before anything starts (and by
a reload before it applies), so a malformed, taken or unprotected `gateway.listen` is
one line and exit 3 instead of a gateway child failing over and over.

Fail closed: every request carries a bearer token, so an address other hosts can reach
needs TLS (`gateway.tls.cert` and `.key`); plain HTTP is for loopback only.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl

from nexus.common.tls import is_loopback
from nexus.config import Config
from nexus.errors import ConfigError

# (the rules of nexus/http/listen.py, which this layer may not import: same wording)
LOOPBACK_OF = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # where this host reaches a wildcard


def parse(cfg: Config) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    listen = cfg.gateway.listen
    host, sep, port = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"gateway.listen {listen!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"gateway.listen {listen!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"gateway.listen {listen!r}: expected host:port with a port from 1 to 65535")
    return host, int(port)


def probe(host: str, port: int, listen: str) -> None:
    """Bind and close at once: a taken port or an address this host lacks fails here."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"gateway.listen {listen!r}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"gateway.listen {listen!r}: cannot bind: {exc.strerror or exc}") from None


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
        probe(host, port, cfg.gateway.listen)
    return host, port


def base_url(cfg: Config) -> str:
    """http(s)://HOST:PORT of the gateway as this host reaches it."""
    host, port = parse(cfg)
    host = LOOPBACK_OF.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if cfg.gateway.tls.cert else 'http'}://{host}:{port}"

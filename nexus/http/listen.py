"""The HTTP port's address: parsed, checked and probed by the launcher before anything
starts, so a malformed, taken or unprotected `http.listen` is one line and exit 3
instead of an HTTP child that fails over and over."""

from __future__ import annotations

import ipaddress
import socket

from nexus.common.tls import is_loopback
from nexus.config import HttpConfig
from nexus.errors import ConfigError

WILDCARDS = ("", "0.0.0.0", "::")
LOOPBACK_OF = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # where this host reaches a wildcard


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    text = listen.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _check_v6(host, listen)
    elif ":" in host:
        raise ConfigError(f"http.listen {listen!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"http.listen {listen!r}: expected host:port with a port from 1 to 65535")
    return host, int(port)


def _check_v6(host: str, listen: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ConfigError(f"http.listen {listen!r}: {host!r} is not an IPv6 address") from None


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def local_url(listen: str, path: str = "/") -> str:
    """http://HOST:PORT/PATH of the port as this host reaches it (a wildcard address on
    loopback): the probe's and `nexus dashboard`'s address."""
    host, port = parse_listen(listen)
    host = LOOPBACK_OF.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/{path.lstrip('/')}"


def check(http: HttpConfig, bind: bool = True) -> tuple[str, int]:
    """Parse, refuse an unprotected port other hosts can reach (fail closed), and probe
    the bind (`bind=False`: a reload keeping the address our own HTTP process holds);
    returns (host, port)."""
    host, port = parse_listen(http.listen)
    if not is_loopback(host) and not http.token:
        raise ConfigError(
            f"http.listen {http.listen!r} is reachable from other hosts: set http.token "
            "(every request must then carry it), or listen on 127.0.0.1"
        )
    if bind:
        probe(host, port, http.listen)
    return host, port


def probe(host: str, port: int, listen: str) -> None:
    """Bind and close at once: a taken port or an address this host does not have fails
    here. (SO_REUSEADDR like the server's own bind, so a port in TIME_WAIT passes.)"""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"http.listen {listen!r}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"http.listen {listen!r}: cannot bind: {exc.strerror or exc}") from None

"""The address rules of the TCP ports Nexus serves (`http.listen`, `gateway.listen`):
`host:port` parsed, the bind probed, a wildcard turned into the address this host
reaches. Here because both ports use them and their layers may not import each other;
`key` names the config key in every error line.
"""

from __future__ import annotations

import ipaddress
import socket

from nexus.errors import ConfigError

WILDCARDS = ("", "0.0.0.0", "::")
LOOPBACK_OF = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # where this host reaches a wildcard


def parse(listen: str, key: str, example_port: int) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); `example_port` is the one the
    bracket hint shows."""
    host, sep, port = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key} {listen!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{key} {listen!r}: write an IPv6 address in brackets, e.g. [::1]:{example_port}")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} {listen!r}: expected host:port with a port from 1 to 65535")
    return host, int(port)


def probe(host: str, port: int, listen: str, key: str) -> None:
    """Bind and close at once: a taken port or an address this host does not have fails
    here. (SO_REUSEADDR like the servers' own bind, so a port in TIME_WAIT passes.)"""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{key} {listen!r}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"{key} {listen!r}: cannot bind: {exc.strerror or exc}") from None


def url_host(host: str) -> str:
    """The host part of a URL this host uses to reach the port: a wildcard on loopback,
    an IPv6 address in brackets."""
    host = LOOPBACK_OF.get(host, host)
    return f"[{host}]" if ":" in host else host

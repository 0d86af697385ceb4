"""The HTTP port's address: parsed, checked and probed by the launcher before anything
starts, so a malformed, taken or unprotected `http.listen` is one line and exit 3
instead of an HTTP child that fails over and over."""

from __future__ import annotations

from nexus.common import listen as rules
from nexus.common.tls import is_loopback
from nexus.config import HttpConfig
from nexus.errors import ConfigError


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    return rules.parse(listen, "http.listen", 9464)


def is_wildcard(host: str) -> bool:
    return host in rules.WILDCARDS


def local_url(listen: str, path: str = "/") -> str:
    """http://HOST:PORT/PATH of the port as this host reaches it (a wildcard address on
    loopback): the probe's and `nexus dashboard`'s address."""
    host, port = parse_listen(listen)
    return f"http://{rules.url_host(host)}:{port}/{path.lstrip('/')}"


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
        rules.probe(host, port, http.listen, "http.listen")
    return host, port

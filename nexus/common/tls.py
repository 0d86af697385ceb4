"""TLS toward servers Nexus talks to (IMAP, the Toasty gRPC service): the one rule for
when plaintext is allowed, and client contexts built by Python's ssl module.

Fail closed: plaintext is for loopback peers only; anything else needs TLS or an
explicit `insecure: true` in the config.
"""

from __future__ import annotations

import ipaddress
import ssl

from nexus.errors import ConfigError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of them (no DNS lookup: a name
    that resolves to loopback today may not tomorrow)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_pem(path: str, where: str) -> bytes:
    """The bytes of a PEM file named in config; a missing or unreadable file is one
    ConfigError line naming `where` and the path (never the content)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{where}: {path} is not a PEM file")
    return data


def client_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None, where: str = "tls"
) -> ssl.SSLContext:
    """A verifying client context (hostname checked, TLS 1.2+): trusts `ca_file` if
    given, else the system's CAs; presents a client certificate if `cert_file` is given."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.ca_file: cannot load {ca_file}: {_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.cert_file: cannot load {cert_file}: {_reason(exc)}") from None
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or str(exc)

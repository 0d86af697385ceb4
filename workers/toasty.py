"""Toasty sink: turns events into desktop notifications over gRPC (toasty.v1.Toasty/Notify).

Config::

    workers:
      toasty:
        handler: workers.toasty:Toasty
        subscribe: ["email.*", "parrot.notification"]
        options:
          target: 127.0.0.1:50051     # host:port of the Toasty server
          timeout: 5                  # deadline per call, seconds
          app: nexus
          urgency: normal             # low | normal | critical
          tls:                        # TLS to the server (required unless the target is loopback)
            ca_file: /etc/nexus/toasty-ca.pem   # trust this CA (default: the system's CAs)
            cert_file: /etc/nexus/client.pem    # a client certificate, if the server asks for one
            key_file: /etc/nexus/client.key
            server_name: toasty.lan   # the name to check the certificate against (default: the target's host)
          insecure: false             # true: allow plaintext to a non-loopback target (not advised)
          mapping:                    # event-type glob -> templates; first match wins
            "email.received": {title: "{payload.from}", body: "{payload.subject}", urgency: critical}
            "*": {title: "{event.type}", body: "{event.source}"}

A given `mapping` replaces the built-in one (`DEFAULT_MAPPING`); an event whose type
matches no entry is skipped. Template syntax: see `workers.mapping`. A gRPC failure
raises `ToastyError`, so the runtime retries the event with backoff.

Fail closed: without `tls`, the target must be loopback (127.0.0.0/8, ::1, localhost
or a unix: socket); any other host is refused when the handler is built, unless
`insecure: true` says plaintext is meant. A TLS failure (untrusted certificate, a
client certificate the server wanted) is `ToastyUnavailable` naming TLS: the events
wait behind the circuit breaker until the setup is fixed, none is dead-lettered.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

import grpc
import msgspec
import structlog

from nexus.common.tls import is_loopback, read_pem
from nexus.errors import ConfigError, DependencyError, NexusError
from nexus.proto.toasty.v1 import toasty_pb2 as pb
from nexus.proto.toasty.v1 import toasty_pb2_grpc as pb_grpc
from nexus.protocol.events import Event
from workers.mapping import Rules, Template, event_data, load_options

log = structlog.get_logger("workers.toasty")
URGENCIES = {"low": pb.LOW, "normal": pb.NORMAL, "critical": pb.CRITICAL}

DEFAULT_MAPPING: dict[str, dict[str, str]] = {
    "email.received": {"title": "{payload.from}", "body": "{payload.subject}"},
    "parrot.notification": {"title": "{payload.app_name}: {payload.title}", "body": "{payload.body}"},
    "*": {"title": "{event.type}", "body": "{event.source}"},
}

# Reconnect quickly once the server is back: with gRPC's default backoff (up to 120 s)
# a channel that saw the server down keeps failing long after it came back.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class MappingEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    body: str
    urgency: str | None = None
    tag: str = ""


class ToastyTls(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ca_file: str | None = None  # PEM bundle of the CAs to trust; None: the system's
    cert_file: str | None = None  # client certificate (PEM), with key_file
    key_file: str | None = None
    server_name: str | None = None  # checked against the certificate instead of the target host


class ToastyOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    target: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1:50051"
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    app: str = "nexus"
    urgency: str = "normal"
    mapping: dict[str, MappingEntry] | None = None
    tls: ToastyTls | None = None
    insecure: bool = False  # allow plaintext to a target that is not loopback


class ToastyError(NexusError):
    """A Notify call failed; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ToastyUnavailable(ToastyError, DependencyError):
    """Toasty is down or too slow: feeds the circuit breaker, never dead-letters."""


# codes that say "the service is not there right now", as opposed to "bad request"
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


def target_host(target: str) -> str | None:
    """The host of a gRPC target (host:port, [v6]:port, dns:///host:port, ipv4:/ipv6:
    forms), or None for a local socket (unix:, unix-abstract:)."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme) :]
            break
    if t.startswith("//"):  # dns://authority/host:port
        t = t[2:].partition("/")[2]
    t = t.split(",")[0]  # ipv4:a:p,b:p lists: the first decides (all must be alike)
    if t.startswith("["):
        return t[1 : t.find("]")] if "]" in t else t[1:]
    return t.rsplit(":", 1)[0] if t.count(":") == 1 else t


def channel_credentials(opts: ToastyOptions) -> grpc.ChannelCredentials | None:
    """TLS credentials from `opts.tls`, or None for plaintext (loopback or `insecure`)."""
    tls = opts.tls
    if tls is None:
        host = target_host(opts.target)
        if host is not None and not is_loopback(host) and not opts.insecure:
            raise ConfigError(
                f"toasty options.target {opts.target}: not a loopback address, so TLS is required: "
                "set options.tls (ca_file, cert_file, key_file), or insecure: true for plaintext"
            )
        return None
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("toasty options.tls: cert_file and key_file go together (the client certificate and its key)")
    where = "toasty options.tls"
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca_file, f"{where}.ca_file") if tls.ca_file else None,
        private_key=read_pem(tls.key_file, f"{where}.key_file") if tls.key_file else None,
        certificate_chain=read_pem(tls.cert_file, f"{where}.cert_file") if tls.cert_file else None,
    )


def describe_failure(exc: grpc.aio.AioRpcError, tls: ToastyTls | None) -> str:
    """The gRPC status as one line. gRPC reports TLS failures as a plain UNAVAILABLE
    with the reason deep in the details: say TLS up front."""
    details = " ".join((exc.details() or "").split())
    if tls is not None and re.search(r"handshake|ssl|tls|certificate|verification", details, re.I):
        return f"{exc.code().name}: TLS handshake failed ({details})"
    if tls is not None and "socket closed" in details.lower():
        # TLS 1.3: the server checks the client certificate after the client thinks the
        # handshake is done, then just closes the connection
        hint = (
            "it may not trust the client certificate (options.tls.cert_file)"
            if tls.cert_file
            else "if it requires a client certificate, set options.tls.cert_file and key_file"
        )
        return f"{exc.code().name}: the server closed the TLS connection; {hint} ({details})"
    return f"{exc.code().name}: {details}"


def urgency(name: str, where: str) -> int:
    try:
        return URGENCIES[name.lower()]
    except KeyError:
        raise ConfigError(f"{where} {name!r} must be one of {', '.join(URGENCIES)}") from None


class _Rule:
    __slots__ = ("glob", "title", "body", "tag", "urgency")

    def __init__(self, glob: str, entry: MappingEntry, default_urgency: int):
        where = f"toasty options.mapping[{glob!r}]"
        self.glob = glob
        self.title = Template(entry.title, f"{where}.title")
        self.body = Template(entry.body, f"{where}.body")
        self.tag = Template(entry.tag, f"{where}.tag")
        self.urgency = urgency(entry.urgency, f"{where}.urgency") if entry.urgency else default_urgency


class Toasty:
    """Handler class: one instance per member, one gRPC channel per event loop."""

    def __init__(self, options: dict):
        self.options = opts = load_options(ToastyOptions, options, "toasty")
        raw = opts.mapping
        if raw is None:
            raw = {k: msgspec.convert(v, MappingEntry) for k, v in DEFAULT_MAPPING.items()}
        if not raw:
            raise ConfigError("toasty options.mapping is empty: no event would ever be sent")
        default_urgency = urgency(opts.urgency, "toasty options.urgency")
        self.rules = Rules((glob, _Rule(glob, e, default_urgency)) for glob, e in raw.items())
        self._credentials = channel_credentials(opts)
        self._channel_options = list(CHANNEL_OPTIONS)
        if opts.tls is not None and opts.tls.server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", opts.tls.server_name))
        if self._credentials is None and opts.insecure:
            host = target_host(opts.target)
            if host is not None and not is_loopback(host):
                log.warning("toasty_insecure", target=opts.target, reason="insecure: true, plaintext gRPC")
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ToastyStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def notification(self, event: Event) -> pb.Notification | None:
        """The notification for `event`, or None if no mapping entry matches its type."""
        rule = self.rules.match(event.type)
        if rule is None:
            return None
        data = event_data(event)
        return pb.Notification(
            title=rule.title.render(data),
            body=rule.body.render(data),
            app=self.options.app,
            urgency=rule.urgency,
            tag=rule.tag.render(data),
            event_id=event.id,
            correlation_id=event.correlation_id or "",
        )

    async def handle(self, event: Event, ctx) -> None:
        note = self.notification(event)  # TemplateError -> handler error, retried, then DLQ
        if note is None:
            ctx.log.debug("toasty_skipped", type=event.type, reason="no mapping entry matches")
            return
        try:
            reply = await self._get_stub().Notify(note, timeout=self.options.timeout)
        except grpc.aio.AioRpcError as exc:
            error = ToastyUnavailable if exc.code() in TRANSIENT else ToastyError
            failure = describe_failure(exc, self.options.tls)
            raise error(f"toasty {self.options.target}: Notify failed: {failure}", exc.code()) from None
        if reply.accepted:
            ctx.log.debug("toasty_sent", notification_id=reply.id)
        else:
            # The server got it and chose not to show it (e.g. do-not-disturb): not a failure.
            ctx.log.warning("toasty_not_accepted", notification_id=reply.id)

    async def health(self) -> bool:
        """True if the server answers SERVING within the deadline (for probes)."""
        try:
            reply = await self._get_stub().Health(pb.HealthRequest(), timeout=self.options.timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == pb.HealthReply.SERVING

    def _get_stub(self) -> pb_grpc.ToastyStub:
        # A grpc.aio channel belongs to the loop it was made in: make it lazily inside the
        # running loop, and again if the handler is driven from a new loop (tests).
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            target, options = self.options.target, self._channel_options
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            self._stub = pb_grpc.ToastyStub(self._channel)
            self._loop = loop
        return self._stub

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close()

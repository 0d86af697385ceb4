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
          mapping:                    # event-type glob -> templates; first match wins
            "email.received": {title: "{payload.from}", body: "{payload.subject}", urgency: critical}
            "*": {title: "{event.type}", body: "{event.source}"}

A given `mapping` replaces the built-in one (`DEFAULT_MAPPING`); an event whose type
matches no entry is skipped. Template syntax: see `workers.mapping`. A gRPC failure
raises `ToastyError`, so the runtime retries the event with backoff.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import grpc
import msgspec

from nexus.errors import ConfigError, DependencyError, NexusError
from nexus.proto.toasty.v1 import toasty_pb2 as pb
from nexus.proto.toasty.v1 import toasty_pb2_grpc as pb_grpc
from nexus.protocol.events import Event
from workers.mapping import Rules, Template, event_data, load_options

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


class ToastyOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    target: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1:50051"
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    app: str = "nexus"
    urgency: str = "normal"
    mapping: dict[str, MappingEntry] | None = None


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
            raise error(
                f"toasty {self.options.target}: Notify failed: {exc.code().name}: {exc.details()}", exc.code()
            ) from None
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
            self._channel = grpc.aio.insecure_channel(self.options.target, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.ToastyStub(self._channel)
            self._loop = loop
        return self._stub

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close()

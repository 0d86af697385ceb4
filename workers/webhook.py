"""Webhook sink: POSTs each event as JSON to a URL.

Config::

    workers:
      hook:
        handler: workers.webhook:Webhook
        subscribe: ["email.*"]
        options:
          url: https://example.com/hooks/nexus     # required
          timeout: 5            # seconds per socket operation (connect, send, each read)
          headers:              # a value is a string, or {env: VAR, prefix: "..."}: read from
            X-Source: nexus     # the environment when the handler is built (secrets stay
            Authorization: {env: WEBHOOK_TOKEN, prefix: "Bearer "}   # out of the config file)
          retries: 3            # extra attempts on 5xx / connection errors (0.2 s, 0.4 s, ...)

Body: {"id", "type", "source", "time", "key", "priority", "correlation_id", "v",
"payload"}; headers Content-Type: application/json and X-Nexus-Event-Id (delivery is
at least once: receivers dedupe on it). 2xx is success. 5xx and connection errors are
retried here first; 4xx (and anything else) raises at once, since sending the same
request again will not help soon. Either way a final failure raises `WebhookError` and
the runtime's own retry (and dead-lettering) takes over.

A header `{env: VAR}` whose variable is unset or empty is a config error naming the
header and the variable (never a value); header values are never logged.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import threading
import urllib.parse
from typing import Annotated

import msgspec

from nexus import __version__
from nexus.common import redact
from nexus.errors import ConfigError, DependencyError, NexusError, PermanentError
from nexus.protocol.events import Event
from workers.mapping import load_options

MAX_KEPT_BODY = 64 * 1024  # read at most this much of a response (and keep the conn)
STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class FromEnv(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A header value read from the environment: `prefix` + the value of `env`."""

    env: Annotated[str, msgspec.Meta(min_length=1)]
    prefix: str = ""


class WebhookOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    headers: dict[str, str | FromEnv] = {}
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 0.2  # first delay; doubles each retry


class WebhookError(NexusError):
    """The POST failed; `status` is the HTTP status (None for connection errors)."""

    def __new__(cls, message: str, status: int | None = None, retryable: bool = True):
        # 5xx and connection errors mean the endpoint is down (circuit breaker);
        # other statuses mean this request is refused (dead letter at once)
        if cls is WebhookError:
            cls = WebhookUnavailable if retryable else WebhookRejected
        return super().__new__(cls, message)

    def __init__(self, message: str, status: int | None = None, retryable: bool = True):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class WebhookUnavailable(WebhookError, DependencyError):
    pass


class WebhookRejected(WebhookError, PermanentError):
    pass


def header_values(headers: dict[str, str | FromEnv]) -> dict[str, str]:
    """The configured headers with `{env: VAR}` values read from the environment."""
    out = {}
    for name, spec in headers.items():
        where = f"webhook options.headers.{name}"
        if isinstance(spec, FromEnv):
            value = os.environ.get(spec.env)
            if not value:
                raise ConfigError(f"{where}: environment variable {spec.env} is not set or empty")
            value, source = spec.prefix + value, f"environment variable {spec.env}"
            redact.register(value)  # read from the environment: no log line may show it
        else:
            value, source = spec, "value"
        # http.client would refuse these per request, quoting the value (a secret) in the error
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{where}: the {source} holds a line break or NUL, which a header cannot carry")
        out[name] = value
    return out


class Webhook:
    """Handler class. HTTP runs in threads (stdlib http.client) with a keep-alive pool."""

    def __init__(self, options: dict):
        if not (options or {}).get("url"):
            raise ConfigError("webhook: options.url is required (the URL to POST events to)")
        self.options = opts = load_options(WebhookOptions, options, "webhook")
        parts = urllib.parse.urlsplit(opts.url)
        # Error messages name the URL without its query and user info (they may hold a token).
        self._shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"webhook options.url {self._shown!r} must be an http:// or https:// URL")
        try:
            self._port = parts.port
        except ValueError as exc:
            raise ConfigError(f"webhook options.url {self._shown!r}: {exc}") from None
        if parts.username is not None:
            raise ConfigError(
                "webhook options.url must not carry credentials: put them in options.headers (e.g. Authorization)"
            )
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"nexus-webhook/{__version__}",
            **header_values(opts.headers),
        }
        self._idle: list[http.client.HTTPConnection] = []  # kept-alive connections
        self._lock = threading.Lock()  # the pool is used from threads

    @staticmethod
    def body(event: Event) -> bytes:
        return msgspec.json.encode(
            {
                "id": event.id,
                "type": event.type,
                "source": event.source,
                "time": event.time,
                "key": event.key,
                "priority": event.priority,
                "correlation_id": event.correlation_id,
                "v": event.v,
                "payload": msgspec.to_builtins(event.payload),
            }
        )

    async def handle(self, event: Event, ctx) -> None:
        body = self.body(event)
        headers = {**self._headers, "X-Nexus-Event-Id": event.id}
        opts = self.options
        for attempt in range(1, opts.retries + 2):
            try:
                status = await asyncio.to_thread(self._post, body, headers)
                ctx.log.debug("webhook_sent", status=status, attempt=attempt)
                return
            except WebhookError as exc:
                if not exc.retryable or attempt > opts.retries:
                    if exc.retryable:
                        raise WebhookError(f"{exc} (gave up after {attempt} attempts)", exc.status) from None
                    raise
                delay = opts.backoff * 2 ** (attempt - 1)
                ctx.log.warning("webhook_retry", error=str(exc), attempt=attempt, delay=delay)
                await asyncio.sleep(delay)

    def _post(self, body: bytes, headers: dict[str, str]) -> int:
        """One POST (runs in a worker thread); returns the 2xx status or raises WebhookError."""
        for fresh in (False, True):
            conn, reused = self._take(fresh)
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read(MAX_KEPT_BODY)
                reusable = not resp.will_close and resp.read(1) == b""
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and isinstance(exc, STALE_ERRORS):
                    continue  # the server closed an idle kept-alive connection: not a failure
                raise WebhookError(f"webhook POST {self._shown}: {type(exc).__name__}: {exc}") from None
        if reusable:
            self._give(conn)
        else:
            conn.close()
        if 200 <= resp.status < 300:
            return resp.status
        excerpt = data[:200].decode("utf-8", "replace").strip()
        raise WebhookError(
            f"webhook POST {self._shown}: HTTP {resp.status} {resp.reason}" + (f": {excerpt}" if excerpt else ""),
            resp.status,
            retryable=resp.status >= 500,
        )

    def _take(self, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused): an idle kept-alive one unless `fresh`, else a new one."""
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop(), True
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.options.timeout), False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

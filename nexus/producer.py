"""Producer SDK: `Producer` (sync, thread-safe) and `AsyncProducer` (asyncio).

    with Producer("tcp://127.0.0.1:5556", source="parrot") as p:
        p.send("parrot.notification", {...})
        p.flush(5)          # confirm mode: returns when the router journaled everything

Confirm mode (default) talks DEALER to the router's `confirm` endpoint and keeps a
window of unacked events, resending on timeout; fire mode PUSHes to `ingest`.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from . import transport
from .errors import EventError, NexusError, PeerError, RejectedError
from .events import TYPE_RE, Contracts, Event, encode, new_id
from .outbox import Outbox
from .wire import reply_decoder

DEFAULT_WINDOW = 20_000
_wake_ids = itertools.count()


class _EventMaker:
    """Validation and encoding shared by both producers."""

    def __init__(self, source: str, max_event_bytes: int):
        if not source or len(source) > 128:
            raise EventError("source must be 1..128 characters")
        self.source = source
        self.max_event_bytes = max_event_bytes
        # validates against contracts imported in this process; types without one
        # go as they are and the router decides (it has the configured contracts)
        self.contracts = Contracts()

    def make(self, type_: str, payload: Any, key: str | None, priority: int,
             correlation_id: str | None, v: int, event_id: str | None) -> tuple[str, bytes]:
        if not TYPE_RE.match(type_):
            raise EventError(f"event type {type_!r} is not dotted lowercase, e.g. 'file.created'")
        if not 1 <= priority <= 10:
            raise EventError(f"priority must be 1..10, got {priority}")
        if self.contracts.struct_for(type_, v) is not None:
            payload = self.contracts.convert(type_, v, payload)
        event_id = event_id or new_id()
        event = Event(type=type_, source=self.source, payload=payload, id=event_id, time=time.time(),
                      key=key, priority=priority, correlation_id=correlation_id, v=v)
        try:
            data = encode(event)
        except (TypeError, msgspec.EncodeError) as exc:
            raise EventError(f"payload of {type_} cannot be encoded: {exc}") from None
        if len(data) > self.max_event_bytes:
            raise EventError(f"event {type_} is {len(data)} bytes, over the limit of {self.max_event_bytes}")
        return event_id, data


def _raise_errors(errors: list[RejectedError]) -> None:
    if not errors:
        return
    first = errors[0]
    if len(errors) > 1:
        raise RejectedError(first.event_id, f"{first.reason} (and {len(errors) - 1} more rejected)")
    raise first


class Producer:
    """Thread-safe producer; a background thread owns the socket and batches."""

    def __init__(self, endpoint: str, *, source: str, confirm: bool = True,
                 window: int = DEFAULT_WINDOW, ack_timeout: float = 3.0,
                 max_event_bytes: int = 2**20):
        self.endpoint = endpoint
        self.confirm = confirm
        self._maker = _EventMaker(source, max_event_bytes)
        self._outbox = Outbox(uuid.uuid4().hex, confirm, window, ack_timeout)
        self._cond = threading.Condition()
        self._ctx = zmq.Context.instance()
        wake = f"inproc://nexus-producer-wake-{next(_wake_ids)}"
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(wake)
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(wake)
        self._signaled = False
        self._closing = False
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._io, name="nexus-producer", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------
    def send(self, type: str, payload: Any, *, key: str | None = None, priority: int = 5,
             correlation_id: str | None = None, v: int = 1, id: str | None = None) -> str:
        event_id, data = self._maker.make(type, payload, key, priority, correlation_id, v, id)
        with self._cond:
            while not self._outbox.has_room():
                self._check_open()
                self._cond.wait(0.1)
            self._check_open()
            self._outbox.add(event_id, data)
            if not self._signaled:
                self._signaled = True
                self._wake_w.send(b"")
        return event_id

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event is sent (fire) or ACKed (confirm); raise NACKs."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._outbox.idle():
                if self._failure is not None:
                    raise PeerError(f"producer I/O failed: {self._failure}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"router at {self.endpoint} did not confirm "
                                    f"{self._outbox.in_flight()} events within {timeout:g}s")
                self._cond.wait(min(left, 0.1))
            errors = self._outbox.take_errors()
        _raise_errors(errors)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._wake_w.send(b"")
            self._thread.join(timeout=5)
            self._wake_w.close(0)
            self._closed = True

    @property
    def stats(self) -> dict:
        return {"sent": self._outbox.sent_events, "resent": self._outbox.resends,
                "in_flight": self._outbox.in_flight()}

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close(timeout=1.0)
            except NexusError:
                pass

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise NexusError("producer is closed")
        if self._failure is not None:
            raise PeerError(f"producer I/O failed: {self._failure}")

    # -- I/O thread --------------------------------------------------------------------
    def _io(self) -> None:
        kind = zmq.DEALER if self.confirm else zmq.PUSH
        sock = transport.connect(self._ctx, kind, self.endpoint, linger_ms=2000)
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.confirm:
            poller.register(sock, zmq.POLLIN)
        outbox, cond = self._outbox, self._cond
        try:
            while True:
                now = time.monotonic()
                with cond:
                    self._signaled = False
                    messages = outbox.resend_batches(now)
                    while (batch := outbox.next_batch(now)) is not None:
                        messages.append(batch)
                    if not self.confirm and messages:
                        cond.notify_all()
                    closing = self._closing
                    wait = outbox.next_deadline(now)
                for message in messages:
                    sock.send(message)
                if closing:
                    return
                events = dict(poller.poll(max(1, int(wait * 1000)) if not messages else 0))
                if self._wake_r in events:
                    while self._wake_r.poll(0):
                        self._wake_r.recv()
                if sock in events:
                    replies = []
                    while sock.poll(0):
                        replies.append(sock.recv())
                    with cond:
                        now = time.monotonic()
                        for raw in replies:
                            try:
                                outbox.on_reply(reply_decoder.decode(raw), now)
                            except msgspec.MsgspecError:
                                outbox.errors.append(RejectedError("-", "unreadable reply from router"))
                        cond.notify_all()
        except BaseException as exc:  # surfaced to the caller by send/flush
            with cond:
                self._failure = exc
                cond.notify_all()
        finally:
            sock.close(linger=2000 if not self.confirm else 0)
            self._wake_r.close(0)


class AsyncProducer:
    """The asyncio twin of `Producer`: `await send(...)`, `await flush()`."""

    def __init__(self, endpoint: str, *, source: str, confirm: bool = True,
                 window: int = DEFAULT_WINDOW, ack_timeout: float = 3.0,
                 max_event_bytes: int = 2**20):
        self.endpoint = endpoint
        self.confirm = confirm
        self._maker = _EventMaker(source, max_event_bytes)
        self._outbox = Outbox(uuid.uuid4().hex, confirm, window, ack_timeout)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def _start(self) -> None:
        if self._sock is None:
            kind = zmq.DEALER if self.confirm else zmq.PUSH
            self._sock = transport.connect(self._ctx, kind, self.endpoint, linger_ms=2000)
            self._tasks.append(asyncio.ensure_future(self._sender()))
            if self.confirm:
                self._tasks.append(asyncio.ensure_future(self._receiver()))

    async def send(self, type: str, payload: Any, *, key: str | None = None, priority: int = 5,
                   correlation_id: str | None = None, v: int = 1, id: str | None = None) -> str:
        if self._closed:
            raise NexusError("producer is closed")
        self._start()
        event_id, data = self._maker.make(type, payload, key, priority, correlation_id, v, id)
        while not self._outbox.has_room():
            self._changed.clear()
            await self._changed.wait()
        self._outbox.add(event_id, data)
        self._wake.set()
        return event_id

    async def flush(self, timeout: float = 10.0) -> None:
        self._start()
        deadline = time.monotonic() + timeout
        while not self._outbox.idle():
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"router at {self.endpoint} did not confirm "
                                f"{self._outbox.in_flight()} events within {timeout:g}s")
            self._changed.clear()
            try:
                async with asyncio.timeout(min(left, 0.1)):
                    await self._changed.wait()
            except TimeoutError:
                pass
        _raise_errors(self._outbox.take_errors())

    async def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        try:
            if self._sock is not None:
                await self.flush(timeout)
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._sock is not None:
                self._sock.close(linger=2000 if not self.confirm else 0)

    async def __aenter__(self) -> "AsyncProducer":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            try:
                await self.close(timeout=1.0)
            except NexusError:
                pass

    async def _sender(self) -> None:
        outbox = self._outbox
        while True:
            now = time.monotonic()
            messages = outbox.resend_batches(now)
            while (batch := outbox.next_batch(now)) is not None:
                messages.append(batch)
            for message in messages:
                await self._sock.send(message)
            if messages and not self.confirm:
                self._changed.set()
            self._wake.clear()
            if outbox.pending:
                continue
            try:
                # asyncio.timeout, not wait_for: wait_for can swallow a cancel (3.11)
                async with asyncio.timeout(max(outbox.next_deadline(time.monotonic()), 0.001)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _receiver(self) -> None:
        while True:
            raw = await self._sock.recv()
            try:
                self._outbox.on_reply(reply_decoder.decode(raw), time.monotonic())
            except msgspec.MsgspecError:
                self._outbox.errors.append(RejectedError("-", "unreadable reply from router"))
            self._changed.set()
            self._wake.set()   # rate-limited events may be due again

"""Producer SDK: `Producer` (sync, thread-safe) and `AsyncProducer` (asyncio).

    with Producer("tcp://127.0.0.1:5556", source="parrot") as p:
        p.send("parrot.notification", {...})
        p.flush(5)          # confirm mode: returns when the router journaled everything

Confirm mode (default) talks DEALER to the router's `confirm` endpoint and keeps a
window of unacked events, resending on timeout; fire mode PUSHes to `ingest`, and its
close() waits (within its timeout) until ZeroMQ handed every queued message to the router.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from nexus.errors import EventError, NexusError, PeerError, RejectedError
from nexus.producer.outbox import MAX_BATCH_EVENTS, Outbox
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys, client_keys
from nexus.protocol.events import CONTROL_RE, TYPE_RE, Contracts, Event, new_id
from nexus.protocol.wire import reply_decoder

DEFAULT_WINDOW = 20_000
_wake_ids = itertools.count()


class _EventMaker:
    """Validation and encoding shared by both producers."""

    def __init__(self, source: str, max_event_bytes: int):
        if not source or len(source) > 128:
            raise EventError("source must be 1..128 characters")
        _refuse_controls("source", source)
        self.source = source
        self.max_event_bytes = max_event_bytes
        # validates against contracts imported in this process; types without one
        # go as they are and the router decides (it has the configured contracts)
        self.contracts = Contracts()
        # type names that passed TYPE_RE (the regex was the costliest check per event);
        # bounded, so a caller inventing type names cannot grow it without limit
        self._good_types: set[str] = set()
        self._good_keys: set[str] = set()  # the same for partition keys (control chars)
        self._encode = msgspec.msgpack.Encoder().encode

    def make(
        self,
        type_: str,
        payload: Any,
        key: str | None,
        priority: int,
        correlation_id: str | None,
        v: int,
        event_id: str | None,
    ) -> tuple[str, bytes]:
        if type_ not in self._good_types:
            if not TYPE_RE.match(type_):
                raise EventError(f"event type {type_!r} is not dotted lowercase, e.g. 'file.created'")
            if len(self._good_types) < 10_000:
                self._good_types.add(type_)
        if not 1 <= priority <= 10:
            raise EventError(f"priority must be 1..10, got {priority}")
        if key is not None and key not in self._good_keys:
            _refuse_controls("key", key)
            if len(self._good_keys) < 10_000:
                self._good_keys.add(key)
        if correlation_id is not None:
            _refuse_controls("correlation_id", correlation_id)
        # looked up every time: a contract module imported later still applies
        if self.contracts.struct_for(type_, v) is not None:
            payload = self.contracts.convert(type_, v, payload)
        event_id = event_id or new_id()
        event = Event(type_, self.source, payload, event_id, time.time(), key, priority, correlation_id, v)
        try:
            data = self._encode(event)
        except (TypeError, msgspec.EncodeError) as exc:
            raise EventError(f"payload of {type_} cannot be encoded: {exc}") from None
        if len(data) > self.max_event_bytes:
            raise EventError(f"event {type_} is {len(data)} bytes, over the limit of {self.max_event_bytes}")
        return event_id, data


def _refuse_controls(field: str, value: str) -> None:
    # the router NACKs these as malformed: they would reach terminals and logs raw
    if CONTROL_RE.search(value) is not None:
        raise EventError(f"{field} {value!r} contains control characters")


def _raise_errors(errors: list[RejectedError]) -> None:
    if not errors:
        return
    first = errors[0]
    if len(errors) > 1:
        raise RejectedError(first.event_id, f"{first.reason} (and {len(errors) - 1} more rejected)")
    raise first


# Adaptive batching. Under sustained load the I/O thread naps after sending a batch, so the
# next batch grows instead of the thread waking (and sending a message) for every event;
# without it the two threads ping-pong the GIL one event at a time. It naps only while the
# rate measured over the last RATE_WINDOW is high; otherwise it waits for a wake-up, so
# an event sent to an idle producer goes out at once.
NAP_MS = 1  # the nap (zmq poll resolution); an event waits at most this long
NAP_MIN_RATE = 30_000.0  # events/s: nap only at or above this rate (about 30 per nap)
RATE_WINDOW = 0.002  # seconds over which the rate is measured
NAP_WAKE_AT = MAX_BATCH_EVENTS // 2  # pending events that end a nap early
LINGER_MIN = 0.01  # seconds; see Producer._io
# Fire mode: batches ZeroMQ may queue for the router. Events handed to the socket leave
# the window, so this (not the window) bounds them: at most FIRE_HWM * MAX_BATCH_EVENTS;
# beyond it the I/O thread blocks, the window fills and send() blocks. Confirm mode is
# bounded by its window of unacked events.
FIRE_HWM = 100


def _not_confirmed(endpoint: str, outbox: Outbox, timeout: float) -> PeerError:
    """A flush gave up: name the router's reason when it refused events retryably
    (storage_unavailable, rate_limited), so the caller never sees a bare timeout."""
    msg = f"router at {endpoint} did not confirm {outbox.in_flight()} events within {timeout:g}s"
    if outbox.retry_reason:
        msg += f"; last refusal (retryable, still retrying): {outbox.retry_reason}"
    err = PeerError(msg)
    err.reason = outbox.retry_reason
    return err


def _socket_hwm(confirm: bool) -> int:
    return transport.DEFAULT_HWM if confirm else FIRE_HWM


class _Closing:
    """close() of either producer. A fire-mode socket lingers until close's deadline (at
    least LINGER_MIN, so that "delivered" and "lingered out" can be told apart); the
    context's term() then returns once ZeroMQ handed every queued message to the router,
    or when the linger ran out, and then those messages were dropped."""

    def __init__(self, endpoint: str, timeout: float):
        self.endpoint = endpoint
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.linger = 0.0
        self.closed_at = 0.0  # monotonic; set when a fire-mode socket was closed lingering

    def close_socket(self, sock: zmq.Socket, fire: bool) -> None:
        if fire:
            self.linger = max(LINGER_MIN, self.deadline - time.monotonic())
            self.closed_at = time.monotonic()
        sock.close(linger=int(self.linger * 1000))

    def check_delivered(self) -> None:
        """After the context's term(): raise PeerError if the linger ran out."""
        if self.closed_at and time.monotonic() - self.closed_at >= self.linger - 0.001:
            raise PeerError(
                f"fire mode: events still queued for the router at {self.endpoint} when "
                f"close's {self.timeout:g}s ran out were dropped (router down or backed up)"
            )


class Producer:
    """Thread-safe producer; a background thread owns the socket and batches."""

    def __init__(
        self,
        endpoint: str,
        *,
        source: str,
        confirm: bool = True,
        window: int = DEFAULT_WINDOW,
        ack_timeout: float = 3.0,
        max_event_bytes: int = 2**20,
        curve: ClientKeys | None | Literal["env"] = "env",
    ):
        self.endpoint = endpoint
        self.confirm = confirm
        # CURVE for a tcp:// endpoint: these keys, or by default those the environment
        # names (NEXUS_CURVE_SECRET_KEY_FILE, NEXUS_CURVE_SERVER_KEY); None: plain
        self._curve = client_keys() if curve == "env" else curve
        self._maker = _EventMaker(source, max_event_bytes)
        self._outbox = Outbox(uuid.uuid4().hex, confirm, window, ack_timeout)
        # send() takes only this plain lock (cheap); waiting for room or for flush uses
        # the condition on it, and the I/O thread notifies only when someone waits
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        # our own context: close() terminates it, which is what makes ZeroMQ deliver what
        # it still queues (fire mode) before close() returns, or tell us it could not
        self._ctx = zmq.Context()
        wake = f"inproc://nexus-producer-wake-{next(_wake_ids)}"
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(wake)
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(wake)
        # False: the I/O thread waits for a wake-up message (the next send() sends one);
        # True: one is on its way, or the thread is busy or napping
        self._signaled = False
        self._closing: _Closing | None = None  # set by close(): the I/O thread ends
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._io, name="nexus-producer", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------
    def send(
        self,
        type: str,
        payload: Any,
        *,
        key: str | None = None,
        priority: int = 5,
        correlation_id: str | None = None,
        v: int = 1,
        id: str | None = None,
    ) -> str:
        event_id, data = self._maker.make(type, payload, key, priority, correlation_id, v, id)
        outbox = self._outbox
        with self._lock:
            if self._closing is not None or self._failure is not None or not outbox.has_room():
                self._wait_for_room()
            outbox.add(event_id, data)
            if not self._signaled or len(outbox.pending) == NAP_WAKE_AT:
                self._signaled = True
                self._wake_w.send(b"")
        return event_id

    def _wait_for_room(self) -> None:
        """With the lock held: block until the window has room; raise if closed or failed."""
        self._check_open()
        self._wake_w.send(b"")  # the I/O thread may be napping: the window is full
        self._waiting += 1
        try:
            while not self._outbox.has_room():
                self._check_open()
                self._cond.wait(0.1)
            self._check_open()
        finally:
            self._waiting -= 1

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event is sent (fire) or ACKed (confirm); raise NACKs."""
        if not self.settle(timeout, take_errors=False)[0]:
            with self._cond:
                raise _not_confirmed(self.endpoint, self._outbox, timeout)
        with self._cond:
            errors = self._outbox.take_errors()
        _raise_errors(errors)

    def settle(self, timeout: float = 10.0, take_errors: bool = True) -> tuple[bool, list[RejectedError]]:
        """Wait (up to `timeout`) until every event sent so far is settled; returns (all
        settled, the NACKs so far) instead of raising them, so a caller can tell which
        events were rejected (a member fails each rejected follow-up's cause)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._outbox.idle() and not self._closed:
                self._wake_w.send(b"")  # the I/O thread may be napping
            self._waiting += 1
            try:
                while not self._outbox.idle():
                    if self._failure is not None:
                        raise PeerError(f"producer I/O failed: {self._failure}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.1))
            finally:
                self._waiting -= 1
            return self._outbox.idle(), self._outbox.take_errors() if take_errors else []

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop. Fire mode: also wait (within `timeout`) until ZeroMQ handed
        every queued message to the router; raise PeerError if it could not."""
        if self._closed:
            return
        closing = _Closing(self.endpoint, timeout)
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closing = closing
                self._wake_w.send(b"")
            self._thread.join(timeout=5)
            with self._lock:
                self._closed = True
                self._wake_w.close(0)
            # blocks until the sockets are closed (a still blocked I/O thread gets ETERM and
            # closes its socket) and the fire-mode socket delivered its queue or lingered out
            self._ctx.term()
        closing.check_delivered()

    @property
    def stats(self) -> dict:
        return {"sent": self._outbox.sent_events, "resent": self._outbox.resends, "in_flight": self._outbox.in_flight()}

    def __enter__(self) -> Producer:
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
        if self._closing is not None or self._closed:
            raise NexusError("producer is closed")
        if self._failure is not None:
            raise PeerError(f"producer I/O failed: {self._failure}")

    # -- I/O thread --------------------------------------------------------------------
    def _io(self) -> None:
        kind = zmq.DEALER if self.confirm else zmq.PUSH
        sock = transport.connect(
            self._ctx, kind, self.endpoint, linger_ms=0, hwm=_socket_hwm(self.confirm), curve=self._curve
        )
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.confirm:
            poller.register(sock, zmq.POLLIN)
        outbox, cond = self._outbox, self._cond
        rate_start, rate_count, busy = 0.0, 0, False
        try:
            while True:
                # re-armed before taking: an event added after this point either is taken
                # below or its sender sends a wake-up
                self._signaled = False
                closing = self._closing is not None
                now = time.monotonic()
                messages = outbox.resend_batches(now)
                before = outbox.sent_events
                while (batch := outbox.next_batch(now)) is not None:
                    messages.append(batch)
                for message in messages:
                    sock.send(message)
                if messages and not self.confirm and self._waiting:
                    with cond:  # fire mode: sent is settled; room for blocked senders
                        cond.notify_all()
                if closing:
                    return
                taken = outbox.sent_events - before
                rate_count += taken
                if now - rate_start >= RATE_WINDOW:
                    busy = rate_count >= NAP_MIN_RATE * (now - rate_start)
                    rate_start, rate_count = now, 0
                if taken and busy:
                    # sustained load: stay "signaled" so senders leave us alone for NAP_MS
                    # (unless NAP_WAKE_AT events pile up or the window is full)
                    self._signaled = True
                    timeout = NAP_MS
                elif messages:
                    timeout = 0  # look again at once: more may have come meanwhile
                else:
                    timeout = max(1, int(outbox.next_deadline(time.monotonic()) * 1000))
                events = dict(poller.poll(timeout))
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
            if self._closing is not None:
                # fire mode: what ZeroMQ still queues goes out while close() terminates the
                # context; confirm mode needs no linger: flush already saw every event ACKed
                self._closing.close_socket(sock, fire=not self.confirm)
            else:
                sock.close(linger=0)  # failed: close() raises that failure
            self._wake_r.close(0)


class AsyncProducer:
    """The asyncio twin of `Producer`: `await send(...)`, `await flush()`."""

    def __init__(
        self,
        endpoint: str,
        *,
        source: str,
        confirm: bool = True,
        window: int = DEFAULT_WINDOW,
        ack_timeout: float = 3.0,
        max_event_bytes: int = 2**20,
        curve: ClientKeys | None | Literal["env"] = "env",
    ):
        self.endpoint = endpoint
        self.confirm = confirm
        # CURVE for a tcp:// endpoint: these keys, or by default those the environment
        # names (NEXUS_CURVE_SECRET_KEY_FILE, NEXUS_CURVE_SERVER_KEY); None: plain
        self._curve = client_keys() if curve == "env" else curve
        self._maker = _EventMaker(source, max_event_bytes)
        self._outbox = Outbox(uuid.uuid4().hex, confirm, window, ack_timeout)
        self._ctx = zmq.asyncio.Context()  # our own: see Producer (close() terminates it)
        self._sock: zmq.asyncio.Socket | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def _start(self) -> None:
        if self._sock is None:
            kind = zmq.DEALER if self.confirm else zmq.PUSH
            self._sock = sock = transport.connect(
                self._ctx, kind, self.endpoint, linger_ms=0, hwm=_socket_hwm(self.confirm), curve=self._curve
            )
            self._tasks.append(asyncio.ensure_future(self._sender(sock)))
            if self.confirm:
                self._tasks.append(asyncio.ensure_future(self._receiver(sock)))

    async def send(
        self,
        type: str,
        payload: Any,
        *,
        key: str | None = None,
        priority: int = 5,
        correlation_id: str | None = None,
        v: int = 1,
        id: str | None = None,
    ) -> str:
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
                raise _not_confirmed(self.endpoint, self._outbox, timeout)
            self._changed.clear()
            try:
                async with asyncio.timeout(min(left, 0.1)):
                    await self._changed.wait()
            except TimeoutError:
                pass
        _raise_errors(self._outbox.take_errors())

    async def close(self, timeout: float = 10.0) -> None:
        """As `Producer.close`: fire mode waits (within `timeout`) until ZeroMQ handed every
        queued message to the router and raises PeerError if it could not."""
        if self._closed:
            return
        closing = _Closing(self.endpoint, timeout)
        try:
            if self._sock is not None:
                await self.flush(timeout)
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._sock is not None:
                closing.close_socket(self._sock, fire=not self.confirm)
            # in a thread: term() blocks until the queue is delivered or the linger ran out
            await asyncio.to_thread(self._ctx.term)
        closing.check_delivered()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            try:
                await self.close(timeout=1.0)
            except NexusError:
                pass

    async def _sender(self, sock: zmq.asyncio.Socket) -> None:
        outbox = self._outbox
        while True:
            now = time.monotonic()
            messages = outbox.resend_batches(now)
            while (batch := outbox.next_batch(now)) is not None:
                messages.append(batch)
            for message in messages:
                await sock.send(message)
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

    async def _receiver(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            raw = await sock.recv()
            try:
                self._outbox.on_reply(reply_decoder.decode(raw), time.monotonic())
            except msgspec.MsgspecError:
                self._outbox.errors.append(RejectedError("-", "unreadable reply from router"))
            self._changed.set()
            self._wake.set()  # rate-limited events may be due again

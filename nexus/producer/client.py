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
import collections
import itertools
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Literal, cast

import msgspec
import structlog
import zmq
import zmq.asyncio

from nexus.errors import EventError, NexusError, PeerError, RejectedError
from nexus.producer.outbox import MAX_BATCH_EVENTS, Outbox
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys, client_keys
from nexus.protocol.events import CONTROL_RE, TYPE_RE, Contracts, Event, new_id
from nexus.protocol.wire import batch_decoder, reply_decoder

log = structlog.get_logger("nexus.producer")

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
REPLY_CHECK_MS = 100  # confirm mode: the idle I/O thread checks for replies at least this often
STUCK_CHECK_MS = 10  # a full socket: the I/O thread tries again at least this often


def _not_confirmed(endpoint: str, outbox: Outbox, timeout: float) -> PeerError:
    """A flush gave up: name the router's reason when it refused events retryably
    (storage_unavailable, rate_limited), so the caller never sees a bare timeout."""
    msg = f"router at {endpoint} did not confirm {outbox.in_flight()} events within {timeout:g}s"
    if outbox.retry_reason:
        msg += f"; last refusal (retryable, still retrying): {outbox.retry_reason}"
    err = PeerError(msg)
    err.reason = outbox.retry_reason
    return err


def _events(sock: zmq.Socket) -> int:
    """ZMQ_EVENTS (no GIL release, unlike poll); on a zmq.asyncio socket `get` is the
    override that re-arms the loop's edge-triggered watch."""
    return cast(int, sock.get(zmq.EVENTS))


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
        # events never handed to ZeroMQ: the last message(s) still waited for room in the
        # socket's queue (the router backed up) when close's time ran out
        self.dropped = 0

    def count_dropped(self, held: Iterable[bytes], pending: int) -> None:
        self.dropped = pending + sum(len(batch_decoder.decode(m).events) for m in held)

    def close_socket(self, sock: zmq.Socket, fire: bool) -> None:
        if fire:
            self.linger = max(LINGER_MIN, self.deadline - time.monotonic())
            self.closed_at = time.monotonic()
        sock.close(linger=int(self.linger * 1000))

    def check_delivered(self) -> None:
        """After the context's term(): raise PeerError if the linger ran out or messages
        never reached ZeroMQ."""
        if self.dropped:
            raise PeerError(
                f"fire mode: {self.dropped} events not yet handed to ZeroMQ when close's "
                f"{self.timeout:g}s ran out were dropped (the router at {self.endpoint} is down or backed up)"
            )
        if self.closed_at and time.monotonic() - self.closed_at >= self.linger - 0.001:
            raise PeerError(
                f"fire mode: events still queued for the router at {self.endpoint} when "
                f"close's {self.timeout:g}s ran out were dropped (router down or backed up)"
            )


class Producer:
    """Thread-safe producer; a background thread batches, times resends and reads replies.

    Who sends: whoever holds `_io_lock` owns the socket and the outbox's I/O side. Usually
    that is the I/O thread; but a caller that never sleeps keeps the interpreter lock, and
    the I/O thread then waits a switch interval (5 ms) for it at every turn, so events
    left to it went out up to a second late. So send() sends the pending events itself
    once they are due (outbox.due: the oldest waited DUE_S); the I/O thread still sends
    an idle tail, resends and fire-mode backpressure. Why not sys.setswitchinterval: it is
    the whole process's setting (the application's threads, not ours), and even at 0.1 ms
    each hand-over of the lock would still cost the I/O thread one interval per turn.
    """

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
        # taken after _lock, never before it (the I/O thread takes _lock inside it)
        self._io_lock = threading.Lock()
        self._sock: zmq.Socket | None = None  # set and closed by the I/O thread, under _io_lock
        # messages encoded and numbered but not yet sent, in order: whoever holds _io_lock
        # sends these first (a caller's non-blocking send found the socket full)
        self._held: collections.deque[bytes] = collections.deque()
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
            # due now (an event after a quiet spell, or a batch a busy caller kept from the
            # I/O thread): sent below, so the I/O thread is not woken for it
            due = outbox.due(time.monotonic())
            if not due and (not self._signaled or len(outbox.pending) == NAP_WAKE_AT):
                self._signaled = True
                self._poke()
        if due:
            self._send_due()
        return event_id

    def _send_due(self) -> None:
        """From the caller's thread: send the pending events (see the class docstring).
        Blocking on _io_lock is what lets a starved I/O thread finish: the wait releases
        the interpreter lock (and nobody holds _io_lock across a blocking call). Never
        blocks on the socket: what it cannot take now stays held, in order."""
        with self._io_lock:
            sock = self._sock
            if sock is None or self._closing is not None or self._failure is not None:
                self._wake()  # not connected yet, closing or failed: the I/O thread's case
                return
            try:
                sent = self._send_ready(sock, time.monotonic())
            except zmq.ZMQError:
                sent = False  # held: the I/O thread meets the error again and fails as usual
            # held (the socket is full): the I/O thread waits for room; a reply that came
            # meanwhile: this call may have taken the socket's FD signal (edge triggered)
            wake = bool(self._held) or bool(self._outbox.pending) or (self.confirm and bool(_events(sock) & zmq.POLLIN))
            if wake or (sent and not self.confirm and self._waiting):
                with self._cond:
                    if wake and not self._signaled and not self._closed:
                        self._signaled = True
                        self._poke()
                    self._cond.notify_all()  # fire mode: sent is settled; room for blocked senders

    def _poke(self) -> None:
        """Wake the I/O thread; never blocks. A full wake pipe already holds a wake-up, and
        one whose reader is gone (the I/O thread ended) has nobody to wake: a blocking
        send there hung close() for good after an I/O failure."""
        try:
            self._wake_w.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _wake(self) -> None:
        with self._lock:
            if not self._signaled and not self._closed:
                self._signaled = True
                self._poke()

    def _send_ready(self, sock: zmq.Socket, now: float) -> bool:
        """Under _io_lock: send the held messages, then the pending events, while the socket
        takes them without blocking; a batch is taken only once nothing is held, so at most
        one (besides resends) waits for room. Returns whether anything was sent."""
        held, outbox = self._held, self._outbox
        sent = False
        while True:
            if not held:
                batch = outbox.next_batch(now)
                if batch is None:
                    return sent
                held.append(batch)
            if not _events(sock) & zmq.POLLOUT:
                return sent
            try:
                sock.send(held[0], zmq.NOBLOCK)
            except zmq.Again:
                return sent
            held.popleft()
            sent = True

    def _wait_for_room(self) -> None:
        """With the lock held: block until the window has room; raise if closed or failed."""
        self._check_open()
        self._poke()  # the I/O thread may be napping: the window is full
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
                self._poke()  # the I/O thread may be napping
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
                self._poke()
            # the I/O thread hands the last message(s) over, blocking while the router is
            # backed up: wait for it as long as close may take (a 5 s cap here ended it
            # with ETERM and the message it held was dropped without a word)
            self._thread.join(timeout=max(closing.deadline - time.monotonic(), 0.0) + 1.0)
            with self._lock:
                self._closed = True
                self._wake_w.close(0)
            # blocks until the sockets are closed (a still blocked I/O thread gets ETERM and
            # closes its socket) and the fire-mode socket delivered its queue or lingered out
            self._ctx.term()
            self._thread.join(timeout=5)  # after ETERM: what it held is final now
            if not self.confirm:
                closing.count_dropped(self._held, len(self._outbox.pending))
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
        with self._io_lock:
            sock = self._sock = transport.connect(
                self._ctx, kind, self.endpoint, linger_ms=0, hwm=_socket_hwm(self.confirm), curve=self._curve
            )
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        # replies and room to send: wait on the socket's FD, not the socket, since callers use
        # the socket too (under _io_lock) and a zmq socket is not thread-safe; whoever
        # touched it last checks ZMQ_EVENTS (the FD is edge triggered)
        poller.register(sock.getsockopt(zmq.FD), zmq.POLLIN)
        outbox, cond, io_lock, held = self._outbox, self._cond, self._io_lock, self._held
        rate_start, rate_count, busy, seen = 0.0, 0, False, 0
        try:
            while True:
                # re-armed before taking: an event added after this point either is taken
                # below or its sender sends a wake-up
                self._signaled = False
                closing = self._closing is not None
                with io_lock:
                    now = time.monotonic()
                    held.extend(outbox.resend_batches(now))
                    if closing:
                        # what the socket did not take yet (flush saw it taken): as before
                        # close, blocking, then the fire-mode socket lingers
                        while (batch := outbox.next_batch(now)) is not None:
                            held.append(batch)
                        while held:
                            sock.send(held[0])
                            held.popleft()
                        return
                    # never blocks with _io_lock held: a caller may be waiting for it
                    sent = self._send_ready(sock, now)
                    if sent and not self.confirm and self._waiting:
                        with cond:  # fire mode: sent is settled; room for blocked senders
                            cond.notify_all()
                    replies = []
                    while _events(sock) & zmq.POLLIN:  # also resets the FD's signal
                        replies.append(sock.recv(zmq.NOBLOCK))
                    stuck = bool(held)
                    if replies:
                        with cond:
                            now = time.monotonic()
                            for raw in replies:
                                try:
                                    outbox.on_reply(reply_decoder.decode(raw), now)
                                except msgspec.MsgspecError:
                                    outbox.errors.append(RejectedError("-", "unreadable reply from router"))
                            cond.notify_all()
                # sent by anyone (callers send due batches too): the rate at which to nap
                taken, seen = outbox.sent_events - seen, outbox.sent_events
                rate_count += taken
                if now - rate_start >= RATE_WINDOW:
                    busy = rate_count >= NAP_MIN_RATE * (now - rate_start)
                    rate_start, rate_count = now, 0
                if stuck:
                    timeout = STUCK_CHECK_MS  # the FD signals room; this bounds a missed signal
                elif taken and busy:
                    # sustained load: stay "signaled" so senders leave us alone for NAP_MS
                    # (unless NAP_WAKE_AT events pile up or the window is full)
                    self._signaled = True
                    timeout = NAP_MS
                elif sent or replies:
                    timeout = 0  # look again at once: more may have come meanwhile
                else:
                    # at most REPLY_CHECK_MS in confirm mode: a safety net for the FD's edge
                    timeout = max(1, int(outbox.next_deadline(time.monotonic()) * 1000))
                    if self.confirm:
                        timeout = min(timeout, REPLY_CHECK_MS)
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    while _events(self._wake_r) & zmq.POLLIN:
                        self._wake_r.recv(zmq.NOBLOCK)
        except BaseException as exc:  # surfaced to the caller by send/flush
            log.error("producer_io_failed", endpoint=self.endpoint, error=repr(exc), exc_info=True)
            with cond:
                self._failure = exc
                cond.notify_all()
        finally:
            with io_lock:
                self._sock = None
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
        # messages taken from the outbox but not yet sent, in order (the first goes first,
        # whoever sends it); send() sends directly only while the sender task is not
        # waiting for the socket with the first of them
        self._held: collections.deque[bytes] = collections.deque()
        self._sender_waiting = False
        # send() sends through a plain shadow of the socket: the zmq.asyncio socket's own
        # send and EVENTS read schedule a loop callback each time while the receiver waits,
        # and a caller that never yields piled up two per event. The loop's watch of the
        # socket is re-checked once, at the next loop turn, instead (_recheck).
        self._plain: zmq.Socket | None = None
        self._recheck_due = False

    def _start(self) -> None:
        if self._sock is None:
            kind = zmq.DEALER if self.confirm else zmq.PUSH
            self._sock = sock = transport.connect(
                self._ctx, kind, self.endpoint, linger_ms=0, hwm=_socket_hwm(self.confirm), curve=self._curve
            )
            self._plain = zmq.Socket.shadow(sock.underlying)
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
        outbox = self._outbox
        outbox.add(event_id, data)
        # a caller that does not yield to the loop (computing between sends; send() awaits
        # nothing while the window has room) would keep the sender task from running: send
        # due events from here, as Producer.send does; an event after a quiet spell is due
        # at once (outbox.IDLE_GAP_S), without a turn of the loop for the sender task
        if not self._sender_waiting and (self._held or outbox.due(time.monotonic())):
            self._send_due()
        if outbox.pending or self._held:
            self._wake.set()
        return event_id

    def _send_due(self) -> None:
        plain, outbox, held = self._plain, self._outbox, self._held
        if plain is None:
            return
        now = time.monotonic()
        sent = False
        while True:
            if not held:
                batch = outbox.next_batch(now)
                if batch is None:
                    break
                held.append(batch)
            if not _events(plain) & zmq.POLLOUT:
                break  # full: held, for the sender task (or the next send) once there is room
            try:
                plain.send(held[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            held.popleft()
            sent = True
        if not self._recheck_due:
            # the plain socket may have taken the FD's edge the loop waits on (a reply)
            self._recheck_due = True
            asyncio.get_running_loop().call_soon(self._recheck)
        if sent and not self.confirm:
            self._changed.set()

    def _recheck(self) -> None:
        """At the loop's next turn (nothing awaiting the socket could run before it): the
        zmq.asyncio socket's EVENTS read wakes what awaits an event that is ready."""
        self._recheck_due = False
        if self._sock is not None and not self._closed:
            _events(self._sock)

    async def flush(self, timeout: float = 10.0) -> None:
        self._start()
        deadline = time.monotonic() + timeout
        # held: taken (fire mode: counted out) but not sent yet; close() cancels the sender
        while not self._outbox.idle() or self._held:
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
                await self.flush(timeout)  # fire mode: until the sender handed every message over
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._sock is not None:
                closing.close_socket(self._sock, fire=not self.confirm)
            # in a thread: term() blocks until the queue is delivered or the linger ran out
            await asyncio.to_thread(self._ctx.term)
            if not self.confirm:
                closing.count_dropped(self._held, len(self._outbox.pending))
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
        outbox, held = self._outbox, self._held
        while True:
            now = time.monotonic()
            held.extend(outbox.resend_batches(now))
            while (batch := outbox.next_batch(now)) is not None:
                held.append(batch)
            sent = bool(held)
            while held:
                self._sender_waiting = True  # held[0] is ours until sent: send() holds back
                try:
                    await sock.send(held[0])
                finally:
                    self._sender_waiting = False
                held.popleft()
            if sent and not self.confirm:
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

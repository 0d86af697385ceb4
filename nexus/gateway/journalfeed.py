"""What /v1/subscribe reads the journal with: `JournalReader`, one subscriber's `Read`
requests to the router over its own asyncio DEALER, and `TailWake`, a wake-up for
subscribers that have caught up, shared by all of them.

The journal is the truth: a subscriber always reads it from its last seq, so it can
never skip an event. The tail topic only says "something new was journaled" so a
caught-up subscriber reads again at once instead of at its next poll; a wake-up lost on
the way (SUB may drop, and with CURVE only an admin key may subscribe to the tail) costs
latency up to `POLL`, never an event.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import structlog
import zmq
import zmq.asyncio

from nexus.config import Config
from nexus.errors import NexusError, PeerError
from nexus.protocol import transport
from nexus.protocol.curve import client_keys
from nexus.protocol.wire import TAIL_TOPIC, Error, Journaled, Read, encoder, journaled_decoder

log = structlog.get_logger("nexus.gateway")

READ_TIMEOUT = 5.0  # seconds for the router's answer to one Read (it answers at once)
POLL = 0.5  # a caught-up subscriber reads again after this long even without a wake-up
LINGER = 5.0  # seconds the tail subscription outlives the last subscriber


class JournalReader:
    """One subscriber's Read requests, one at a time over its own DEALER (answers come in
    order). A request that times out closes the socket: its late answer must not be
    taken for the next one's."""

    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context | None = None):
        self.endpoint = cfg.coord
        self.curve = client_keys(cfg)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None

    async def read(self, after: int, types: list[str], limit: int, max_bytes: int = 0) -> Journaled:
        if self.sock is None:
            self.sock = transport.connect(self.ctx, zmq.DEALER, self.endpoint, linger_ms=0, curve=self.curve)
        sock = self.sock
        await sock.send(encoder.encode(Read(after=after, limit=limit, types=types, max_bytes=max_bytes)))
        if not await sock.poll(int(READ_TIMEOUT * 1000)):  # (POLLIN, the default)
            self.close()
            raise PeerError(f"router at {self.endpoint} did not answer within {READ_TIMEOUT:g}s")
        raw = await sock.recv()
        try:
            reply = journaled_decoder.decode(raw)
        except msgspec.MsgspecError as exc:
            raise NexusError(f"unreadable answer from the router: {exc}") from None
        if isinstance(reply, Error):
            raise NexusError(f"router: {reply.reason}")
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class TailWake:
    """The highest seq the tail has shown, and a wake-up for the subscribers waiting for
    one past theirs. A thread holds the SUB socket only while someone waits (the router
    encodes the tail only while it has a subscriber), lingering a few seconds after."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.head = 0  # highest seq seen on the tail
        self.changed = asyncio.Event()  # replaced after each wake-up (all waiters see the set one)
        self.users = 0
        self.idle_since = 0.0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.closed = False

    def attach(self) -> None:
        with self.lock:
            self.users += 1
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._run, name="gateway-tail", daemon=True)
                self.thread.start()

    def detach(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users <= 0:
                self.idle_since = time.monotonic()

    async def wait_past(self, seq: int, timeout: float = POLL) -> None:
        """Return when the tail shows a seq > `seq`, or after `timeout`."""
        if self.head > seq:
            return
        changed = self.changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            thread = self.thread
        if thread is not None:
            thread.join(2)

    def _bump(self, seq: int) -> None:
        if seq > self.head:
            self.head = seq
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()

    def _done(self) -> bool:
        with self.lock:
            if self.closed or (self.users <= 0 and time.monotonic() - self.idle_since > LINGER):
                self.thread = None
                return True
            return False

    def _run(self) -> None:
        try:
            sub = transport.subscriber(zmq.Context.instance(), self.cfg.publish, curve=client_keys(self.cfg))
        except Exception as exc:  # no wake-ups: subscribers poll
            log.warning("subscribe_tail_unavailable", error=str(exc))
            with self.lock:
                self.thread = None
            return
        sub.setsockopt(zmq.SUBSCRIBE, TAIL_TOPIC)
        try:
            for payload in transport.topic_payloads(sub, TAIL_TOPIC, self._done):
                seq = _last_seq(payload)
                if seq and not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(self._bump, seq)
        except Exception as exc:  # subscribers poll; the next attach starts a new thread
            log.error("subscribe_tail_failed", error=str(exc))
            with self.lock:
                self.thread = None
        finally:
            sub.close(0)


class _Seqs(msgspec.Struct, array_like=True):
    """A tail Delivery with its events left unread (only the seqs matter here)."""

    prev: int
    seqs: list[int]
    events: msgspec.Raw


_seqs_decoder = msgspec.msgpack.Decoder(_Seqs)


def _last_seq(frame: bytes) -> int:
    try:
        seqs = _seqs_decoder.decode(frame).seqs
    except msgspec.MsgspecError:
        return 0
    return seqs[-1] if seqs else 0

"""The gateway's link to the router: a confirmed producer (DEALER to `router.confirm`,
docs/PROTOCOL.md) that answers each event with the router's own verdict.

The SDK's AsyncProducer settles a whole flush; the gateway must answer each HTTP event
(and each /v1/stream message) with its id and `accepted` or the router's NACK reason,
and must not journal an id twice across retries and its own restarts. So this speaks the
protocol itself: events wait in `pending`, go out in batches of up to MAX_BATCH_EVENTS
with the producer seqs of the ledger (nexus/gateway/ledger.py) and settle when a reply's
`ack` covers them, each resolving its future. Resends are go-back-N after ACK_TIMEOUT
with the same seqs and bytes (the router drops what it journaled already), and a
`sequence_gap` below our oldest seq renumbers, as the SDK's Outbox does.

An event id already accepted answers at once (duplicate); one in flight shares the
first submission's future, so two racing retries still journal it once.
"""

from __future__ import annotations

import asyncio
import collections
import time

import msgspec
import structlog
import zmq
import zmq.asyncio

from nexus.gateway.ledger import Ledger, Unsettled
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys
from nexus.protocol.wire import ProducerBatch, ProducerReply, encoder, reply_decoder

log = structlog.get_logger("nexus.gateway")

MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 4 * 2**20
ACK_TIMEOUT = 3.0  # seconds before the unacked events are sent again
WINDOW = 20_000  # events sent and not settled; submitters wait for room beyond it ...
WINDOW_BYTES = 64 * 2**20  # ... or beyond this many bytes of them (the gateway's memory)
GAP = "sequence_gap:"


SCOPE = "\x1f"  # between a token's name and an event id in the ledger's keys (in neither)


def scoped(token: str, event_id: str) -> str:
    return f"{token}{SCOPE}{event_id}"


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event's answer, as the HTTP reply and the stream's ack carry it."""

    id: str
    status: str  # accepted | rejected | pending
    reason: str = ""
    duplicate: bool = False  # accepted earlier: not journaled again
    retry_after: float = 0.0  # rejected retryably (rate_limited, storage_unavailable)


class Upstream:
    def __init__(self, endpoint: str, ledger: Ledger, curve: ClientKeys | None):
        self.endpoint = endpoint
        self.ledger = ledger
        self.curve = curve
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self.inflight: dict[str, asyncio.Future[Result]] = {}  # event id -> its answer
        self.inflight_bytes = sum(len(u.data) for u in ledger.unsettled.values())
        self.sent_at = 0.0  # monotonic time the oldest unacked batch went out
        self.last_reply = time.monotonic()
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.counts = {"accepted": 0, "rejected": 0, "duplicate": 0, "resent": 0}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.sock = transport.connect(self.ctx, zmq.DEALER, self.endpoint, linger_ms=0, curve=self.curve)
        loop = asyncio.get_running_loop()
        # what the last gateway sent and never saw settled: again, same seqs and bytes
        for u in self.ledger.unsettled.values():
            self.inflight[u.event_id] = loop.create_future()
        if self.ledger.unsettled:
            log.info("gateway_resending", events=len(self.ledger.unsettled))
            self.sent_at = time.monotonic() - ACK_TIMEOUT  # due at once
        self.tasks = [asyncio.ensure_future(self._sender()), asyncio.ensure_future(self._receiver())]

    async def close(self, timeout: float) -> None:
        """Wait (up to `timeout`) for what is in flight to settle, then stop."""
        deadline = time.monotonic() + timeout
        while self.unsettled() and time.monotonic() < deadline:
            self.room.clear()
            try:
                async with asyncio.timeout(0.05):
                    await self.room.wait()
            except TimeoutError:
                pass
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()
        self.ledger.close()

    # -- submitting ---------------------------------------------------------------------
    def unsettled(self) -> int:
        return len(self.pending) + len(self.ledger.unsettled)

    def has_room(self) -> bool:
        return self.unsettled() < WINDOW and self.inflight_bytes < WINDOW_BYTES

    async def wait_room(self) -> None:
        while not self.has_room():
            self.room.clear()
            await self.room.wait()

    def submit(self, event_id: str, data: bytes, token: str) -> asyncio.Future[Result]:
        """The future of the event's answer (see the module docstring for duplicates).

        An id is an idempotency key within the token that sent it: another token's event
        with the same id is its own event (a client that learned or guessed a partner's
        ids must not make the gateway answer `duplicate` for events it never journaled)."""
        key = scoped(token, event_id)
        fut = self.inflight.get(key)
        if fut is not None:
            return fut
        fut = asyncio.get_running_loop().create_future()
        if key in self.ledger.accepted:
            self.counts["duplicate"] += 1
            fut.set_result(Result(event_id, "accepted", duplicate=True))
            return fut
        self.inflight[key] = fut
        self.inflight_bytes += len(data)
        self.pending.append((key, data))
        self.wake.set()
        return fut

    def router_late(self) -> bool:
        """Events wait for the router longer than ACK_TIMEOUT: it is down or stuck."""
        return bool(self.ledger.unsettled) and time.monotonic() - self.sent_at > ACK_TIMEOUT

    # -- the socket ---------------------------------------------------------------------
    async def _sender(self) -> None:
        assert self.sock is not None
        sock, ledger = self.sock, self.ledger
        while True:
            now = time.monotonic()
            if ledger.unsettled and now - self.sent_at >= ACK_TIMEOUT:
                await self._resend(now)
            if self.pending:
                # one turn of the loop first: the other requests read in this turn submit
                # theirs too, and go in the same batch (one send and one ledger write)
                await asyncio.sleep(0)
            while self.pending:
                batch: list[Unsettled] = []
                size = 0
                while self.pending and len(batch) < MAX_BATCH_EVENTS and size < MAX_BATCH_BYTES:
                    event_id, data = self.pending.popleft()
                    batch.append(Unsettled(ledger.next_pseq, event_id, data))
                    ledger.next_pseq += 1
                    size += len(data)
                try:
                    ledger.sent(batch)  # before the router can have it: see ledger.py
                except OSError as exc:  # a full disk: refused retryably, the gateway goes on
                    ledger.next_pseq = batch[0].pseq
                    log.error("gateway_ledger_unwritable", error=str(exc), events=len(batch))
                    for u in batch:
                        self.inflight_bytes -= len(u.data)
                        why = f"storage_unavailable: the gateway's ledger could not be written ({exc.strerror or exc})"
                        self._answer(Result(u.event_id, "rejected", why, retry_after=1.0))
                    continue
                if len(ledger.unsettled) == len(batch):
                    self.sent_at = time.monotonic()  # nothing was waiting: the oldest waits from now
                floor = next(iter(ledger.unsettled))
                await sock.send(self._encode(batch, floor))
            self.wake.clear()
            wait = ACK_TIMEOUT - (time.monotonic() - self.sent_at) if ledger.unsettled else 1.0
            try:
                async with asyncio.timeout(max(wait, 0.01)):
                    await self.wake.wait()
            except TimeoutError:
                pass

    def _encode(self, batch: list[Unsettled], floor: int) -> bytes:
        events = [msgspec.Raw(u.data) for u in batch]
        return encoder.encode(ProducerBatch(events, self.ledger.producer_id, batch[0].pseq, floor))

    async def _resend(self, now: float) -> None:
        """Go-back-N: every unacked event again, same seqs and bytes."""
        assert self.sock is not None
        unacked = list(self.ledger.unsettled.values())
        self.sent_at = now
        self.counts["resent"] += len(unacked)
        floor = unacked[0].pseq
        for i in range(0, len(unacked), MAX_BATCH_EVENTS):
            await self.sock.send(self._encode(unacked[i : i + MAX_BATCH_EVENTS], floor))

    async def _receiver(self) -> None:
        assert self.sock is not None
        while True:
            raw = await self.sock.recv()
            self.last_reply = time.monotonic()
            try:
                reply = reply_decoder.decode(raw)
            except msgspec.MsgspecError:
                log.warning("gateway_unreadable_reply")
                continue
            self._on_reply(reply)
            self.room.set()
            self.wake.set()

    def _on_reply(self, reply: ProducerReply) -> None:
        ledger = self.ledger
        if reply.error:
            # the router refused a whole message (never resent as it is): fail what is unacked
            failed = list(ledger.unsettled.values())
            ledger.dropped([u.pseq for u in failed])
            for u in failed:
                self.inflight_bytes -= len(u.data)
                self._answer(Result(u.event_id, "rejected", reply.error))
            return
        oldest = next(iter(ledger.unsettled), None)
        if reply.nacks and reply.nacks[0].reason.startswith(GAP) and oldest is not None and reply.ack < oldest - 1:
            self._renumber(reply.ack)
            return
        nacks = {n.seq: n for n in reply.nacks if n.seq <= reply.ack}
        done = ledger.settled(reply.ack, list(nacks))
        if done:
            self.sent_at = time.monotonic()  # the next oldest waits from now
        for u in done:
            self.inflight_bytes -= len(u.data)
            nack = nacks.get(u.pseq)
            if nack is None:
                self._answer(Result(u.event_id, "accepted"))
            elif nack.retry_after > 0:
                self._answer(Result(u.event_id, "rejected", nack.reason, retry_after=nack.retry_after))
            else:  # (not retry_after=0.0: omit_defaults leaves out only the default itself)
                self._answer(Result(u.event_id, "rejected", nack.reason))

    def _renumber(self, ack: int) -> None:
        """The router does not know the seqs between `ack` and our oldest (NACKed before
        it restarted, or a ledger from an older run): number ours from ack + 1, resend."""
        ledger = self.ledger
        unacked = list(ledger.unsettled.values())
        ledger.dropped([u.pseq for u in unacked])
        pseq = ack + 1
        renumbered = []
        for u in unacked:
            renumbered.append(Unsettled(pseq, u.event_id, u.data))
            pseq += 1
        ledger.next_pseq = pseq
        ledger.sent(renumbered)
        self.sent_at = time.monotonic() - ACK_TIMEOUT  # the sender resends them at once
        log.info("gateway_renumbered", events=len(renumbered), from_seq=ack + 1)

    def _answer(self, result: Result) -> None:
        """`result.id` is the scoped key (token, id); the client gets its own id back."""
        self.counts[result.status] += 1
        fut = self.inflight.pop(result.id, None)
        if fut is not None and not fut.done():
            fut.set_result(msgspec.structs.replace(result, id=result.id.partition(SCOPE)[2]))

"""The producer's bookkeeping, free of sockets: pending events, the window of
unacked events, producer sequence numbers, resends and NACKs.

Shared by the sync `Producer` (socket in a background thread) and the asyncio
`AsyncProducer`, so both behave exactly alike.

Threads (sync `Producer`): callers `add` (serialized by the producer's lock) and read
`in_flight`/`has_room`/`idle`/`due`; everything else runs under the producer's I/O lock,
held by the I/O thread or by a caller sending a due batch itself. `pending` is a deque
(append and popleft are atomic in CPython) and the in-flight count is `added - settled`,
two counters with one writer each, so the I/O side takes events and counts them out
without the caller's lock. A stale `settled` only makes the window look fuller: the window
is never exceeded.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import msgspec

from nexus.errors import RejectedError
from nexus.protocol.wire import ProducerBatch, ProducerReply, encoder

MAX_BATCH_EVENTS = 1000
# A caller sends the pending events itself (instead of leaving them to the I/O thread,
# which a caller that never sleeps starves: see Producer) once they are due: the oldest
# waited DUE_S, or, while they come at DUE_RATE or more (the rate at which the I/O
# thread naps too), DUE_MAX_S so that batches stay large under load
# (what fits in the socket's queue and the router's cost per message depend on it), or
# DUE_EVENTS piled up.
# An event that comes after a quiet spell (nothing was taken for IDLE_GAP_S and nothing else
# is pending) is due at once: at a low rate every event leaves from the caller's send
# without waiting for (or waking) the I/O thread, one thread hand-over less on its way.
# Under load pending events pile up within microseconds, so batching is unchanged.
# DUE_S is short for the same reason: below DUE_RATE a batch is small anyway, and a caller
# that never sleeps but is preempted (a busy host) comes back with a burst of events.
IDLE_GAP_S = 0.00005
DUE_S = 0.00025
DUE_MAX_S = 0.004
DUE_RATE = 30_000.0
DUE_EVENTS = MAX_BATCH_EVENTS // 2
MAX_BATCH_BYTES = 4 * 2**20
GAP = "sequence_gap:"  # NACK category of a batch the router refused as out of sequence


@dataclass
class Unacked:
    pseq: int
    event_id: str
    data: bytes
    sent: float


class Outbox:
    def __init__(self, producer_id: str, confirm: bool, window: int, ack_timeout: float):
        self.producer_id = producer_id
        self.confirm = confirm
        self.window = window
        self.ack_timeout = ack_timeout
        self.pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self.unacked: collections.deque[Unacked] = collections.deque()  # in pseq order
        self.next_pseq = 1
        self.errors: list[RejectedError] = []
        self.retry_later: list[tuple[float, str, bytes]] = []  # retryable NACK: (when, id, data)
        self.retry_reason = ""  # the router's reason for the retryable NACKs still being retried
        self.resends = 0
        self.renumbered = 0  # times the unacked window was renumbered after a sequence_gap
        self.sent_events = 0
        self.added = 0  # events ever added: written by callers only
        self.settled = 0  # events that left: sent (fire), acked or failed (confirm); I/O side only
        # monotonic time the oldest pending event was added (written by callers when pending
        # was empty; a race with the I/O side only makes a batch look due early)
        self.oldest_at = 0.0
        self.taken_at = 0.0  # monotonic time events were last taken for sending; I/O side only

    # -- caller side ------------------------------------------------------------
    def add(self, event_id: str, data: bytes) -> None:
        self.added += 1  # counted before it is visible: never counted out first
        if not self.pending:
            self.oldest_at = time.monotonic()
        self.pending.append((event_id, data))

    def due(self, now: float) -> bool:
        """Pending events waited long enough (or piled up): the caller should send them."""
        pending = len(self.pending)
        if pending >= DUE_EVENTS:
            return True
        if pending == 1 and now - self.taken_at >= IDLE_GAP_S:
            return True  # alone after a quiet spell: at once (IDLE_GAP_S)
        age = now - self.oldest_at
        # pending / age: the rate since the oldest pending event came
        return pending > 0 and age >= DUE_S and (pending < DUE_RATE * age or age >= DUE_MAX_S)

    def in_flight(self) -> int:
        """Pending, unacked and waiting for a rate-limit retry."""
        return self.added - self.settled

    def has_room(self) -> bool:
        # fire mode too: a producer faster than the router blocks in send() instead of
        # piling events up in memory (its own, or the router's)
        return self.added - self.settled < self.window

    def idle(self) -> bool:
        return self.in_flight() == 0

    def take_errors(self) -> list[RejectedError]:
        errors, self.errors = self.errors, []
        return errors

    # -- I/O side -------------------------------------------------------------------
    def next_batch(self, now: float) -> bytes | None:
        """The next message to send, or None. Pending events go out in batches of up
        to MAX_BATCH_EVENTS / MAX_BATCH_BYTES: whatever accumulated while we were busy."""
        self._release_rate_limited(now)
        if not self.pending:
            return None
        events: list[msgspec.Raw] = []
        size = 0
        first = self.next_pseq
        while self.pending and len(events) < MAX_BATCH_EVENTS and size < MAX_BATCH_BYTES:
            event_id, data = self.pending.popleft()
            events.append(msgspec.Raw(data))
            size += len(data)
            if self.confirm:
                self.unacked.append(Unacked(self.next_pseq, event_id, data, now))
                self.next_pseq += 1
        self.sent_events += len(events)
        self.taken_at = now
        if self.confirm:
            return encoder.encode(ProducerBatch(events, self.producer_id, first, self.unacked[0].pseq))
        self.settled += len(events)  # fire mode: handed to the socket is done
        return encoder.encode(ProducerBatch(events))

    def resend_batches(self, now: float) -> list[bytes]:
        """Go-back-N: when the oldest unacked event timed out, resend all unacked."""
        if not self.unacked or now - self.unacked[0].sent < self.ack_timeout:
            return []
        batches = []
        floor = self.unacked[0].pseq
        chunk: list[Unacked] = []
        size = 0
        for u in self.unacked:
            if chunk and (len(chunk) >= MAX_BATCH_EVENTS or size + len(u.data) > MAX_BATCH_BYTES):
                batches.append(self._encode_resend(chunk, floor))
                chunk, size = [], 0
            u.sent = now
            chunk.append(u)
            size += len(u.data)
        if chunk:
            batches.append(self._encode_resend(chunk, floor))
        self.resends += len(self.unacked)
        return batches

    def _encode_resend(self, chunk: list[Unacked], floor: int) -> bytes:
        return encoder.encode(
            ProducerBatch([msgspec.Raw(u.data) for u in chunk], self.producer_id, chunk[0].pseq, floor)
        )

    def on_reply(self, reply: ProducerReply, now: float) -> None:
        if reply.error:
            # the router refused a whole message (it is never resent as it is): fail
            # what is unacked with that reason instead of resending it forever
            for u in self.unacked:
                self.errors.append(RejectedError(u.event_id, reply.error))
            self.settled += len(self.unacked)
            self.unacked.clear()
            return
        if (
            reply.nacks
            and reply.nacks[0].reason.startswith(GAP)
            and self.unacked
            and reply.ack < self.unacked[0].pseq - 1
        ):
            self._renumber(reply.ack, now)
            return
        nacks = {n.seq: n for n in reply.nacks} if reply.nacks else None
        settled = 0
        while self.unacked and self.unacked[0].pseq <= reply.ack:
            u = self.unacked.popleft()
            nack = nacks.get(u.pseq) if nacks else None
            if nack is not None and nack.retry_after > 0:
                # retryable (rate limited, storage unavailable): not an error and still in
                # flight; send it again (as a new sequence) after retry_after
                self.retry_later.append((now + nack.retry_after, u.event_id, u.data))
                self.retry_reason = nack.reason
                continue
            if nack is not None:
                self.errors.append(RejectedError(u.event_id, nack.reason))
            settled += 1
        self.settled += settled
        if settled and not self.retry_later and not nacks:
            self.retry_reason = ""  # the router takes events again

    def _renumber(self, ack: int, now: float) -> None:
        """The router settled nothing above `ack` (its rule: only seqs it saw), yet our
        oldest unacked seq is above ack + 1: the seqs between were NACKed before a router
        restart and it does not remember them. Number the unacked events from ack + 1
        (the router has none of those seqs) and resend them at once."""
        pseq = ack + 1
        for u in self.unacked:
            u.pseq = pseq
            u.sent = now - self.ack_timeout
            pseq += 1
        self.next_pseq = pseq
        self.renumbered += 1

    def _release_rate_limited(self, now: float) -> None:
        if not self.retry_later:
            return
        due = [r for r in self.retry_later if r[0] <= now]
        if due:
            self.retry_later = [r for r in self.retry_later if r[0] > now]
            for _, event_id, data in sorted(due, key=lambda r: r[0]):
                self.pending.append((event_id, data))

    def next_deadline(self, now: float) -> float:
        """Seconds until something time-based is due (resend or rate-limit retry)."""
        deadlines = []
        if self.unacked:
            deadlines.append(self.unacked[0].sent + self.ack_timeout)
        if self.retry_later:
            deadlines.append(min(r[0] for r in self.retry_later))
        if not deadlines:
            return 0.05
        return max(0.0, min(deadlines) - now)


def monotonic() -> float:
    return time.monotonic()

"""What becomes of a handler call's outcome (no sockets): the circuit breaker, retries with
backoff, and dead letters until the router confirms it stored them.

The runtime asks `admit` before a call starts while the breaker is not closed, and `judge`
once a call ended: the head is done, retried after a delay, or dead-lettered. A dead-lettered
head stays busy, so it is not acked and the partition keeps it, until the router says it
stored it (`stored`); the message is sent again on a timeout (`resends`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from nexus.common.backoff import backoff_delay
from nexus.config import RetryConfig
from nexus.errors import DependencyError, PermanentError
from nexus.member.breaker import CLOSED, OPEN, CircuitBreaker
from nexus.member.group import GroupClient
from nexus.member.stream import PartitionStream

DEAD_LETTER_RESEND = 3.0  # seconds without the router's confirmation: send the dead letter again


class Verdict(NamedTuple):
    action: str  # "done", "retry" (after `delay` seconds) or "dead_letter"
    delay: float = 0.0


DONE = Verdict("done")
DEAD_LETTER = Verdict("dead_letter")


class OutcomePolicy:
    def __init__(self, retry: RetryConfig, breaker: CircuitBreaker, client: GroupClient, log: Any):
        self.retry = retry
        self.breaker = breaker
        self.client = client
        self.log = log
        self.failed = 0  # failed calls, retried or not
        self.retried = 0  # failed calls to be tried again
        self.dead_lettered = 0  # confirmed stored by the router

    @property
    def closed(self) -> bool:
        """The breaker is closed: calls start freely, and only failures need `judge`."""
        return self.breaker.state == CLOSED

    def admit(self, now: float) -> float:
        """Breaker not closed: 0 when a call may start now (the half-open probe), else the
        seconds to wait before asking again (nothing is taken while open: events wait in
        their queues and in the journal)."""
        before = self.breaker.state
        allowed = self.breaker.allow(now)
        if self.breaker.state != before:
            self.log.warning("breaker_half_open", probe_in=0)
        if allowed:
            return 0.0
        return max(self.breaker.retry_in(now), 0.05)

    def judge(self, st: PartitionStream, error: BaseException | None) -> Verdict:
        """A call on `st`'s head ended with `error` (None: it succeeded). On a retry the head
        waits (`st.waiting`) with its attempt counted up, for the runtime's timer."""
        st.busy = False
        self._breaker_outcome(error)
        if error is None:
            return DONE
        seq, w = st.queue[0]
        retry = self.retry
        self.failed += 1
        if st.attempt == 1:
            st.first_failed = time.time()
        dependency = isinstance(error, DependencyError)
        if not dependency and (st.attempt >= retry.attempts or isinstance(error, PermanentError)):
            return DEAD_LETTER
        delay = min(backoff_delay(retry.backoff, st.attempt), retry.max_backoff)
        delay *= 1 + random.uniform(-retry.jitter, retry.jitter)
        self.log.warning(
            "handler_failed",
            event_id=w.id,
            type=w.type,
            seq=seq,
            attempt=st.attempt,
            retry_in=round(delay, 3),
            error=f"{type(error).__name__}: {error}",
        )
        st.attempt += 1
        st.waiting = True
        self.retried += 1
        return Verdict("retry", delay)

    def _breaker_outcome(self, error: BaseException | None) -> None:
        if error is None and self.breaker.state == CLOSED:
            return  # the common case, per event: nothing to do
        now = time.monotonic()
        if isinstance(error, DependencyError):
            changed = self.breaker.failure(now)
        else:
            changed = self.breaker.success()  # the dependency answered
        if changed == OPEN:
            self.log.error("breaker_opened", reset_in=self.breaker.reset, error=f"{type(error).__name__}: {error}")
        elif changed == CLOSED:
            self.log.warning("breaker_closed")

    # -- dead letters -----------------------------------------------------------------------
    def dead_letter(self, st: PartitionStream, error: BaseException) -> bytes:
        """The DeadLetter message for `st`'s head, to send to the router's store; the head
        stays busy until `stored`."""
        seq, w = st.queue[0]
        message = self.client.dead_letter(st.partition, seq, w, error, st.attempt, st.first_failed)
        st.busy = True
        st.dead_letter = (message, time.monotonic())
        self.log.error(
            "event_dead_lettered",
            event_id=w.id,
            type=w.type,
            seq=seq,
            attempts=st.attempt,
            error=f"{type(error).__name__}: {error}",
        )
        return message

    def stored(self, st: PartitionStream | None, seq: int) -> bool:
        """The router stored the dead letter of seq: True when that is `st`'s head, which is
        finished now (the runtime pops it); False for a resend's second answer, or a stream
        dropped meanwhile."""
        if st is None or st.dead_letter is None or not st.queue or st.queue[0][0] != seq:
            return False
        st.dead_letter = None
        st.busy = False
        self.dead_lettered += 1
        return True

    def resends(self, streams: Iterable[PartitionStream], now: float) -> list[bytes]:
        """Dead letters unconfirmed for DEAD_LETTER_RESEND seconds: to send again."""
        out = []
        for st in streams:
            if st.dead_letter is not None and now - st.dead_letter[1] > DEAD_LETTER_RESEND:
                st.dead_letter = (st.dead_letter[0], now)
                out.append(st.dead_letter[0])
        return out

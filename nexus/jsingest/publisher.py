"""Pipelined JetStream publishes that are retried until the cluster stores them.

Every message is its own task: published with `js.publish_async` (many in flight on
one connection), then its PubAck awaited with a deadline, because nats-py's future
has none (a PubAck lost with a stream leader never arrives). A failure or a timeout
(leader election, node down, no quorum, reconnecting) publishes again with the same
headers: events carry `Nats-Msg-Id`, so a first attempt that was stored after all
comes back as a duplicate PubAck, which is a success too. Nothing is given up while
the process runs; `drain` bounds the wait at exit and counts what it dropped.

While the cluster fails (a leader election answers "no responders" at once), thousands
of messages in flight retrying each on its own would flood it, and would also store
them out of order: a message sent to a leader that died waits for its PubAck deadline
while a later one of the same key, failed fast and retried, is stored by the new leader
first. So the first failure closes a gate. Every message that fails, and every new one,
queues at the gate in submission order. Recovery waits until nothing sent before is still
waiting for its PubAck (each one is stored or queued by then). It then sends the oldest
queued message alone as the probe, with backoff between attempts. Once the probe is
stored, it lets the rest through in submission order, each onto the connection before
the next. Per-key order is kept across a leader's loss; only a second failure while
the queue drains can still reorder (docs/nats.md).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Any

from nats.js import JetStreamContext, api

PUBACK_TIMEOUT = 2.0  # seconds for a PubAck before the message is published again
BACKOFF = (0.02, 0.05, 0.1, 0.2, 0.25)  # between the probe's attempts
LOG_EVERY = 5.0  # seconds between two "publish failing" lines


class Publisher:
    def __init__(self, js: JetStreamContext, max_pending: int, log: Any, timeout: float = PUBACK_TIMEOUT):
        self.js, self.max_pending, self.log, self.timeout = js, max_pending, log, timeout
        self.tasks: set[asyncio.Task] = set()
        self.retries = 0
        self.stored = 0  # PubAcks received, duplicates included
        self.duplicates = 0  # PubAcks with duplicate=True: a resend the stream dropped
        self.dropped = 0  # given up at exit
        self.peak = 0  # most in flight at once
        self._room = asyncio.Event()
        self._room.set()
        self._logged = 0.0
        self._failing = 0  # failed attempts since the last line
        self._ordinal = 0  # submission order
        self._awaiting = 0  # attempts published whose PubAck is not settled yet
        self._idle = asyncio.Event()  # set when _awaiting drops to 0
        self._closed = False  # the gate: a failure seen, recovery not finished
        self._failures = 0  # failed attempts, ever (recovery notices a new one)
        self._queue: list[tuple[int, asyncio.Future]] = []  # heap at the gate: (ordinal, turn)
        self._recovery: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return len(self.tasks)

    def submit(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Task[api.PubAck]:
        """Start storing one message; the task ends with its PubAck."""
        self._ordinal += 1
        task = asyncio.ensure_future(self._store(self._ordinal, subject, payload, headers))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        self.peak = max(self.peak, len(self.tasks))
        if len(self.tasks) >= self.max_pending:
            self._room.clear()
        return task

    async def room(self) -> None:
        """Wait until fewer than max_pending are in flight: readers call it before taking
        the next message, so a slow cluster stops intake instead of growing memory."""
        await self._room.wait()

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if len(self.tasks) < self.max_pending:
            self._room.set()

    async def _store(self, ordinal: int, subject: str, payload: bytes, headers: dict[str, str]) -> api.PubAck:
        while True:
            report = await self._turn(ordinal) if self._closed else None
            ok = False
            self._awaiting += 1
            try:
                future = await self.js.publish_async(subject, payload, headers=dict(headers))
                ack = await asyncio.wait_for(future, self.timeout)
                ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # timeout, no responders, API error, connection: again
                self.retries += 1
                self._failed(subject, exc)
                self._close()
            finally:
                self._awaiting -= 1
                if not self._awaiting:
                    self._idle.set()
                if report is not None and not report.done():
                    report.set_result(ok)  # (this attempt was the probe)
            if ok:
                self.stored += 1
                if ack.duplicate:
                    self.duplicates += 1
                return ack

    async def _turn(self, ordinal: int) -> asyncio.Future | None:
        """Wait at the closed gate for this message's turn; the probe gets a future to
        report its attempt's outcome to."""
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (ordinal, turn))
        return await turn

    def _close(self) -> None:
        self._failures += 1
        if not self._closed:
            self._closed = True
            self._recovery = asyncio.ensure_future(self._recover())

    def _next(self) -> asyncio.Future | None:
        """The oldest message still waiting at the gate (cancelled ones are left out)."""
        while self._queue:
            _, turn = heapq.heappop(self._queue)
            if not turn.done():
                return turn
        return None

    async def _recover(self) -> None:
        attempt = 0
        try:
            while True:
                # what was sent before settles first: stored, or failed and queued here
                while self._awaiting:
                    self._idle.clear()
                    await self._idle.wait()
                probe = self._next()
                if probe is None:
                    return
                outcome = asyncio.get_running_loop().create_future()
                probe.set_result(outcome)
                if not await outcome:
                    await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                    attempt += 1
                    continue
                attempt, failures = 0, self._failures
                while self._failures == failures and (turn := self._next()) is not None:
                    turn.set_result(None)
                    await asyncio.sleep(0)  # (it runs up to its publish before the next wakes)
                if self._failures == failures:
                    return
        finally:
            self._closed = False
            self._recovery = None
            for _, turn in self._queue:  # (cancelled: the waiting go on, the gate is open)
                if not turn.done():
                    turn.set_result(None)
            self._queue.clear()

    def _failed(self, subject: str, exc: BaseException) -> None:
        self._failing += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self.log.warning("publish_retrying", subject=subject, error=repr(exc), failed=self._failing)
            self._logged, self._failing = now, 0

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for every message in flight; cancel the rest (counted as
        dropped, returned)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        if self._recovery is not None:
            self._recovery.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        self.dropped += len(left)
        return len(left)

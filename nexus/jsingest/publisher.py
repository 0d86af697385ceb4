"""Pipelined JetStream publishes that are retried until the cluster stores them.

Every message is its own task: published with `js.publish_async` (many in flight on
one connection), then its PubAck awaited with a deadline, because nats-py's future
has none (a PubAck lost with a stream leader never arrives). A failure or a timeout
(leader election, node down, no quorum, reconnecting) publishes again with the same
headers: events carry `Nats-Msg-Id`, so a first attempt that was stored after all
comes back as a duplicate PubAck, which is a success too. Nothing is given up while
the process runs; `drain` bounds the wait at exit and counts what it dropped.

While the cluster fails (a leader election answers "no responders" at once), thousands
of messages in flight retrying each on its own would flood it: the first message that
fails becomes the probe and retries alone, with backoff; the others wait for its
success, then go again together.
"""

from __future__ import annotations

import asyncio
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
        self._healthy = asyncio.Event()  # clear while a probe retries: the others wait
        self._healthy.set()
        self._probe: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return len(self.tasks)

    def submit(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Task[api.PubAck]:
        """Start storing one message; the task ends with its PubAck."""
        task = asyncio.ensure_future(self._store(subject, payload, headers))
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

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> api.PubAck:
        me = asyncio.current_task()
        attempt = 0
        try:
            while True:
                if self._probe is not me:
                    await self._healthy.wait()
                try:
                    future = await self.js.publish_async(subject, payload, headers=dict(headers))
                    ack = await asyncio.wait_for(future, self.timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # timeout, no responders, API error, connection: again
                    self.retries += 1
                    self._failed(subject, exc)
                    if self._probe is None:
                        self._probe = me
                        self._healthy.clear()
                    if self._probe is me:
                        await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                        attempt += 1
                    continue
                self.stored += 1
                if ack.duplicate:
                    self.duplicates += 1
                return ack
        finally:
            if self._probe is me:  # stored (or cancelled): the others go on
                self._probe = None
                self._healthy.set()

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
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        self.dropped += len(left)
        return len(left)

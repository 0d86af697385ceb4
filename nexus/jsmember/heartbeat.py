"""A member's heartbeat: its MemberRecord written every interval from a thread with its own
loop and NATS connection, so a long synchronous handler call does not make the group
think the member died (the watchdog bounds that call instead), while a stopped or frozen
process stops beating and its lease runs out.

What the runtime fences on: `ok_at` (monotonic, when the last successful write began), and
`lapses`, counting the writes that came more than `lapse_after` after the one before: the
group may have called us dead in between (a SIGSTOP, a frozen VM, a partition from the
cluster) and taken our partitions, whatever the next beat says. A lapse is counted before
`ok_at` moves, so a reader that sees a fresh `ok_at` sees the lapse too."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from nats.errors import Error as NatsError

from nexus.config import Config
from nexus.jetstream import records
from nexus.jetstream.connect import connect
from nexus.jetstream.names import Names
from nexus.jetstream.records import MemberRecord

LEAVE_TIMEOUT = 2.0  # seconds the final delete of our record may take


class HeartbeatThread:
    def __init__(
        self,
        config: Config,
        group: str,
        member: str,
        record: Callable[[int], MemberRecord],
        interval: float,
        lapse_after: float,
        log: Any,
    ):
        self.config, self.key = config, Names.member_key(group, member)
        self.bucket = Names.of(config).bucket
        self.member = member
        self.record = record  # beat number -> the record to write (called on this thread)
        self.interval = interval
        self.log = log
        self.lapse_after = lapse_after
        self.ok_at = 0.0
        self.lapses = 0
        self.first = threading.Event()  # the first beat was written
        self.beats = 0
        self._leave = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-js-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, leave: bool) -> None:
        """Stop beating; with `leave`, delete our record (a clean exit: no wait for the timeout)."""
        self._leave = leave
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # (its loop ended already)
                pass
        if self._thread.ident is not None:
            self._thread.join(timeout=LEAVE_TIMEOUT + self.interval * 2 + 5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        nc = await connect(self.config, f"nexus-heartbeat-{self.member}")
        try:
            kv = None
            while kv is None and not self._stop.is_set():
                try:
                    kv = await nc.jetstream().key_value(self.bucket)
                except (NatsError, TimeoutError) as exc:  # (a forming cluster)
                    self.log.info("jetstream_not_ready", step="heartbeat", error=repr(exc))
                    await asyncio.sleep(0.5)
            while kv is not None and not self._stop.is_set():
                started = time.monotonic()
                self.beats += 1
                try:
                    async with asyncio.timeout(self.interval * 2):
                        await kv.put(self.key, records.encoder.encode(self.record(self.beats)))
                    if self.ok_at and started - self.ok_at > self.lapse_after:
                        self.lapses += 1
                        self.log.warning("heartbeat_lapsed", gap_s=round(started - self.ok_at, 2))
                    self.ok_at = started
                    self.first.set()
                except (NatsError, TimeoutError) as exc:
                    self.log.warning("heartbeat_failed", error=repr(exc))
                try:
                    async with asyncio.timeout(max(self.interval - (time.monotonic() - started), 0.0)):
                        await self._stop.wait()
                except TimeoutError:
                    pass
            if self._leave and kv is not None:
                try:
                    async with asyncio.timeout(LEAVE_TIMEOUT):
                        await kv.delete(self.key)
                except (NatsError, TimeoutError) as exc:
                    self.log.warning("leave_not_written", error=repr(exc))
        finally:
            await nc.close()

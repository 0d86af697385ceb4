"""A member's watchdog thread: bounds synchronous handler calls and beats the black box.

A sync handler runs on the member's event loop, so nothing on the loop can stop one
that never returns. This thread can: it notices a call that has run past the group's
`handler_timeout` (or, once a stop was requested, past the member's stop grace), logs
`handler_timed_out`, acks what the member handled before it, and ends the process
with ExitCode.HANDLER_TIMEOUT. The event stays marked in the black box, so the
launcher knows which event it was and counts the timeout against it.

It also beats the box (the launcher's hang detection reads it): while the loop turns
(the loop stamps `Liveness.loop_stamp` every tick) or while a handler call is within its
timeout. A member that stops beating is truly hung, and the launcher may kill it.

Cost on the hot path: the dispatcher bumps a counter and sets one attribute per call;
the thread reads them a few times a second. No clock call per event.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import zmq

from nexus.common.blackbox import BlackBox
from nexus.errors import ExitCode
from nexus.member.group import GroupClient
from nexus.member.partitions import Partitions
from nexus.member.scheduler import Scheduler
from nexus.member.stream import PartitionStream
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys

INTERVAL = 0.2  # seconds between looks
LOOP_STALE = 1.0  # a loop stamp older than this: the loop is not turning


@dataclass
class Liveness:
    """What the loop and the signal handler tell the watchdog thread."""

    stop_grace: float  # seconds from a stop request to leaving, whatever still runs
    loop_stamp: float = field(default_factory=time.monotonic)  # stamped by the loop's tick
    stop_requested_at: float = 0.0  # monotonic, set from the signal handler


class Watchdog:
    def __init__(
        self,
        scheduler: Scheduler,
        partitions: Partitions,
        client: GroupClient,
        live: Liveness,
        *,
        endpoint: str,
        handler_timeout: float,
        sync: bool,
        box: BlackBox | None,
        log: Any,
        interval: float = INTERVAL,
        curve: ClientKeys | None = None,
    ):
        self.scheduler = scheduler  # its call_stream and calls: the sync call running now
        self.partitions = partitions  # the final acks
        self.client = client
        self.live = live
        self.endpoint = endpoint
        self.curve = curve
        self.timeout, self.sync = handler_timeout, sync
        self.box = box
        self.log = log
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nexus-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        sched, live, box, timeout = self.scheduler, self.live, self.box, self.timeout
        seen_calls, since = -1, 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            st, calls = sched.call_stream, sched.calls
            running = 0.0
            if st is not None and self.sync:
                if calls != seen_calls:
                    seen_calls, since = calls, now  # a new call: time it from here
                running = now - since
                limit = timeout
                if live.stop_requested_at:
                    # stopping: the call gets what is left of the stop grace, no more
                    limit = min(limit, live.stop_requested_at + live.stop_grace - since)
                if running > limit and sched.calls == calls and sched.call_stream is st:
                    self.timed_out(st, running, stopping=bool(live.stop_requested_at))
            if box is not None and (now - live.loop_stamp < LOOP_STALE or (st is not None and running <= timeout)):
                box.beat(now)

    def timed_out(self, st: PartitionStream, running: float, stopping: bool) -> NoReturn:
        """A call on `st`'s head has run `running` seconds, past its limit: end the member."""
        try:
            seq, w = st.queue[0]
            event_id = w.id
        except (IndexError, AttributeError):
            seq, event_id = 0, ""
        self.log.error(
            "handler_timed_out",
            event_id=event_id,
            seq=seq,
            partition=st.partition,
            ran_s=round(running, 1),
            handler_timeout=self.timeout,
            stopping=stopping,
            action="ending the member (exit 7); its partitions move on",
        )
        try:
            self._final_acks()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(ExitCode.HANDLER_TIMEOUT))

    def _final_acks(self) -> None:
        """Ack what was handled before the stuck call (the loop is blocked in it, so the
        streams hold still), so the next owners do not handle those events again; then
        say we are gone when the launcher will not (it is stopping, or there is none),
        so the router frees our partitions at once, flagged as redelivered."""
        acks = self.partitions.final_acks()
        ctx = zmq.Context()
        try:
            sock = transport.connect(ctx, zmq.DEALER, self.endpoint, linger_ms=1000, curve=self.curve)
            if acks:
                sock.send(self.client.ack(acks))
            if self.box is None or self.live.stop_requested_at:
                # (with a launcher that is not stopping, the launcher says it, with the
                # poison count: a report from us first would let the event reach its next
                # owner before it is known as poison)
                sock.send(self.client.exited(int(ExitCode.HANDLER_TIMEOUT), "handler_timeout"))
            sock.close()
        finally:
            ctx.term()  # returns once both are sent, or after the 1 s linger

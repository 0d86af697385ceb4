"""A member's watchdog thread: bounds synchronous handler calls and beats the black box.

A sync handler runs on the member's event loop, so nothing on the loop can stop one
that never returns. This thread can: it notices a call that has run past the group's
`handler_timeout` (or, once a stop was requested, past the member's stop grace), logs
`handler_timed_out`, acks what the member handled before it, and ends the process
with ExitCode.HANDLER_TIMEOUT. The event stays marked in the black box, so the
launcher knows which event it was and counts the timeout against it.

It also beats the box (the launcher's hang detection reads it): while the loop turns
(the loop stamps `member.loop_stamp` every tick) or while a handler call is within its
timeout. A member that stops beating is truly hung, and the launcher may kill it.

Cost on the hot path: the dispatcher bumps a counter and sets one attribute per call;
the thread reads them a few times a second. No clock call per event.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import TYPE_CHECKING

import zmq

from nexus.errors import ExitCode
from nexus.protocol import transport
from nexus.protocol.wire import Ack, MemberExited, encoder

if TYPE_CHECKING:
    from nexus.member.runtime import Member

INTERVAL = 0.2  # seconds between looks
LOOP_STALE = 1.0  # a loop stamp older than this: the loop is not turning
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size (Linux: /proc/self/statm; else the peak)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The highest RSS this process had (one getrusage call, cheaper than reading /proc;
    a leak only grows, so the peak is what max_rss is checked against)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Watchdog:
    def __init__(self, member: Member, interval: float = INTERVAL):
        self.m = member
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
        m = self.m
        box, sync, timeout = m.box, not m.is_async, m.spec.handler_timeout
        seen_calls, since = -1, 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            st, calls = m.call_stream, m.calls
            running = 0.0
            if st is not None and sync:
                if calls != seen_calls:
                    seen_calls, since = calls, now  # a new call: time it from here
                running = now - since
                limit = timeout
                if m.stop_requested_at:
                    # stopping: the call gets what is left of the stop grace, no more
                    limit = min(limit, m.stop_requested_at + m.stop_grace - since)
                if running > limit and m.calls == calls and m.call_stream is st:
                    self._timed_out(st, running, stopping=bool(m.stop_requested_at))
                    return
            if box is not None and (now - m.loop_stamp < LOOP_STALE or (st is not None and running <= timeout)):
                box.beat(now)

    def _timed_out(self, st, running: float, stopping: bool) -> None:
        m = self.m
        try:
            seq, w = st.queue[0]
            event_id = w.id
        except (IndexError, AttributeError):
            seq, event_id = 0, ""
        m.log.error(
            "handler_timed_out",
            event_id=event_id,
            seq=seq,
            partition=st.partition,
            ran_s=round(running, 1),
            handler_timeout=m.spec.handler_timeout,
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
        m = self.m
        acks = {p: s.handled_upto() for p, s in list(m.streams.items())}
        ctx = zmq.Context()
        try:
            sock = transport.connect(ctx, zmq.DEALER, m.config.coord, linger_ms=1000)
            if acks:
                sock.send(encoder.encode(Ack(group=m.group, member=m.name, acks=acks)))
            if m.box is None or m.stop_requested_at:
                # (with a launcher that is not stopping, the launcher says it, with the
                # poison count: a report from us first would let the event reach its next
                # owner before it is known as poison)
                sock.send(
                    encoder.encode(
                        MemberExited(
                            group=m.group,
                            member=m.name,
                            exit_code=int(ExitCode.HANDLER_TIMEOUT),
                            reason="handler_timeout",
                            pid=os.getpid(),
                        )
                    )
                )
            sock.close()
        finally:
            ctx.term()  # returns once both are sent, or after the 1 s linger

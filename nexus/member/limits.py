"""A member's recycle limits (no sockets): after `max_events` handled events, or above
`max_rss` of memory, it drains gracefully and ends with ExitCode.RECYCLE, and the launcher
starts a fresh one (a slow leak in a handler costs a restart, not the host)."""

from __future__ import annotations

import os
import resource
from typing import Any

from nexus.errors import ExitCode

RSS_CHECK_EVENTS = 64  # with max_rss, also look at the peak RSS every this many handled events
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


class RecycleLimits:
    def __init__(self, max_events: int | None, max_rss: int | None, log: Any):
        self.max_events, self.max_rss = max_events, max_rss
        self.log = log
        self.recycling = ""  # why this member drains and ends with `exit_code`
        self.exit_code = ExitCode.RECYCLE  # FAILURE when max_rss is below our size at start
        self.rss_at_start = peak_rss_bytes()  # imports and handler loaded
        self.check_at = self._next_check(0)  # the handled count of the next check

    def _next_check(self, handled: int) -> float:
        """The handled count at which the dispatcher checks the limits between the loop's
        ticks (a fast leak grows a lot in a tick): every RSS_CHECK_EVENTS with max_rss (a
        getrusage call, ~1 us), at max_events; never without limits."""
        at = float("inf")
        if self.max_rss is not None:
            at = handled + RSS_CHECK_EVENTS
        if self.max_events is not None:
            at = min(at, self.max_events)
        return at

    def check(self, handled: int, stopping: bool = False) -> bool:
        """True when the member must recycle now (`recycling` says why; once only)."""
        self.check_at = self._next_check(handled)
        if self.recycling or stopping or not handled:
            return False  # nothing handled since start: a restart would not make us smaller
        if self.max_events is not None and handled >= self.max_events:
            self.recycling = f"handled {handled} events (max_events {self.max_events})"
        elif self.max_rss is not None and (rss := peak_rss_bytes()) > self.max_rss:
            self.recycling = f"rss {rss >> 20} MiB over max_rss {self.max_rss >> 20} MiB"
            if self.rss_at_start > self.max_rss:
                # a restart starts over the limit again: end as a failure, so the launcher
                # backs off and gives up after crash_loop instead of recycling per event
                self.exit_code = ExitCode.FAILURE
                self.log.error(
                    "max_rss_below_start_size",
                    rss_at_start_mib=self.rss_at_start >> 20,
                    max_rss_mib=self.max_rss >> 20,
                )
        if not self.recycling:
            return False
        self.check_at = float("inf")
        return True

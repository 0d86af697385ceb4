"""Circuit breaker for a member's integration (no I/O, the clock is passed in).

CLOSED -> OPEN after `failures` dependency errors within `window` seconds;
OPEN -> HALF_OPEN after `reset` seconds, letting one probe event through;
the probe's success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import collections

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failures: int = 5, window: float = 60.0, reset: float = 30.0):
        self.failures, self.window, self.reset = failures, window, reset
        self.state = CLOSED
        self.opened_at = 0.0
        self.probing = False
        self.recent: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """May an event be taken now? In HALF_OPEN only one probe at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.reset:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> str | None:
        """Returns the new state when it changed."""
        self.probing = False
        if self.state != CLOSED:
            self.recent.clear()
            self.state = CLOSED
            return CLOSED
        return None

    def failure(self, now: float) -> str | None:
        """Returns the new state when it changed."""
        self.probing = False
        if self.state == HALF_OPEN:
            self.opened_at = now
            self.state = OPEN
            return OPEN
        self.recent.append(now)
        while self.recent and now - self.recent[0] > self.window:
            self.recent.popleft()
        if self.state == CLOSED and len(self.recent) >= self.failures:
            self.opened_at = now
            self.state = OPEN
            return OPEN
        return None

    def retry_in(self, now: float) -> float:
        """Seconds until the breaker will let a probe through (0 if it would now)."""
        if self.state == OPEN:
            return max(0.0, self.reset - (now - self.opened_at))
        return 0.0

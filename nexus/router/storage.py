"""Is the data dir writable? The router's storage state, shared with the flusher thread.

A storage error (ENOSPC, EIO) in one part (journal write, fsync, cursor save) puts
the router in the `error` state: confirmed events are NACKed with the retryable
reason `storage_unavailable`, fire-mode events are counted as refused, and
`nexus status` shows it. The state is logged once when it starts and once when it
ends; it ends when every failed part has succeeded again.
"""

from __future__ import annotations

import threading
import time

import structlog

log = structlog.get_logger("nexus.storage")

REASON = "storage_unavailable"
RETRY_AFTER = 1.0  # seconds a producer waits before resending


class StorageState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failing: dict[str, str] = {}  # part -> last error
        self.since = 0.0  # unix time the error state began
        self.errors = 0  # storage errors seen, ever

    @property
    def ok(self) -> bool:
        return not self.failing

    def failed(self, part: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.errors += 1
            first = not self.failing
            self.failing[part] = text
            if first:
                self.since = time.time()
        if first:
            log.error(REASON, part=part, error=text)

    def succeeded(self, part: str) -> None:
        if part not in self.failing:  # the common case: no lock, no work
            return
        with self._lock:
            if self.failing.pop(part, None) is None or self.failing:
                return
            down = time.time() - self.since
        log.warning("storage_recovered", part=part, down_s=round(down, 1))

    def describe(self) -> dict:
        with self._lock:
            if not self.failing:
                return {"state": "ok", "errors": self.errors}
            return {
                "state": "error",
                "since": round(self.since, 3),
                "failing": dict(self.failing),
                "errors": self.errors,
            }

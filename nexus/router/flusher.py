"""Disk waits off the router thread: journal fsync on the `interval` policy, and
cursor saves.

An fsync blocks for as long as the disk takes (milliseconds, more on a busy
disk); in the router loop that stall lands on every event in flight. Here the
waits happen in a thread (os.fsync releases the GIL) while the loop goes on. The
`always` policy still syncs in the loop: its replies wait for the fsync anyway.
"""

from __future__ import annotations

import threading

import structlog

from nexus.router.cursors import CursorStore
from nexus.router.journal import Journal
from nexus.router.storage import StorageState

log = structlog.get_logger("nexus.flusher")


class Flusher:
    def __init__(self, journal: Journal, cursors: CursorStore, interval: float, storage: StorageState | None = None):
        self.journal = journal
        self.storage = storage if storage is not None else StorageState()
        self.cursors = cursors
        self.interval = interval
        self.saved: dict[str, list[int]] | None = None  # the cursors last made durable
        self.error: BaseException | None = None  # re-raised in the router loop
        self._cond = threading.Condition()
        self._pending: tuple[int, dict[str, list[int]]] | None = None
        self._version = 0
        self._save_lock = threading.Lock()
        self._saved_version = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nexus-flusher", daemon=True)

    def start(self) -> Flusher:
        self._thread.start()
        return self

    def post(self, snapshot: dict[str, list[int]]) -> None:
        """Save these cursors soon (a newer snapshot replaces one not yet saved)."""
        with self._cond:
            self._version += 1
            self._pending = (self._version, snapshot)
            self._cond.notify()

    def save_now(self, snapshot: dict[str, list[int]]) -> None:
        """Save synchronously (a journal replay rewinds cursors: it must not wait)."""
        with self._cond:
            self._version += 1
            version = self._version
            self._pending = None
        self._save(version, snapshot)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(10)

    def _save(self, version: int, snapshot: dict[str, list[int]]) -> None:
        with self._save_lock:
            if version <= self._saved_version:
                return  # an older snapshot lost the race to a newer one
            self.cursors.save(snapshot)
            self._saved_version = version
            self.saved = snapshot

    def _run(self) -> None:
        sync = self.journal.fsync_policy == "interval"
        retry = False
        try:
            while True:
                with self._cond:
                    if not self._stopping and (self._pending is None or retry):
                        self._cond.wait(max(self.interval, 0.5) if retry else self.interval)
                    pending, self._pending = self._pending, None
                    stopping = self._stopping
                retry = False
                if sync:
                    try:
                        self.journal.sync()
                        self.storage.succeeded("fsync")
                    except OSError as exc:  # ENOSPC, EIO: back-pressure, tried again
                        self.storage.failed("fsync", exc)
                        retry = True
                if pending is not None:
                    try:
                        self._save(*pending)
                        self.storage.succeeded("cursors")
                    except OSError as exc:
                        self.storage.failed("cursors", exc)
                        retry = True
                        with self._cond:
                            if self._pending is None:
                                self._pending = pending  # unless a newer one came meanwhile
                if stopping:
                    return
        except BaseException as exc:  # a bug, not a disk error: the router stops on it
            log.error("flush_failed", error=f"{type(exc).__name__}: {exc}")
            self.error = exc

"""Helpers for tests of Nexus and of code built on it (shipped in the package)."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> Any:
    """Poll `condition` until it returns a truthy value; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CollectingSink:
    """A stand-in for the producer sink in unit tests of producer modules."""

    def __init__(self) -> None:
        import threading
        self.events: list[tuple[str, Any, str | None]] = []
        self.flushes = 0
        self._lock = threading.Lock()

    def emit(self, type: str, payload: Any, key: str | None = None, priority: int = 5) -> str:
        with self._lock:
            self.events.append((type, payload, key))
            return f"id-{len(self.events)}"

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1

    def of_type(self, type_: str) -> list[Any]:
        with self._lock:
            return [p for t, p, _ in self.events if t == type_]

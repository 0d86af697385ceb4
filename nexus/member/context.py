"""What a handler gets besides the event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Context:
    __slots__ = (
        "group",
        "member",
        "attempt",
        "redelivered",
        "seq",
        "partition",
        "options",
        "_base_log",
        "_log",
        "_emit",
        "_event_id",
        "_correlation_id",
        "emitted",
    )

    def __init__(
        self,
        group: str,
        member: str,
        attempt: int,
        redelivered: bool,
        seq: int,
        partition: int,
        options: dict,
        base_log: Any,
        emit: Callable[..., str] | None,
        event_id: str,
        correlation_id: str | None,
    ):
        self.group = group
        self.member = member
        self.attempt = attempt  # 1 on the first try
        self.redelivered = redelivered  # this event may have been handled before
        self.seq = seq  # journal sequence number
        self.partition = partition
        self.options = options  # the group's `options` from config
        self._base_log = base_log
        self._log = None
        self._emit = emit
        self._event_id = event_id
        self._correlation_id = correlation_id
        self.emitted: list[str] | None = None  # ids of follow-ups: settled before this call counts as done

    @property
    def log(self) -> Any:
        """structlog logger bound with group, member and event id (bound on first use)."""
        if self._log is None:
            self._log = self._base_log.bind(event_id=self._event_id, seq=self.seq, attempt=self.attempt)
        return self._log

    def emit(self, type: str, payload: Any, key: str | None = None, *, priority: int = 5) -> str:
        """Send a follow-up event; it carries this event's correlation id (or its id)."""
        if self._emit is None:
            raise RuntimeError("emit is not available in this context")
        event_id = self._emit(
            type, payload, key=key, priority=priority, correlation_id=self._correlation_id or self._event_id
        )
        if self.emitted is None:
            self.emitted = []
        self.emitted.append(event_id)
        return event_id

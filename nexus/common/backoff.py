"""Backoff lists: the delay before a retry (a member's handler call, a launcher's restart)."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT = 1.0  # seconds, when no backoff is configured


def backoff_delay(backoffs: Sequence[float], attempt: int) -> float:
    """The delay after failed attempt `attempt` (1 = the first): the attempt-th backoff,
    the last one for every attempt past the list, DEFAULT without a list."""
    if not backoffs:
        return DEFAULT
    return backoffs[min(max(attempt, 1), len(backoffs)) - 1]

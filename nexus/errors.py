"""One error root with a few precise subclasses, and the named exit codes."""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # unexpected internal error
    USAGE = 2  # bad command line
    CONFIG = 3  # config file missing or invalid
    INVALID_EVENT = 4  # event rejected locally or NACKed by the router
    UNREACHABLE = 5  # router or launcher did not answer in time
    CRASH_LOOP = 6  # launcher gave up on a child that kept crashing
    HANDLER_TIMEOUT = 7  # a member ended itself: a sync handler ran past handler_timeout
    RECYCLE = 8  # a member drained and ended itself (max_rss / max_events): restart, not a crash
    JOURNAL_DAMAGED = 9  # `nexus journal verify` found damaged ranges (or a cursor past the journal's end)
    INTERRUPTED = 130


def describe_exit(code: int | None) -> str:
    """How a process ended, for logs and status: 'signal SIGSEGV' (a negative exit code
    is the killing signal), 'exit code 7 (handler_timeout)', 'exit code 13'."""
    if code is None:
        return ""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    try:
        return f"exit code {code} ({ExitCode(code).name.lower()})"
    except ValueError:
        return f"exit code {code}"


class NexusError(Exception):
    """Root of every error Nexus raises on purpose."""

    exit_code = ExitCode.FAILURE


class ConfigError(NexusError):
    exit_code = ExitCode.CONFIG


class EventError(NexusError):
    """An event is invalid: unknown type, payload violates its contract, too big."""

    exit_code = ExitCode.INVALID_EVENT


class RejectedError(EventError):
    """The router NACKed an event; `reason` is the router's reason."""

    def __init__(self, event_id: str, reason: str, retry_after: float | None = None):
        super().__init__(f"event {event_id} rejected by router: {reason}")
        self.event_id = event_id
        self.reason = reason
        self.retry_after = retry_after


class PeerError(NexusError):
    """A peer process (router, launcher) did not answer in time."""

    exit_code = ExitCode.UNREACHABLE
    reason = ""  # the peer's last refusal when one explains it (a producer's flush gave up)


class DependencyError(NexusError):
    """Raised by a handler when a dependency (gRPC service, HTTP endpoint) is down.

    It feeds the group's circuit breaker and never dead-letters the event: the
    event is retried until the dependency is back.
    """


class PermanentError(NexusError):
    """Raised by a handler for an event that can never succeed (a 4xx, a bad
    template): no retries, straight to the dead-letter store."""

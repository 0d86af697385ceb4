"""structlog setup shared by every Nexus process."""

from __future__ import annotations

import logging
import sys

import structlog

from nexus.common import redact
from nexus.common.text import CONTROL_RE, printable

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "console", process: str | None = None) -> None:
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # a traceback as plain text, so the redaction below sees it (and never the
        # console renderer's rich traceback, which prints every frame's locals)
        structlog.processors.format_exc_info,
        redact.processor,  # no secret in any line: nexus/common/redact.py
    ]
    if fmt == "json":
        processors += [structlog.processors.JSONRenderer()]
    else:
        processors += [_escape_controls, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # what libraries log through the standard library (aioimaplib, grpc) goes the same way
    last = logging.lastResort
    if last is not None and not any(isinstance(f, _ScrubFilter) for f in last.filters):
        last.addFilter(_ScrubFilter())
    structlog.contextvars.clear_contextvars()
    if process:
        structlog.contextvars.bind_contextvars(process=process)


def _escape_controls(logger, method: str, event_dict: dict) -> dict:
    """The console renderer prints the event name and plain string values raw (other
    values with repr): escape control characters in them, so no value (an event's
    source, an error text) can forge a log line or send a terminal escape sequence."""
    for key, value in event_dict.items():
        if key == "exception":
            continue  # a formatted traceback: its lines stay lines
        if type(value) is str and CONTROL_RE.search(value) is not None:
            event_dict[key] = printable(value)
    return event_dict


class _ScrubFilter(logging.Filter):
    """Known secrets out of a standard-library log record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = redact.scrub(record.getMessage())
        record.msg, record.args = text, None
        return True

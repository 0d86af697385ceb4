"""structlog setup shared by every Nexus process, and its live log level.

The level is checked at each call against one module-wide threshold (`set_level`), not
baked into the logger class: loggers bound before a reload (a member's, a handler's
`ctx.log`) follow a new level too. A launched child learns a new level from the level
file the launcher writes under the data dir's run/ folder (`follow_level_file`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import structlog

from nexus.common import redact
from nexus.common.text import CONTROL_RE, printable

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_threshold = logging.INFO  # calls below it return at once (set_level changes it live)
LEVEL_FILE = os.path.join("run", "log-level")  # under the data dir: "RUN-TOKEN LEVEL"
# The signal that tells a launched child to read the level file again. SIGURG, not
# SIGUSR1: its default action is to do nothing, so a child signalled while it still
# starts (before its handler is installed) is not killed; it reads the file right after
# installing the handler, so it misses no change either. (A coord message would reach
# the router and members only; producers and the http child have no coord socket.)
LEVEL_SIGNAL = signal.SIGURG


def _gated(name: str, level: int):
    inner = getattr(_Base, name)

    def method(self, *args, **kw):
        if level < _threshold:
            return None
        return inner(self, *args, **kw)

    method.__name__ = name
    return method


def _gated_log(name: str):
    inner = getattr(_Base, name)

    def method(self, level, *args, **kw):
        if level < _threshold:
            return None
        return inner(self, level, *args, **kw)

    method.__name__ = name
    return method


_Base = structlog.make_filtering_bound_logger(logging.DEBUG)
_gates = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO, "warning": logging.WARNING}
_gates["warn"] = logging.WARNING
LevelledLogger = type(
    "LevelledLogger",
    (_Base,),
    {
        **{name: _gated(name, lvl) for name, lvl in _gates.items()},
        **{f"a{name}": _gated(f"a{name}", lvl) for name, lvl in _gates.items()},
        "log": _gated_log("log"),
        "alog": _gated_log("alog"),
        "is_enabled_for": lambda self, level: level >= _threshold,
        "get_effective_level": lambda self: _threshold,
    },
)


def set_level(level: str) -> None:
    """From now on, in this process, calls below `level` are dropped (every logger)."""
    global _threshold
    _threshold = _LEVELS[level]


def current_level() -> str:
    return next((name for name, n in _LEVELS.items() if n == _threshold), "info")


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
    set_level(level)
    structlog.configure(
        processors=processors,
        wrapper_class=LevelledLogger,
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


# -- the live level of launched children --------------------------------------------------
def write_level_file(data_dir: str, level: str, token: str) -> None:
    """The launcher's side: the level every child of run `token` should log at now
    (atomic: a child never reads half a file)."""
    from nexus.common import private

    path = os.path.join(data_dir, LEVEL_FILE)
    tmp = f"{path}.tmp"
    fd = private.create(tmp)
    try:
        os.write(fd, f"{token} {level}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_level_file(data_dir: str, token: str) -> str | None:
    """The level the launcher of run `token` last wrote; None without one (a file left
    by an earlier run names another token and is ignored)."""
    try:
        with open(os.path.join(data_dir, LEVEL_FILE)) as f:
            found = f.read(200).split()
    except OSError:
        return None
    if len(found) == 2 and found[0] == token and found[1] in _LEVELS:
        return found[1]
    return None


def follow_level_file(data_dir: str, token: str) -> None:
    """A launched child: apply the level file now and whenever LEVEL_SIGNAL comes (the
    handler only swaps a number: safe at any point of the main thread)."""
    if not token:
        return

    def reread(signum=None, frame=None) -> None:  # noqa: ARG001
        level = read_level_file(data_dir, token)
        if level is not None and level != current_level():
            set_level(level)
            structlog.get_logger("nexus").info("log_level_changed", level=level)

    signal.signal(LEVEL_SIGNAL, reread)
    reread()

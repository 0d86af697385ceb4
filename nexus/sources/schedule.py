"""The schedule producer: `schedule.tick` events on an interval or a cron expression.

Due times are computed from the schedule, never from "now + interval", so ticks do
not drift however long an emit takes. `every` is aligned to the unix epoch (every
10s ticks at :00, :10, ...), so a restarted producer keeps the same grid; `cron` is
evaluated in the spec's timezone (croniter handles DST).
"""

from __future__ import annotations

import math
import threading
import time
from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import structlog
from croniter import CroniterError, croniter

from nexus.config import Config as PipelineConfig
from nexus.config import Duration, SourceConfig
from nexus.errors import ConfigError
from nexus.sources.base import Sink, Source

log = structlog.get_logger("nexus.producer.schedule")

# Longest single wait: the wall clock can jump (NTP, suspend) while stop.wait()
# measures monotonic time, so re-read the clock at least this often.
MAX_WAIT = 1.0
# Bound on the catch-up loop for a cron schedule after a long pause (a week of
# "* * * * * *" is 600k steps); past it we emit and catch up again next round.
MAX_CATCH_UP = 100_000


class ScheduleConfig(SourceConfig):
    every: Duration | None = None
    cron: str | None = None
    timezone: str = "UTC"
    key: str | None = None
    priority: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError("a schedule needs exactly one of `every` or `cron`")
        if self.every is not None and self.every <= 0:
            raise ValueError("`every` must be positive")


def timezone_of(name: str, spec: ScheduleConfig, where: str = "") -> ZoneInfo:
    try:
        return ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}producers.{name}.timezone: unknown timezone {spec.timezone!r} "
            "(use an IANA name such as 'UTC' or 'Europe/Paris')"
        ) from None


def validate(name: str, spec: ScheduleConfig, where: str = "") -> ZoneInfo:
    """Check timezone and cron expression up front; return the timezone."""
    tz = timezone_of(name, spec, where)
    if spec.cron is not None:
        if len(spec.cron) > 256:  # the ScheduleTick contract bounds `expression`
            raise ConfigError(f"{where}producers.{name}.cron: longer than 256 characters")
        try:
            # get_next() also catches expressions that never match ("0 0 31 2 *")
            croniter(spec.cron, datetime.now(tz)).get_next(float)
        except (CroniterError, ValueError, KeyError) as exc:
            raise ConfigError(f"{where}producers.{name}.cron: invalid cron expression {spec.cron!r}: {exc}") from None
    return tz


def expression(spec: ScheduleConfig) -> str:
    return f"every {spec.every:g}s" if spec.every is not None else str(spec.cron)


def next_due(spec: ScheduleConfig, after: float, tz: ZoneInfo | None = None) -> float:
    """The first due time strictly after `after` (unix seconds)."""
    if spec.every is not None:
        every = float(spec.every)
        due = (math.floor(after / every) + 1) * every
        while due <= after:  # float rounding on fractional intervals
            due += every
        return due
    start = datetime.fromtimestamp(after, tz or ZoneInfo(spec.timezone))
    return croniter(spec.cron, start).get_next(float)


def catch_up(spec: ScheduleConfig, due: float, now: float, tz: ZoneInfo | None = None) -> tuple[float, int]:
    """From an overdue `due` (<= now): the latest due time <= now and how many it skips."""
    if spec.every is not None:
        skipped = max(0, math.floor((now - due) / spec.every))
        return due + skipped * spec.every, skipped
    skipped = 0
    while skipped < MAX_CATCH_UP and (later := next_due(spec, due, tz)) <= now:
        due, skipped = later, skipped + 1
    return due, skipped


class ScheduleSource(Source[ScheduleConfig]):
    Config = ScheduleConfig

    @classmethod
    def check(cls, name: str, spec: ScheduleConfig, config: PipelineConfig) -> None:
        validate(name, spec)

    def run(self, sink: Sink, stop: threading.Event) -> None:
        name, spec = self.name, self.spec
        tz = validate(name, spec, f"{self.config.source}: " if self.config.source else "")
        expr = expression(spec)
        key = spec.key or name
        logger = log.bind(producer=name, expression=expr)
        due = next_due(spec, time.time(), tz)
        logger.info("schedule_started", timezone=spec.timezone, next_due=due)
        while not stop.is_set():
            now = time.time()
            if now < due:
                stop.wait(min(due - now, MAX_WAIT))
                continue
            # Missed ticks are not replayed: a tick says "it is time to do X", and a
            # burst of stale ticks after a pause (suspend, overload) would only make
            # handlers do X several times in a row. One tick for the latest due time,
            # plus a log line saying how many were skipped.
            due, skipped = catch_up(spec, due, now, tz)
            if skipped:
                logger.warning("schedule_ticks_skipped", count=skipped, scheduled=due)
            sink.emit(
                "schedule.tick",
                {"name": name, "scheduled": due, "fired": time.time(), "expression": expr},
                key=key,
                priority=spec.priority,
            )
            logger.debug("schedule_tick", scheduled=due)
            due = next_due(spec, due, tz)
        logger.info("schedule_stopped")

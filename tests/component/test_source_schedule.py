"""The schedule producer: pure due-time logic, and run() in a thread with a CollectingSink."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest

from nexus.config import Config, Duration
from nexus.contracts import ScheduleTick
from nexus.errors import ConfigError
from nexus.sources import schedule
from nexus.sources.schedule import ScheduleConfig, ScheduleSource
from nexus.testing import CollectingSink, wait_for

UTC = UTC


def ts(*args: int, tz=UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


class PrioritySink(CollectingSink):
    """Also records priorities, which CollectingSink drops."""

    def __init__(self) -> None:
        super().__init__()
        self.priorities: list[int] = []

    def emit(self, type, payload, key=None, priority=5):
        self.priorities.append(priority)
        return super().emit(type, payload, key=key, priority=priority)


@pytest.fixture
def config(tmp_path) -> Config:
    return msgspec.structs.replace(Config(), source=str(tmp_path / "nexus.yaml"))


@pytest.fixture
def start(config):
    """Run ScheduleSource.run() in a thread; teardown stops it and checks it ended cleanly."""
    running = []

    def _start(spec: ScheduleConfig, name: str = "tick"):
        sink, stop, errors = PrioritySink(), threading.Event(), []

        def target() -> None:
            try:
                ScheduleSource(name, spec, config).run(sink, stop)
            except BaseException as exc:  # surfaced by the teardown
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"test-schedule-{name}", daemon=True)
        thread.start()
        running.append((thread, stop, errors))
        return sink, stop, thread

    yield _start
    for thread, stop, errors in running:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "ScheduleSource.run() did not return after stop"
        assert not errors, errors


# -- pure logic ----------------------------------------------------------------
def test_next_due_every_is_aligned_to_the_epoch():
    spec = ScheduleConfig(every=Duration(10))
    assert schedule.next_due(spec, 1003.5) == 1010.0
    assert schedule.next_due(spec, 1010.0) == 1020.0  # strictly after
    assert schedule.next_due(spec, schedule.next_due(spec, 1003.5)) == 1020.0


def test_next_due_fractional_every_is_strictly_after():
    spec = ScheduleConfig(every=Duration(0.1))
    after = 1_700_000_000.3
    due = schedule.next_due(spec, after)
    assert after < due <= after + 0.1 + 1e-6


def test_catch_up_every_lands_on_the_latest_due_time():
    spec = ScheduleConfig(every=Duration(10))
    assert schedule.catch_up(spec, 1000.0, 1035.0) == (1030.0, 3)
    assert schedule.catch_up(spec, 1000.0, 1000.5) == (1000.0, 0)


def test_next_due_cron_in_a_timezone_follows_dst():
    spec = ScheduleConfig(cron="0 9 * * *", timezone="Europe/Paris")
    tz = schedule.validate("tick", spec)
    # 09:00 in Paris is 07:00 UTC in summer (CEST) and 08:00 UTC in winter (CET)
    assert schedule.next_due(spec, ts(2024, 7, 1), tz) == ts(2024, 7, 1, 7)
    assert schedule.next_due(spec, ts(2024, 1, 15), tz) == ts(2024, 1, 15, 8)
    # across the spring-forward night the next day's tick is 23 hours later
    before = schedule.next_due(spec, ts(2024, 3, 30), tz)
    assert before == ts(2024, 3, 30, 9, tz=ZoneInfo("Europe/Paris"))
    assert schedule.next_due(spec, before, tz) - before == 23 * 3600


def test_next_due_cron_weekdays_and_strictly_after():
    spec = ScheduleConfig(cron="30 8 * * mon-fri", timezone="America/New_York")
    ny = ZoneInfo("America/New_York")
    friday = ts(2024, 5, 3, 8, 30, tz=ny)
    assert schedule.next_due(spec, friday - 1, ny) == friday
    assert schedule.next_due(spec, friday, ny) == ts(2024, 5, 6, 8, 30, tz=ny)  # Monday


def test_catch_up_cron_counts_skipped_ticks():
    spec = ScheduleConfig(cron="*/5 * * * *")
    due, now = ts(2024, 1, 1, 0, 5), ts(2024, 1, 1, 0, 23)
    assert schedule.catch_up(spec, due, now, ZoneInfo("UTC")) == (ts(2024, 1, 1, 0, 20), 3)


def test_expression():
    assert schedule.expression(ScheduleConfig(every=Duration(10))) == "every 10s"
    assert schedule.expression(ScheduleConfig(every=Duration(0.5))) == "every 0.5s"
    assert schedule.expression(ScheduleConfig(cron="@hourly")) == "@hourly"


# -- validation ----------------------------------------------------------------
@pytest.mark.parametrize("cron", ["bad", "61 * * * *", "*/0 * * * *", "0 0 31 2 *"])
def test_invalid_cron_is_a_config_error(config, cron):
    spec = ScheduleConfig(cron=cron)
    with pytest.raises(ConfigError, match=r"producers\.tick\.cron: invalid cron expression") as exc:
        ScheduleSource("tick", spec, config).run(CollectingSink(), threading.Event())
    assert config.source in str(exc.value)


def test_overlong_cron_is_a_config_error(config):
    spec = ScheduleConfig(cron="0 " + "0," * 200 + "1 * * *")
    with pytest.raises(ConfigError, match=r"producers\.tick\.cron: longer than 256"):
        schedule.validate("tick", spec)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "../etc/passwd"])
def test_unknown_timezone_is_a_config_error(config, tz):
    spec = ScheduleConfig(every=Duration(1), timezone=tz)
    with pytest.raises(ConfigError, match=r"producers\.tick\.timezone: unknown timezone"):
        ScheduleSource("tick", spec, config).run(CollectingSink(), threading.Event())


# -- run() -----------------------------------------------------------------------
def test_every_ticks_arrive_aligned_and_increasing(start):
    spec = ScheduleConfig(every=Duration(0.2), key="beat", priority=3)
    sink, _, _ = start(spec, name="beat-every")
    ticks = wait_for(lambda: len(sink.events) >= 3 and sink.of_type("schedule.tick"), timeout=10, message="three ticks")
    scheduled = [t["scheduled"] for t in ticks]
    assert scheduled == sorted(set(scheduled)), "scheduled times strictly increase"
    for s in scheduled:
        assert abs(round(s / 0.2) * 0.2 - s) < 1e-6, f"{s} is not on the 0.2 s grid"
    for a, b in zip(scheduled, scheduled[1:], strict=False):
        assert b - a >= 0.2 - 1e-6
    for tick in ticks:
        msgspec.convert(tick, ScheduleTick)  # matches the contract
        assert tick["name"] == "beat-every"
        assert tick["expression"] == "every 0.2s"
        assert tick["fired"] >= tick["scheduled"]
    assert {key for _, _, key in sink.events} == {"beat"}
    assert set(sink.priorities) == {3}


def test_cron_ticks_use_the_schedule_name_as_key(start):
    spec = ScheduleConfig(cron="* * * * * *")  # six fields: every second
    sink, _, _ = start(spec, name="beat-cron")
    ticks = wait_for(
        lambda: len(sink.events) >= 2 and sink.of_type("schedule.tick"), timeout=10, message="two cron ticks"
    )
    assert [t["scheduled"] for t in ticks] == sorted({t["scheduled"] for t in ticks})
    assert all(t["scheduled"] == int(t["scheduled"]) for t in ticks)
    assert all(t["expression"] == "* * * * * *" for t in ticks)
    assert {key for _, _, key in sink.events} == {"beat-cron"}
    assert set(sink.priorities) == {5}


def test_stop_returns_promptly_while_waiting_for_a_far_tick(start):
    sink, stop, thread = start(ScheduleConfig(every=Duration(3600)), name="hourly")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert sink.events == []

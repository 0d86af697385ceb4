"""The live log level (nexus/common/logs.py): loggers bound before a change follow it,
and a launched child re-reads the launcher's level file on LEVEL_SIGNAL."""

from __future__ import annotations

import os
import signal

import structlog

from nexus.common import logs
from nexus.testing import wait_for


def test_loggers_bound_before_a_level_change_follow_it(capsys):
    logs.configure("info")
    try:
        bound = structlog.get_logger("t").bind(member="m")  # as a member's, and ctx.log from it
        child = bound.bind(event_id="e")
        child.debug("hidden_before")
        logs.set_level("debug")
        child.debug("shown_after")
        logs.set_level("error")
        child.warning("hidden_warning")
        child.log(40, "shown_error")
        assert child.is_enabled_for(40) and not child.is_enabled_for(30)
        err = capsys.readouterr().err
        assert "shown_after" in err and "shown_error" in err
        assert "hidden_before" not in err and "hidden_warning" not in err
    finally:
        logs.configure("info")


def test_the_level_file_is_followed_on_the_signal_and_only_for_this_run(tmp_path):
    os.makedirs(tmp_path / "run")
    logs.configure("info")
    previous = signal.getsignal(logs.LEVEL_SIGNAL)
    try:
        logs.write_level_file(str(tmp_path), "warning", "other-run")
        logs.follow_level_file(str(tmp_path), "this-run")
        assert logs.current_level() == "info"  # an earlier run's file is ignored
        assert oct((tmp_path / logs.LEVEL_FILE).stat().st_mode & 0o777) == "0o600"
        logs.write_level_file(str(tmp_path), "debug", "this-run")
        os.kill(os.getpid(), logs.LEVEL_SIGNAL)
        wait_for(lambda: logs.current_level() == "debug", 5, message="the new level applied")
        assert logs.read_level_file(str(tmp_path), "this-run") == "debug"
    finally:
        signal.signal(logs.LEVEL_SIGNAL, previous)
        logs.configure("info")

"""Unit tests of the supervisor's pieces: data dir locks, stale-run cleanup, exit reasons."""

from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

from nexus.common import blackbox, process
from nexus.common.datalock import DataDirLock, clean_stale_run
from nexus.errors import ConfigError, describe_exit
from nexus.testing import pid_alive, wait_for


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = DataDirLock(str(tmp_path), "launcher.lock", "pipeline").acquire("token-1")
    try:
        with pytest.raises(ConfigError) as refused:
            DataDirLock(str(tmp_path), "launcher.lock", "pipeline").acquire("token-2")
        assert f"in use by another pipeline (pid {os.getpid()})" in str(refused.value)
        assert (tmp_path / "launcher.lock").read_text().split() == [str(os.getpid()), "token-1"]
    finally:
        first.release()
    again = DataDirLock(str(tmp_path), "launcher.lock", "pipeline").acquire("token-3")
    assert again.previous.split() == [str(os.getpid()), "token-1"]  # the killed run's token
    again.release()


def sleeper(token: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(process.RUN_ENV, None)
    if token:
        env[process.RUN_ENV] = token
    return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)


def test_stale_run_cleanup_kills_only_that_runs_processes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "coord"))
    stale.close()  # the file stays, as after a SIGKILL
    (run / "notes.txt").write_text("not a socket")
    ours, stranger = sleeper("old-run"), sleeper(None)
    try:
        box_path = blackbox.path_for(str(tmp_path), "rec-0")
        blackbox.BlackBox.create(box_path).close()
        with open(box_path, "r+b") as f:  # a reused pid in a box: never killed without the token
            f.seek(8)
            f.write(struct.pack("Q", stranger.pid))
        done = clean_stale_run(str(tmp_path), [f"ipc://{run}/coord"], "old-run")
        assert done["killed"] == [ours.pid] and done["sockets"] == ["coord"] and done["boxes"] == 1
        ours.wait(10)
        assert pid_alive(stranger.pid)
        assert not (run / "coord").exists() and (run / "notes.txt").exists()
        assert not list((run / "box").glob("*.box"))
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait(10)


def test_terminate_ends_a_process_that_ignores_sigterm():
    p = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 60"])
    wait_for(lambda: process.stat(p.pid) is not None, 5, message="started")
    process.terminate([p.pid], grace=0.2)  # SIGTERM ignored: then SIGKILL
    wait_for(lambda: p.poll() is not None or not process.live(p.pid), 5, message="killed")


def test_exit_reasons():
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(8) == "exit code 8 (recycle)"
    assert describe_exit(17) == "exit code 17"
    assert describe_exit(None) == ""

"""Unit tests of the supervisor's pieces: data dir locks, stale-run cleanup, exit reasons,
scaling while a member drains."""

from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

from nexus import config
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


# -- scale: a group scaled up again while a member drains -------------------------------
def test_member_draining_when_its_group_scales_up_again_restarts_once_it_exited(tmp_path, monkeypatch):
    import drainer

    from nexus.supervisor import launcher as launcher_mod
    from nexus.supervisor.children import ChildState

    monkeypatch.setattr(launcher_mod, "entry", drainer.entry)  # real processes, a stand-in program
    cfg = config.Config(data_dir=str(tmp_path), workers={"g": config.WorkerGroupConfig(handler="m:f")})
    launcher = launcher_mod.Launcher(cfg, None)
    launcher.starting = False
    try:
        launcher.set_scale("g", 2)
        second = launcher.children["g-1"]
        draining = second.process
        assert draining is not None
        ready = tmp_path / f"g-1.{draining.pid}.ready"
        wait_for(ready.exists, 10, message="the member to start")
        launcher.set_scale("g", 1)  # SIGTERM: it drains for drainer.DRAIN
        assert launcher.set_scale("g", 2)["ok"]  # up again at once
        # not spawned over the draining one (same name, same box): it keeps its process
        assert second.process is draining and second.retired and second.state == ChildState.STOPPING
        wait_for(lambda: not draining.is_alive(), 10, message="the drained member to exit")
        launcher._on_exit(second)
        assert second.process is not draining and second.process is not None and second.process.is_alive()
        assert second.state == ChildState.RUNNING and not second.retired and second.box is not None
    finally:
        launcher.stopping = True
        launcher.shutdown()
    assert all(c.state == ChildState.STOPPED for c in launcher.children.values())


# -- a router restarted during a reload gets the reloader's staged view ------------------------
def test_a_router_started_during_a_reload_runs_the_view_the_reloader_staged(tmp_path, monkeypatch):
    import json

    import drainer
    import msgspec

    from nexus.supervisor import launcher as launcher_mod
    from nexus.supervisor.rolling import RollingRestart

    monkeypatch.setattr(launcher_mod, "entry", drainer.entry)  # real processes, a stand-in program
    group = config.WorkerGroupConfig(handler="app:old")
    old = config.Config(data_dir=str(tmp_path), workers={"keep": group, "gone": group, "rec": group})
    new_rec = msgspec.structs.replace(group, handler="app:new")
    launcher = launcher_mod.Launcher(old, None)
    launcher.starting = False
    # mid-reload: `gone` drains, `rec` rolls, `fresh` is added (what Reloader._start leaves)
    reloader = launcher.reloader
    reloader.running = old
    launcher.cfg = msgspec.structs.replace(old, workers={"keep": group, "rec": new_rec, "fresh": group})
    reloader.removing_groups = {"gone"}
    reloader.rolls = {"rec": RollingRestart("rec", [], 0.0)}

    def handed(child) -> dict:
        proc = child.process
        ready = tmp_path / f"router.{proc.pid}.ready"
        wait_for(lambda: ready.exists() and ready.read_text(), 10, message="the router to start")
        return json.loads(ready.read_text())

    try:
        router = launcher.add_child("router", "router")
        during = handed(router)
        launcher.terminate(router)
        wait_for(lambda: not router.process.is_alive(), 10, message="the router to exit")
        launcher._on_exit(router)
        reloader.running, reloader.rolls, reloader.removing_groups = None, {}, set()  # the reload is over
        launcher.spawn(router)
        after = handed(router)
    finally:
        launcher.stopping = True
        launcher.shutdown()
    assert during == {"keep": "app:old", "gone": "app:old", "rec": "app:old", "fresh": "app:old"}
    assert reloader.pushed is not None and set(reloader.pushed.workers) == set(during)  # not pushed again
    assert after == {"keep": "app:old", "rec": "app:new", "fresh": "app:old"}
